// clone_linear's CUTLASS sm90 path: argument checks, workspace layout, dtype dispatch and
// the fixed-order sum of the per-tile d^2 partials. The GEMMs themselves live in
// clone_linear_sm90_{bf16,f16}.cu (see clone_linear_sm90.cuh for the kernel design).
#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>

#include "clone_linear.h"
#include "clone_linear_sm90.h"
#include "cuda_utils.cuh"

namespace lrc {
namespace {

const char* const kOp = "clone_linear";
constexpr int kRedThreads = 256;
constexpr int kRedBlocks = 256;  // fixed: the reduction order depends on the shape alone
constexpr size_t kAlignBytes = 256;

size_t round_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

struct Layout {
  int64_t rows_pad, tiles_n;
  size_t partials_bytes, sums_bytes, gemm_offset;
};

Layout layout(int64_t m, int64_t n) {
  Layout l;
  l.rows_pad = (m + sm90::kTileM - 1) / sm90::kTileM * sm90::kTileM;
  l.tiles_n = (n + sm90::kTileN - 1) / sm90::kTileN;
  l.partials_bytes = round_up(size_t(l.rows_pad * l.tiles_n) * sizeof(float), kAlignBytes);
  l.sums_bytes = round_up(kRedBlocks * sizeof(float), kAlignBytes);
  l.gemm_offset = l.partials_bytes + l.sums_bytes;
  return l;
}

// partials: (rows_pad, tiles_n) M-major; rows >= m are padding and skipped.
__global__ void __launch_bounds__(kRedThreads)
    partials_sum_kernel(const float* __restrict__ partials, int64_t m, int64_t rows_pad, int64_t tiles_n,
                        float* __restrict__ sums) {
  float acc = 0.f;
  const int64_t total = m * tiles_n;
  for (int64_t i = int64_t(blockIdx.x) * kRedThreads + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * kRedThreads) {
    const int64_t j = i / m, r = i - j * m;
    acc += partials[r + j * rows_pad];
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) sums[blockIdx.x] = acc;
}

__global__ void __launch_bounds__(kRedBlocks)
    sums_final_kernel(const float* __restrict__ sums, int n, float inv_numel, float* __restrict__ mse) {
  float v = threadIdx.x < n ? sums[threadIdx.x] : 0.f;
  v = block_sum(v);
  if (threadIdx.x == 0) *mse = v * inv_numel;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

void check_dims(int64_t m, int64_t n, int64_t k) {
  if (m <= 0 || n <= 0 || k <= 0) fail(kOp, "the CUTLASS sm90 path needs a non-empty problem");
  if (m > INT_MAX || n > INT_MAX || k > INT_MAX) fail(kOp, "the CUTLASS sm90 path needs every dimension < 2^31");
  if (n % 8 || k % 8) fail(kOp, "the CUTLASS sm90 path needs the inner and output widths to be multiples of 8");
}

// TMA: 16-byte-aligned base pointers and row strides.
void check_operand(const char* name, const void* p, int64_t ld, int64_t width) {
  if (!p) fail(kOp, std::string("null data pointer for ") + name);
  if (!aligned16(p) || ld % 8 || ld < width)
    fail(kOp, std::string("the CUTLASS sm90 path needs '") + name +
                  "' 16-byte aligned with a row stride that is a multiple of 8 elements");
}

void check_device() {
  int dev = 0, major = 0, minor = 0;
  cuda_check(cudaGetDevice(&dev), kOp, "cudaGetDevice");
  cuda_check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), kOp, "cudaDeviceGetAttribute");
  cuda_check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), kOp, "cudaDeviceGetAttribute");
  if (major != 9 || minor != 0)
    fail(kOp, "the CUTLASS sm90 kernels run on sm_90 (H100/H200) only, this GPU is sm_" + std::to_string(major) +
                  std::to_string(minor));
}

int sm_count() {
  int dev = 0, n = 0;
  cuda_check(cudaGetDevice(&dev), kOp, "cudaGetDevice");
  cuda_check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev), kOp, "cudaDeviceGetAttribute");
  return n;
}

size_t gemm_workspace(const sm90::Problem& p, DType dt) {
  if (dt == DType::BF16) return sm90::gemm_workspace_bf16(p);
  if (dt == DType::F16) return sm90::gemm_workspace_f16(p);
  fail(kOp, std::string("the CUTLASS sm90 path takes bfloat16 or float16, got ") + dtype_name(dt));
}

