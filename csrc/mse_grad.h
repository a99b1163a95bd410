// mse_grad: one pass over two same-shape 2-D tensors a, b (row strides lda, ldb; unit
// column stride). Returns sum((a-b)^2), accumulated in fp32 (fp64 for fp64 input) with a
// reduction order fixed by the shape alone, so results are bit-reproducible. When g is
// non-null, also writes g = scale * (a - b) (row stride ldg; dtype gdt).
#pragma once
#include <cstdint>
#include "common.h"

namespace lrc {

double mse_grad_cpu(const void* a, int64_t lda, const void* b, int64_t ldb, int64_t rows, int64_t cols,
                    DType dt, void* g, int64_t ldg, DType gdt, double scale);

#ifdef LRC_WITH_CUDA
// Number of fp32 partials the CUDA path needs in its workspace for this shape.
int64_t mse_grad_cuda_workspace(int64_t rows, int64_t cols);
// Writes the sum into out (fp32, device). workspace: mse_grad_cuda_workspace() floats.
void mse_grad_cuda(const void* a, int64_t lda, const void* b, int64_t ldb, int64_t rows, int64_t cols,
                   DType dt, void* g, int64_t ldg, DType gdt, float scale, float* out, float* workspace,
                   void* stream);
#endif

}  // namespace lrc
