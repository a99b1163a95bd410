// clone_linear kernels: the parts of the Low-Rank Clone linear that are ours (the GEMMs
// are cuBLAS / the CPU BLAS, called from lrc_ext/ops/clone_linear.py).
//
// Forward epilogue, one pass over the student output y and the clone target t (both
// rows x cols, unit column stride, row strides ldy / ldt, dtype dt):
//     d = w[r] * (y - t)                 (written in dt, row stride ldd; d may be t itself:
//                                         each element is read before it is overwritten)
//     returns / writes sum_r w[r] sum_c (y - t)^2 * inv_numel   (the clone MSE; in fp32
//                                         from the rounded y and t, fp64 for fp64 input)
// w: fp32 per-row weights, or null (every row 1: d = y - t). With d so scaled, the loss'
// gradient with respect to y is 2 d * inv_numel for any weights.
// The reduction order is fixed by the shape alone, so results are bit-reproducible.
//
// Backward merge, one pass: g = gy + s * d, s = grad_mse * k (k = 2 / numel). gy may be
// null (g = s * d). On CUDA, s is read from a device scalar (no host sync).
#pragma once
#include <cstdint>

#include "common.h"

namespace lrc {

double clone_linear_epilogue_cpu(const void* y, int64_t ldy, const void* t, int64_t ldt, void* d, int64_t ldd,
                                 const float* w, int64_t rows, int64_t cols, DType dt, double inv_numel);

void clone_linear_merge_cpu(const void* gy, int64_t ldgy, const void* d, int64_t ldd, void* g, int64_t ldg,
                            int64_t rows, int64_t cols, DType dt, double s);

#ifdef LRC_WITH_CUDA
// fp32 partials the CUDA epilogue needs in its workspace for this shape.
int64_t clone_linear_epilogue_cuda_workspace(int64_t rows, int64_t cols);
// Writes the MSE (fp32) to *mse (device).
void clone_linear_epilogue_cuda(const void* y, int64_t ldy, const void* t, int64_t ldt, void* d, int64_t ldd,
                                const float* w, int64_t rows, int64_t cols, DType dt, float inv_numel, float* mse,
                                float* workspace, void* stream);
// grad_mse: device fp32 scalar; s = *grad_mse * k.
void clone_linear_merge_cuda(const void* gy, int64_t ldgy, const void* d, int64_t ldd, void* g, int64_t ldg,
                             int64_t rows, int64_t cols, DType dt, const float* grad_mse, float k, void* stream);
#endif

#ifdef LRC_WITH_CUTLASS
// CUTLASS sm90 path (H100/H200; kernels in clone_linear_sm90*.cu): the GEMM with the clone
// epilogue in one kernel, then a fixed-order sum of its per-tile partials. bf16 / fp16; n and
// k multiples of 8; 16-byte-aligned pointers; row strides multiples of 8 elements.
// Bytes of device workspace either side needs.
int64_t clone_linear_sm90_workspace(bool out_side, int64_t m, int64_t n, int64_t k, DType dt);
// Input side: y = x w^T (+ bias), d = y - target, *mse = sum(d^2) * inv_numel.
// x (m, k), w (n, k), bias (n) or null, target / y / d (m, n).
void clone_linear_sm90_in(const void* x, int64_t ldx, const void* w, int64_t ldw, const void* bias,
                          const void* target, int64_t ldt, void* y, int64_t ldy, void* d, int64_t ldd, int64_t m,
                          int64_t n, int64_t k, DType dt, float inv_numel, float* mse, void* workspace,
                          int64_t workspace_bytes, void* stream);
// Output side: d = y - target proj (never written), *mse = sum(d^2) * inv_numel.
// target (m, k), proj (k, n), y / d (m, n).
void clone_linear_sm90_out(const void* target, int64_t ldt, const void* proj, int64_t ldp, const void* y,
                           int64_t ldy, void* d, int64_t ldd, int64_t m, int64_t n, int64_t k, DType dt,
                           float inv_numel, float* mse, void* workspace, int64_t workspace_bytes, void* stream);
#endif

}  // namespace lrc
