// Internal interface between the sm90 dispatch (clone_linear_sm90.cu) and the CUTLASS GEMM
// translation units (clone_linear_sm90_{bf16,f16}.cu). Plain C++: no CUTLASS types, so only
// the per-dtype units pay for the CUTLASS headers.
#pragma once
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace lrc {
namespace sm90 {

// Tile of the CUTLASS kernels (M x N); the d^2 partials are one fp32 per row per N-tile.
constexpr int kTileM = 128;
constexpr int kTileN = 128;

// One GEMM D = epilogue(A B), row-major (M, N) outputs; all leading dimensions in elements.
//   input side : A = x (M, K) row-major, B = W_S (N, K) row-major (K-major), C = y_T,
//                aux = y (stored), D = d = y - y_T, bias (N) or null.
//   output side: A = y_T (M, K) row-major, B = P (K, N) row-major (N-major), C = y,
//                D = d = y - y_T P; aux and bias unused.
struct Problem {
  bool out_side = false;
  int m = 0, n = 0, k = 0;
  const void* a = nullptr;
  int64_t lda = 0;
  const void* b = nullptr;
  int64_t ldb = 0;
  const void* c = nullptr;
  int64_t ldc = 0;
  void* d = nullptr;
  int64_t ldd = 0;
  void* aux = nullptr;
  int64_t ldaux = 0;
  const void* bias = nullptr;
  float* partials = nullptr;  // (round_up(M, kTileM), ceil(N / kTileN)) fp32, M-major
  void* workspace = nullptr;  // CUTLASS's own workspace
  int sm_count = 0;
  cudaStream_t stream = nullptr;
};

// Bytes of CUTLASS workspace the problem needs (shape only; pointers may be null).
size_t gemm_workspace_bf16(const Problem& p);
size_t gemm_workspace_f16(const Problem& p);
// Runs the GEMM; throws std::runtime_error naming the op if CUTLASS rejects the problem.
void gemm_run_bf16(const Problem& p);
void gemm_run_f16(const Problem& p);

}  // namespace sm90
}  // namespace lrc
