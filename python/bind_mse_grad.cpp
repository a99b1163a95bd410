#include "mse_grad.h"
#include "registry.h"

namespace {
using namespace lrc;
using lrc_py::ptr;

lrc_py::Register reg([](pybind11::module_& m) {
  m.def(
      "mse_grad_cpu",
      [](uintptr_t a, int64_t lda, uintptr_t b, int64_t ldb, int64_t rows, int64_t cols, int dt, uintptr_t g,
         int64_t ldg, int gdt, double scale) {
        pybind11::gil_scoped_release nogil;
        return mse_grad_cpu(ptr(a), lda, ptr(b), ldb, rows, cols, to_dtype(dt, "mse_grad", "a"), ptr(g), ldg,
                            to_dtype(gdt, "mse_grad", "grad"), scale);
      },
      "sum((a-b)^2) over a 2-D strided region; optionally g = scale*(a-b)");
#ifdef LRC_WITH_CUDA
  m.def("mse_grad_cuda_workspace", &mse_grad_cuda_workspace);
  m.def("mse_grad_cuda", [](uintptr_t a, int64_t lda, uintptr_t b, int64_t ldb, int64_t rows, int64_t cols, int dt,
                            uintptr_t g, int64_t ldg, int gdt, float scale, uintptr_t out, uintptr_t ws,
                            uintptr_t stream) {
    mse_grad_cuda(ptr(a), lda, ptr(b), ldb, rows, cols, to_dtype(dt, "mse_grad", "a"), ptr(g), ldg,
                  to_dtype(gdt, "mse_grad", "grad"), scale, ptr<float>(out), ptr<float>(ws), ptr(stream));
  });
#endif
});
}  // namespace
