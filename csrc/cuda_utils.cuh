// CUDA-side helpers shared by lrc_ext kernels.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common.h"

namespace lrc {

inline void cuda_check(cudaError_t e, const char* op, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string(op) + ": CUDA error in " + what + ": " + cudaGetErrorString(e));
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Sum over a block (blockDim.x a multiple of 32, at most 1024) in a fixed order; the
// result is valid in thread 0.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = (threadIdx.x < (blockDim.x >> 5)) ? warp_sums[threadIdx.x] : 0.f;
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Calls f(T*) with the CUDA storage type of a dtype code (fp32, fp16, bf16).
template <typename F>
void dispatch_cuda_dtype(DType d, const char* op, F&& f) {
  switch (d) {
    case DType::F32: f(static_cast<float*>(nullptr)); return;
    case DType::F16: f(static_cast<__half*>(nullptr)); return;
    case DType::BF16: f(static_cast<__nv_bfloat16*>(nullptr)); return;
    default: fail(op, std::string("dtype ") + dtype_name(d) + " is not supported on CUDA");
  }
}

}  // namespace lrc
