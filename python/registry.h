// Each bind_<op>.cpp registers its functions here, so adding an op touches no shared file.
#pragma once
#include <pybind11/pybind11.h>

#include <functional>
#include <vector>

namespace lrc_py {

using Binder = std::function<void(pybind11::module_&)>;

inline std::vector<Binder>& binders() {
  static std::vector<Binder> v;
  return v;
}

struct Register {
  explicit Register(Binder b) { binders().push_back(std::move(b)); }
};

// Raw pointers cross from Python as integers (tensor.data_ptr()).
template <typename T = void>
inline T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

}  // namespace lrc_py
