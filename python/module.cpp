// lrc_ext._C: the compiled kernels. Takes raw pointers, sizes, strides, dtype codes and
// CUDA streams from Python; the torch glue lives in lrc_ext/ops/.
#include <pybind11/stl.h>

#include <string>

#include "registry.h"
#ifdef LRC_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "lrc_ext compiled kernels (C++ CPU, CUDA when built with nvcc)";
#ifdef LRC_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#ifdef LRC_WITH_CUTLASS
  m.attr("with_cutlass") = true;  // the CUTLASS sm90 clone_linear kernels
#else
  m.attr("with_cutlass") = false;
#endif
#ifdef LRC_WITH_OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
  m.def("build_info", []() {
    py::dict d;
    d["cuda_archs"] = std::string(LRC_CUDA_ARCHS_STR);
    d["cuda_version"] = std::string(LRC_CUDA_VERSION_STR);
    d["cxx_compiler"] = std::string(LRC_CXX_COMPILER_STR);
    return d;
  });
  // Devices the static CUDA runtime sees (0 without a GPU or driver; never raises).
  m.def("cuda_device_count", []() {
#ifdef LRC_WITH_CUDA
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return n;
#else
    return 0;
#endif
  });
  // The CUDA version the installed driver supports (e.g. 12080; 0 without a driver).
  m.def("cuda_driver_version", []() {
#ifdef LRC_WITH_CUDA
    int v = 0;
    if (cudaDriverGetVersion(&v) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return v;
#else
    return 0;
#endif
  });
  for (auto& bind : lrc_py::binders()) bind(m);
}
