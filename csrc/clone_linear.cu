#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "clone_linear.h"
#include "cuda_utils.cuh"

namespace lrc {
namespace {

const char* const kOp = "clone_linear";
constexpr int kThreads = 256;
// Logical partial sums: at most 1024, fixed by the shape alone, so the reduction order (and the
// bits) are the same on every device. The grid is per device (one wave: SMs x blocks an SM fit);
// each block takes logical partials blockIdx.x, blockIdx.x + gridDim.x, ...
constexpr int kMaxBlocks = 1024;
constexpr int64_t kChunk = 4096;  // columns per tile

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// d may alias t: each thread reads its elements of t before writing the same elements of
// d, and no element is touched by two threads (so t and d are not __restrict__).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    epilogue_partial_kernel(const T* __restrict__ y, int64_t ldy, const T* t, int64_t ldt, T* d, int64_t ldd,
                            const float* __restrict__ w, int64_t rows, int64_t cols, int64_t nchunks, int nparts,
                            float* __restrict__ partial) {
  const int64_t tiles = rows * nchunks;
  for (int part = blockIdx.x; part < nparts; part += gridDim.x) {
  float acc = 0.f;
  for (int64_t tile = part; tile < tiles; tile += nparts) {
    const int64_t r = tile / nchunks, c0 = (tile % nchunks) * kChunk, c1 = min(cols, c0 + kChunk);
    const T* yr = y + r * ldy;
    const T* tr = t + r * ldt;
    T* dr = d + r * ldd;
    const float wr = w ? w[r] : 1.f;  // wr * v == v for unweighted rows: unchanged numerics
    for (int64_t c = c0 + int64_t(threadIdx.x) * VEC; c < c1; c += int64_t(kThreads) * VEC) {
      if constexpr (VEC > 1) {  // host guarantees cols % VEC == 0 and 16-byte alignment
        const Pack<T, VEC> py = *reinterpret_cast<const Pack<T, VEC>*>(yr + c);
        const Pack<T, VEC> pt = *reinterpret_cast<const Pack<T, VEC>*>(tr + c);
        Pack<T, VEC> pd;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float v = to_float(py.v[k]) - to_float(pt.v[k]);
          const float wv = wr * v;
          acc = fmaf(wv, v, acc);
          pd.v[k] = from_float<T>(wv);
        }
        *reinterpret_cast<Pack<T, VEC>*>(dr + c) = pd;
      } else {
        const float v = to_float(yr[c]) - to_float(tr[c]);
        const float wv = wr * v;
        acc = fmaf(wv, v, acc);
        dr[c] = from_float<T>(wv);
      }
    }
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[part] = acc;
  __syncthreads();  // block_sum's shared scratch is reused by the next logical partial
  }
}

// Blocks of kThreads resident at once on the current device (cached per device).
int one_wave_blocks() {
  static int cache[64] = {0};
  int dev = 0;
  cuda_check(cudaGetDevice(&dev), kOp, "cudaGetDevice");
  if (dev < 0 || dev >= 64) return kMaxBlocks;
  if (cache[dev] == 0) {
    int sms = 0, threads = 0;
    cuda_check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), kOp, "SM count");
    cuda_check(cudaDeviceGetAttribute(&threads, cudaDevAttrMaxThreadsPerMultiProcessor, dev), kOp, "threads/SM");
    cache[dev] = std::max(1, sms * std::max(1, threads / kThreads));
  }
  return cache[dev];
}

__global__ void __launch_bounds__(kMaxBlocks)
    epilogue_final_kernel(const float* __restrict__ partial, int n, float inv_numel, float* __restrict__ mse) {
  float v = threadIdx.x < n ? partial[threadIdx.x] : 0.f;
  v = block_sum(v);
  if (threadIdx.x == 0) *mse = v * inv_numel;
}

template <typename T, int VEC, bool HAS_GY>
__global__ void __launch_bounds__(kThreads)
    merge_kernel(const T* __restrict__ gy, int64_t ldgy, const T* __restrict__ d, int64_t ldd, T* __restrict__ g,
                 int64_t ldg, int64_t rows, int64_t cols, const float* __restrict__ grad_mse, float k) {
  const float s = *grad_mse * k;
  const int64_t vcols = cols / VEC;  // host guarantees cols % VEC == 0
  const int64_t total = rows * vcols;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < total; i += int64_t(gridDim.x) * kThreads) {
    const int64_t r = i / vcols, c = (i % vcols) * VEC;
    const Pack<T, VEC> pd = *reinterpret_cast<const Pack<T, VEC>*>(d + r * ldd + c);
    Pack<T, VEC> pg;
    if constexpr (HAS_GY) {
      const Pack<T, VEC> py = *reinterpret_cast<const Pack<T, VEC>*>(gy + r * ldgy + c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) pg.v[j] = from_float<T>(fmaf(s, to_float(pd.v[j]), to_float(py.v[j])));
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) pg.v[j] = from_float<T>(s * to_float(pd.v[j]));
    }
    *reinterpret_cast<Pack<T, VEC>*>(g + r * ldg + c) = pg;
  }
}

}  // namespace

