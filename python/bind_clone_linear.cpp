#include "clone_linear.h"
#include "registry.h"

namespace {
using namespace lrc;
using lrc_py::ptr;

lrc_py::Register reg([](pybind11::module_& m) {
  m.def(
      "clone_linear_epilogue_cpu",
      [](uintptr_t y, int64_t ldy, uintptr_t t, int64_t ldt, uintptr_t d, int64_t ldd, uintptr_t w, int64_t rows,
         int64_t cols, int dt, double inv_numel) {
        pybind11::gil_scoped_release nogil;
        return clone_linear_epilogue_cpu(ptr(y), ldy, ptr(t), ldt, ptr(d), ldd, ptr<const float>(w), rows, cols,
                                         to_dtype(dt, "clone_linear", "x"), inv_numel);
      },
      "d = w[r] * (y - t) (d may be t, w may be 0: all 1); returns sum_r w[r] * sum_c (y - t)^2 * inv_numel");
  m.def(
      "clone_linear_merge_cpu",
      [](uintptr_t gy, int64_t ldgy, uintptr_t d, int64_t ldd, uintptr_t g, int64_t ldg, int64_t rows, int64_t cols,
         int dt, double s) {
        pybind11::gil_scoped_release nogil;
        clone_linear_merge_cpu(ptr(gy), ldgy, ptr(d), ldd, ptr(g), ldg, rows, cols,
                               to_dtype(dt, "clone_linear", "grad_y"), s);
      },
      "g = gy + s * d (gy may be 0: g = s * d)");
#ifdef LRC_WITH_CUDA
  m.def("clone_linear_epilogue_cuda_workspace", &clone_linear_epilogue_cuda_workspace);
  m.def("clone_linear_epilogue_cuda", [](uintptr_t y, int64_t ldy, uintptr_t t, int64_t ldt, uintptr_t d, int64_t ldd,
                                         uintptr_t w, int64_t rows, int64_t cols, int dt, float inv_numel,
                                         uintptr_t mse, uintptr_t ws, uintptr_t stream) {
    clone_linear_epilogue_cuda(ptr(y), ldy, ptr(t), ldt, ptr(d), ldd, ptr<const float>(w), rows, cols,
                               to_dtype(dt, "clone_linear", "x"),
                               inv_numel, ptr<float>(mse), ptr<float>(ws), ptr(stream));
  });
  m.def("clone_linear_merge_cuda", [](uintptr_t gy, int64_t ldgy, uintptr_t d, int64_t ldd, uintptr_t g, int64_t ldg,
                                      int64_t rows, int64_t cols, int dt, uintptr_t grad_mse, float k,
                                      uintptr_t stream) {
    clone_linear_merge_cuda(ptr(gy), ldgy, ptr(d), ldd, ptr(g), ldg, rows, cols,
                            to_dtype(dt, "clone_linear", "grad_y"), ptr<const float>(grad_mse), k, ptr(stream));
  });
#endif
#ifdef LRC_WITH_CUTLASS
  m.def("clone_linear_sm90_workspace", [](bool out_side, int64_t m_, int64_t n, int64_t k, int dt) {
    return clone_linear_sm90_workspace(out_side, m_, n, k, to_dtype(dt, "clone_linear", "x"));
  });
  m.def("clone_linear_sm90_in", [](uintptr_t x, int64_t ldx, uintptr_t w, int64_t ldw, uintptr_t bias, uintptr_t t,
                                   int64_t ldt, uintptr_t y, int64_t ldy, uintptr_t d, int64_t ldd, int64_t m_,
                                   int64_t n, int64_t k, int dt, float inv_numel, uintptr_t mse, uintptr_t ws,
                                   int64_t ws_bytes, uintptr_t stream) {
    clone_linear_sm90_in(ptr(x), ldx, ptr(w), ldw, ptr(bias), ptr(t), ldt, ptr(y), ldy, ptr(d), ldd, m_, n, k,
                         to_dtype(dt, "clone_linear", "x"), inv_numel, ptr<float>(mse), ptr(ws), ws_bytes,
                         ptr(stream));
  });
  m.def("clone_linear_sm90_out", [](uintptr_t t, int64_t ldt, uintptr_t p, int64_t ldp, uintptr_t y, int64_t ldy,
                                    uintptr_t d, int64_t ldd, int64_t m_, int64_t n, int64_t k, int dt,
                                    float inv_numel, uintptr_t mse, uintptr_t ws, int64_t ws_bytes,
                                    uintptr_t stream) {
    clone_linear_sm90_out(ptr(t), ldt, ptr(p), ldp, ptr(y), ldy, ptr(d), ldd, m_, n, k,
                          to_dtype(dt, "clone_linear", "x"), inv_numel, ptr<float>(mse), ptr(ws), ws_bytes,
                          ptr(stream));
  });
#endif
});
}  // namespace