sm90::Problem shape_only(bool out_side, int64_t m, int64_t n, int64_t k) {
  sm90::Problem p;
  p.out_side = out_side;
  p.m = int(m), p.n = int(n), p.k = int(k);
  return p;
}

// Runs the GEMM, then sums the partials into *mse.
void run(sm90::Problem& p, DType dt, float inv_numel, float* mse, void* workspace, int64_t workspace_bytes) {
  check_device();
  const Layout l = layout(p.m, p.n);
  const size_t need = l.gemm_offset + gemm_workspace(p, dt);
  if (!workspace || workspace_bytes < int64_t(need) || !aligned16(workspace))
    fail(kOp, "CUTLASS sm90 workspace too small or misaligned");
  if (!mse) fail(kOp, "null mse pointer");
  char* ws = static_cast<char*>(workspace);
  float* sums = reinterpret_cast<float*>(ws + l.partials_bytes);
  p.partials = reinterpret_cast<float*>(ws);
  p.workspace = ws + l.gemm_offset;
  p.sm_count = sm_count();
  if (dt == DType::BF16)
    sm90::gemm_run_bf16(p);
  else
    sm90::gemm_run_f16(p);
  const int64_t total = int64_t(p.m) * l.tiles_n;
  const int blocks = int(std::min<int64_t>(kRedBlocks, (total + kRedThreads - 1) / kRedThreads));
  partials_sum_kernel<<<blocks, kRedThreads, 0, p.stream>>>(p.partials, p.m, l.rows_pad, l.tiles_n, sums);
  cuda_check(cudaGetLastError(), kOp, "partials_sum_kernel launch");
  sums_final_kernel<<<1, kRedBlocks, 0, p.stream>>>(sums, blocks, inv_numel, mse);
  cuda_check(cudaGetLastError(), kOp, "sums_final_kernel launch");
}

}  // namespace

int64_t clone_linear_sm90_workspace(bool out_side, int64_t m, int64_t n, int64_t k, DType dt) {
  check_dims(m, n, k);
  return int64_t(layout(m, n).gemm_offset + gemm_workspace(shape_only(out_side, m, n, k), dt));
}

void clone_linear_sm90_in(const void* x, int64_t ldx, const void* w, int64_t ldw, const void* bias,
                          const void* target, int64_t ldt, void* y, int64_t ldy, void* d, int64_t ldd, int64_t m,
                          int64_t n, int64_t k, DType dt, float inv_numel, float* mse, void* workspace,
                          int64_t workspace_bytes, void* stream) {
  check_dims(m, n, k);
  check_operand("x", x, ldx, k);
  check_operand("weight", w, ldw, k);
  check_operand("target", target, ldt, n);
  check_operand("y", y, ldy, n);
  check_operand("d", d, ldd, n);
  if (bias && !aligned16(bias)) fail(kOp, "the CUTLASS sm90 path needs 'bias' 16-byte aligned");
  sm90::Problem p = shape_only(false, m, n, k);
  p.a = x, p.lda = ldx, p.b = w, p.ldb = ldw, p.c = target, p.ldc = ldt;
  p.d = d, p.ldd = ldd, p.aux = y, p.ldaux = ldy, p.bias = bias;
  p.stream = static_cast<cudaStream_t>(stream);
  run(p, dt, inv_numel, mse, workspace, workspace_bytes);
}

void clone_linear_sm90_out(const void* target, int64_t ldt, const void* proj, int64_t ldp, const void* y,
                           int64_t ldy, void* d, int64_t ldd, int64_t m, int64_t n, int64_t k, DType dt,
                           float inv_numel, float* mse, void* workspace, int64_t workspace_bytes, void* stream) {
  check_dims(m, n, k);
  check_operand("target", target, ldt, k);
  check_operand("proj", proj, ldp, n);
  check_operand("y", y, ldy, n);
  check_operand("d", d, ldd, n);
  sm90::Problem p = shape_only(true, m, n, k);
  p.a = target, p.lda = ldt, p.b = proj, p.ldb = ldp, p.c = y, p.ldc = ldy, p.d = d, p.ldd = ldd;
  p.stream = static_cast<cudaStream_t>(stream);
  run(p, dt, inv_numel, mse, workspace, workspace_bytes);
}

}  // namespace lrc
