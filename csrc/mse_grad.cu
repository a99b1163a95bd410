#include <algorithm>
#include <cstdint>

#include "cuda_utils.cuh"
#include "mse_grad.h"

namespace lrc {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 1024;  // fixed, not per-device: same reduction order everywhere
constexpr int64_t kChunk = 4096;  // columns per tile

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, typename G, int VEC>
__global__ void __launch_bounds__(kThreads) mse_partial_kernel(const T* __restrict__ a, int64_t lda,
                                                               const T* __restrict__ b, int64_t ldb, int64_t rows,
                                                               int64_t cols, G* __restrict__ g, int64_t ldg,
                                                               float scale, int64_t nchunks,
                                                               float* __restrict__ partial) {
  float acc = 0.f;
  const int64_t tiles = rows * nchunks;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t r = t / nchunks, c0 = (t % nchunks) * kChunk, c1 = min(cols, c0 + kChunk);
    const T* ar = a + r * lda;
    const T* br = b + r * ldb;
    G* gr = g ? g + r * ldg : nullptr;
    for (int64_t c = c0 + int64_t(threadIdx.x) * VEC; c < c1; c += int64_t(kThreads) * VEC) {
      if constexpr (VEC > 1) {  // host guarantees cols % VEC == 0 and 16-byte alignment
        const Pack<T, VEC> pa = *reinterpret_cast<const Pack<T, VEC>*>(ar + c);
        const Pack<T, VEC> pb = *reinterpret_cast<const Pack<T, VEC>*>(br + c);
        Pack<G, VEC> pg;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float d = to_float(pa.v[k]) - to_float(pb.v[k]);
          acc = fmaf(d, d, acc);
          pg.v[k] = from_float<G>(scale * d);
        }
        if (gr) *reinterpret_cast<Pack<G, VEC>*>(gr + c) = pg;
      } else {
        const float d = to_float(ar[c]) - to_float(br[c]);
        acc = fmaf(d, d, acc);
        if (gr) gr[c] = from_float<G>(scale * d);
      }
    }
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

__global__ void __launch_bounds__(kMaxBlocks) mse_final_kernel(const float* __restrict__ partial, int n,
                                                               float* __restrict__ out) {
  float v = threadIdx.x < n ? partial[threadIdx.x] : 0.f;
  v = block_sum(v);
  if (threadIdx.x == 0) *out = v;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

int64_t mse_grad_cuda_workspace(int64_t rows, int64_t cols) {
  const int64_t tiles = rows * ((cols + kChunk - 1) / kChunk);
  return std::max<int64_t>(1, std::min<int64_t>(tiles, kMaxBlocks));
}

void mse_grad_cuda(const void* a, int64_t lda, const void* b, int64_t ldb, int64_t rows, int64_t cols, DType dt,
                   void* g, int64_t ldg, DType gdt, float scale, float* out, float* workspace, void* stream) {
  const char* op = "mse_grad";
  if (rows < 0 || cols < 0) fail(op, "negative shape");
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (rows == 0 || cols == 0) {
    cuda_check(cudaMemsetAsync(out, 0, sizeof(float), s), op, "cudaMemsetAsync");
    return;
  }
  const int64_t nchunks = (cols + kChunk - 1) / kChunk;
  const int blocks = static_cast<int>(mse_grad_cuda_workspace(rows, cols));
  dispatch_cuda_dtype(dt, op, [&](auto* tp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    dispatch_cuda_dtype(g ? gdt : dt, op, [&](auto* gp) {
      using G = std::remove_pointer_t<decltype(gp)>;
      constexpr int VEC = 16 / sizeof(T);
      constexpr int GVEC_BYTES = sizeof(G) * VEC;
      const bool vec = cols % VEC == 0 && lda % VEC == 0 && ldb % VEC == 0 && aligned16(a) && aligned16(b) &&
                       (!g || (ldg % VEC == 0 && (reinterpret_cast<uintptr_t>(g) % GVEC_BYTES) == 0));
      const T* ta = static_cast<const T*>(a);
      const T* tb = static_cast<const T*>(b);
      G* tg = static_cast<G*>(g);
      if (vec)
        mse_partial_kernel<T, G, VEC><<<blocks, kThreads, 0, s>>>(ta, lda, tb, ldb, rows, cols, tg, ldg, scale,
                                                                  nchunks, workspace);
      else
        mse_partial_kernel<T, G, 1><<<blocks, kThreads, 0, s>>>(ta, lda, tb, ldb, rows, cols, tg, ldg, scale,
                                                                nchunks, workspace);
    });
  });
  cuda_check(cudaGetLastError(), op, "mse_partial_kernel launch");
  mse_final_kernel<<<1, kMaxBlocks, 0, s>>>(workspace, blocks, out);
  cuda_check(cudaGetLastError(), op, "mse_final_kernel launch");
}

}  // namespace lrc