int64_t clone_linear_epilogue_cuda_workspace(int64_t rows, int64_t cols) {
  const int64_t tiles = rows * ((cols + kChunk - 1) / kChunk);
  return std::max<int64_t>(1, std::min<int64_t>(tiles, kMaxBlocks));
}

void clone_linear_epilogue_cuda(const void* y, int64_t ldy, const void* t, int64_t ldt, void* d, int64_t ldd,
                                const float* w, int64_t rows, int64_t cols, DType dt, float inv_numel, float* mse,
                                float* workspace, void* stream) {
  if (rows < 0 || cols < 0) fail(kOp, "negative shape");
  if (rows > 1 && (ldy < cols || ldt < cols || ldd < cols)) fail(kOp, "row stride smaller than the row width");
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (rows == 0 || cols == 0) {
    // Mean over no elements: NaN, as torch's mean of an empty tensor (0 * NaN).
    epilogue_final_kernel<<<1, 32, 0, s>>>(workspace, 0, __builtin_nanf(""), mse);
    cuda_check(cudaGetLastError(), kOp, "epilogue_final_kernel launch");
    return;
  }
  const int64_t nchunks = (cols + kChunk - 1) / kChunk;
  const int nparts = static_cast<int>(clone_linear_epilogue_cuda_workspace(rows, cols));
  const int blocks = std::min(nparts, one_wave_blocks());
  dispatch_cuda_dtype(dt, kOp, [&](auto* tp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    constexpr int VEC = 16 / sizeof(T);
    const bool vec = cols % VEC == 0 && ldy % VEC == 0 && ldt % VEC == 0 && ldd % VEC == 0 && aligned16(y) &&
                     aligned16(t) && aligned16(d);
    const T* ty = static_cast<const T*>(y);
    const T* tt = static_cast<const T*>(t);
    T* td = static_cast<T*>(d);
    if (vec)
      epilogue_partial_kernel<T, VEC>
          <<<blocks, kThreads, 0, s>>>(ty, ldy, tt, ldt, td, ldd, w, rows, cols, nchunks, nparts, workspace);
    else
      epilogue_partial_kernel<T, 1><<<blocks, kThreads, 0, s>>>(ty, ldy, tt, ldt, td, ldd, w, rows, cols, nchunks,
                                                                 nparts, workspace);
  });
  cuda_check(cudaGetLastError(), kOp, "epilogue_partial_kernel launch");
  epilogue_final_kernel<<<1, kMaxBlocks, 0, s>>>(workspace, nparts, inv_numel, mse);
  cuda_check(cudaGetLastError(), kOp, "epilogue_final_kernel launch");
}

void clone_linear_merge_cuda(const void* gy, int64_t ldgy, const void* d, int64_t ldd, void* g, int64_t ldg,
                             int64_t rows, int64_t cols, DType dt, const float* grad_mse, float k, void* stream) {
  if (rows < 0 || cols < 0) fail(kOp, "negative shape");
  if (rows == 0 || cols == 0) return;
  if (rows > 1 && ((gy && ldgy < cols) || ldd < cols || ldg < cols)) fail(kOp, "row stride smaller than the row width");
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  dispatch_cuda_dtype(dt, kOp, [&](auto* tp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    constexpr int VEC = 16 / sizeof(T);
    const bool vec = cols % VEC == 0 && ldd % VEC == 0 && ldg % VEC == 0 && aligned16(d) && aligned16(g) &&
                     (!gy || (ldgy % VEC == 0 && aligned16(gy)));
    const int64_t work = rows * (vec ? cols / VEC : cols);
    const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, 65536)));
    const T* tgy = static_cast<const T*>(gy);
    const T* td = static_cast<const T*>(d);
    T* tg = static_cast<T*>(g);
    if (vec && gy)
      merge_kernel<T, VEC, true><<<blocks, kThreads, 0, s>>>(tgy, ldgy, td, ldd, tg, ldg, rows, cols, grad_mse, k);
    else if (vec)
      merge_kernel<T, VEC, false><<<blocks, kThreads, 0, s>>>(tgy, ldgy, td, ldd, tg, ldg, rows, cols, grad_mse, k);
    else if (gy)
      merge_kernel<T, 1, true><<<blocks, kThreads, 0, s>>>(tgy, ldgy, td, ldd, tg, ldg, rows, cols, grad_mse, k);
    else
      merge_kernel<T, 1, false><<<blocks, kThreads, 0, s>>>(tgy, ldgy, td, ldd, tg, ldg, rows, cols, grad_mse, k);
  });
  cuda_check(cudaGetLastError(), kOp, "merge_kernel launch");
}

}  // namespace lrc
