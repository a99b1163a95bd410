// distill_head_rows: the fused row-wise part of the distillation head loss (docs/DESIGN.md,
// "distill_head"). For each row r of a chunk of student logits s = zs[r, :V] and teacher
// logits t = zt[r, :V] with label y = labels[r], in one kernel (fp32 accumulation; fp64
// for fp64 input):
//
//   ce[r] = logsumexp(s) - s[y]                                   (when ce_out != null)
//   kl[r] = sum_v p_T (log p_T - log p_S),  p = softmax(. / tau)  (when zt, kl_out != null)
//   zs[r, v] <- lm_coef * (softmax(s)_v - [v == y]) + kl_coef * (p_S,v - p_T,v)
//                                                                 (when write_grad)
//
// i.e. the gradient of lm_coef * ce + kl_coef * tau * kl with respect to s is written in
// place over the logits. A row whose label equals ignore_index contributes 0 and gets a
// zero gradient row. Softmaxes are max-shifted (stable for any tau > 0); each row is
// reduced by one thread (CPU) or one block (CUDA) in an order fixed by V alone, so the
// results are bit-reproducible.
//
// CPU: rows are spread over `threads` threads (std::thread, not OpenMP; see the .cpp).
// zs, zt: (rows, V) with row strides ldzs, ldzt (unit column stride), storage dtype dt.
// labels: int64, device memory of the same device. ce_out / kl_out: one value per row,
// double for F64, float otherwise.
#pragma once
#include <cstdint>

#include "common.h"

namespace lrc {

void distill_head_rows_cpu(void* zs, int64_t ldzs, const void* zt, int64_t ldzt, DType dt, const int64_t* labels,
                           int64_t rows, int64_t vocab, double inv_tau, double lm_coef, double kl_coef,
                           int64_t ignore_index, void* ce_out, void* kl_out, bool write_grad, int threads);

#ifdef LRC_WITH_CUDA
// Asynchronous on `stream`. A label outside [0, V) that is not ignore_index gives a NaN
// ce for that row (the Python layer validates labels before launching).
void distill_head_rows_cuda(void* zs, int64_t ldzs, const void* zt, int64_t ldzt, DType dt, const int64_t* labels,
                            int64_t rows, int64_t vocab, float inv_tau, float lm_coef, float kl_coef,
                            int64_t ignore_index, float* ce_out, float* kl_out, bool write_grad, void* stream);
#endif

}  // namespace lrc
