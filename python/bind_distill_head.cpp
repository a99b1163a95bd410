#include "distill_head.h"
#include "registry.h"

namespace {
using namespace lrc;
using lrc_py::ptr;

lrc_py::Register reg([](pybind11::module_& m) {
  m.def(
      "distill_head_rows_cpu",
      [](uintptr_t zs, int64_t ldzs, uintptr_t zt, int64_t ldzt, int dt, uintptr_t labels, int64_t rows,
         int64_t vocab, double inv_tau, double lm_coef, double kl_coef, int64_t ignore_index, uintptr_t ce_out,
         uintptr_t kl_out, bool write_grad, int threads) {
        pybind11::gil_scoped_release nogil;
        distill_head_rows_cpu(ptr(zs), ldzs, ptr(zt), ldzt, to_dtype(dt, "distill_head", "logits"),
                              ptr<const int64_t>(labels), rows, vocab, inv_tau, lm_coef, kl_coef, ignore_index,
                              ptr(ce_out), ptr(kl_out), write_grad, threads);
      },
      "Per row of a logits chunk: CE, KL(p_T||p_S) at temperature tau, and the gradient in place");
#ifdef LRC_WITH_CUDA
  m.def("distill_head_rows_cuda",
        [](uintptr_t zs, int64_t ldzs, uintptr_t zt, int64_t ldzt, int dt, uintptr_t labels, int64_t rows,
           int64_t vocab, float inv_tau, float lm_coef, float kl_coef, int64_t ignore_index, uintptr_t ce_out,
           uintptr_t kl_out, bool write_grad, uintptr_t stream) {
          distill_head_rows_cuda(ptr(zs), ldzs, ptr(zt), ldzt, to_dtype(dt, "distill_head", "logits"),
                                 ptr<const int64_t>(labels), rows, vocab, inv_tau, lm_coef, kl_coef, ignore_index,
                                 ptr<float>(ce_out), ptr<float>(kl_out), write_grad, ptr(stream));
        });
#endif
});
}  // namespace
