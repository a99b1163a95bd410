#include <cstdint>
#include <type_traits>

#include "cuda_utils.cuh"
#include "distill_head.h"

namespace lrc {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// Reduce NV values over the block. Every thread gets the result. Fixed order, so the
// result depends on the launch shape only.
template <int NV, bool MAX>
__device__ __forceinline__ void block_allreduce(float (&x)[NV]) {
  __shared__ float smem[32][NV];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int i = 0; i < NV; ++i)
    for (int o = 16; o > 0; o >>= 1) {
      const float y = __shfl_xor_sync(0xffffffffu, x[i], o);
      x[i] = MAX ? fmaxf(x[i], y) : x[i] + y;
    }
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0)
#pragma unroll
    for (int i = 0; i < NV; ++i) smem[warp][i] = x[i];
  __syncthreads();
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    float v = lane < nwarps ? smem[lane][i] : (MAX ? -INFINITY : 0.f);
    for (int o = 16; o > 0; o >>= 1) {
      const float y = __shfl_xor_sync(0xffffffffu, v, o);
      v = MAX ? fmaxf(v, y) : v + y;
    }
    x[i] = v;
  }
}

// exp2 of a max-shifted argument (<= 0); -inf gives 0.
__device__ __forceinline__ float ex2(float x) { return exp2f(x); }

// One block per row. Pass 1: online maxima and normalisers (one read of s and t).
// Pass 2: gradient in place, and the KL sums (a second read). exp(x) is computed as
// exp2(x * log2(e)) on max-shifted arguments (<= 0), so nothing overflows at any tau.
template <typename T, int VEC, bool CE, bool KL, bool WRITE>
__global__ void distill_rows_kernel(T* __restrict__ zs, int64_t ldzs, const T* __restrict__ zt, int64_t ldzt,
                                    const int64_t* __restrict__ labels, int64_t V, float inv_tau, float lm_coef,
                                    float kl_coef, int64_t ignore_index, float* __restrict__ ce_out,
                                    float* __restrict__ kl_out) {
  const int64_t row = blockIdx.x;
  T* s = zs + row * ldzs;
  const T* t = KL ? zt + row * ldzt : nullptr;
  const int64_t y = labels[row];
  const int64_t step = int64_t(blockDim.x) * VEC;
  if (y == ignore_index || y < 0 || y >= V) {
    if (WRITE)
      for (int64_t v = threadIdx.x; v < V; v += blockDim.x) s[v] = from_float<T>(0.f);
    if (threadIdx.x == 0) {
      if (CE) ce_out[row] = y == ignore_index ? 0.f : NAN;
      if (KL) kl_out[row] = 0.f;
    }
    return;
  }
  const float sy = CE ? to_float(s[y]) : 0.f;  // read before any thread overwrites s
  const float ltau = kLog2e * inv_tau;

  // Pass 1, per thread: ms = running max of s; S1 = sum 2^((s - ms) log2e),
  // Ss = sum 2^((s - ms) ltau); mt, St alike for t.
  float ms = -INFINITY, S1 = 0.f, Ss = 0.f, mt = -INFINITY, St = 0.f;
  const int64_t vend = VEC > 1 ? V : 0;  // vector path: V % VEC == 0 (checked by the host)
  for (int64_t i = int64_t(threadIdx.x) * VEC; i < vend; i += step) {
    const Vec<T, VEC> ps = *reinterpret_cast<const Vec<T, VEC>*>(s + i);
    float a[VEC], m = -INFINITY;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      a[k] = to_float(ps.v[k]);
      m = fmaxf(m, a[k]);
    }
    if (m > ms) {
      if constexpr (CE) S1 *= ex2((ms - m) * kLog2e);
      if constexpr (KL) Ss *= ex2((ms - m) * ltau);
      ms = m;
    }
    float l1 = 0.f, ls = 0.f;  // per-vector partials: shorter chains of fp32 additions
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (CE) l1 += ex2((a[k] - ms) * kLog2e);
      if (KL) ls += ex2((a[k] - ms) * ltau);
    }
    S1 += l1;
    Ss += ls;
    if constexpr (KL) {
      const Vec<T, VEC> pt = *reinterpret_cast<const Vec<T, VEC>*>(t + i);
      float b[VEC], mm = -INFINITY;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        b[k] = to_float(pt.v[k]);
        mm = fmaxf(mm, b[k]);
      }
      if (mm > mt) {
        St *= ex2((mt - mm) * ltau);
        mt = mm;
      }
      float lt = 0.f;
#pragma unroll
      for (int k = 0; k < VEC; ++k) lt += ex2((b[k] - mt) * ltau);
      St += lt;
    }
  }
  if (VEC == 1) {
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
      const float a = to_float(s[i]);
      if (a > ms) {
        if constexpr (CE) S1 *= ex2((ms - a) * kLog2e);
        if constexpr (KL) Ss *= ex2((ms - a) * ltau);
        ms = a;
      }
      if (CE) S1 += ex2((a - ms) * kLog2e);
      if (KL) Ss += ex2((a - ms) * ltau);
      if (KL) {
        const float b = to_float(t[i]);
        if (b > mt) {
          St *= ex2((mt - b) * ltau);
          mt = b;
        }
        St += ex2((b - mt) * ltau);
      }
    }
  }
  // Merge the threads' states: global maxima, then rescaled sums.
  float m2[2] = {ms, mt};
  block_allreduce<2, true>(m2);
  {
    // A thread that saw no element has ms = -inf and sums 0: its rescale factor is 0.
    const bool hs = ms != -INFINITY, ht = mt != -INFINITY;
    float sums[3] = {CE && hs ? S1 * ex2((ms - m2[0]) * kLog2e) : 0.f, KL && hs ? Ss * ex2((ms - m2[0]) * ltau) : 0.f,
                     KL && ht ? St * ex2((mt - m2[1]) * ltau) : 0.f};
    block_allreduce<3, false>(sums);
    S1 = sums[0];
    Ss = sums[1];
    St = sums[2];
  }
  ms = m2[0];
  mt = m2[1];
  const float c1 = CE ? lm_coef / S1 : 0.f, cs = KL ? 1.f / Ss : 0.f, ct = KL ? 1.f / St : 0.f;

  // Pass 2: g = lm_coef (softmax(s) - onehot) + kl_coef (p_S - p_T) in place;
  // A = sum p_T (t - s), P = sum p_T; KL = A / tau - [(mt - ms)/tau + log(St/Ss)] P.
  float A = 0.f, P = 0.f;
  if (KL || WRITE) {
    for (int64_t i = int64_t(threadIdx.x) * VEC; i < vend; i += step) {
      const Vec<T, VEC> ps = *reinterpret_cast<const Vec<T, VEC>*>(s + i);
      Vec<T, VEC> pt{};
      if constexpr (KL) pt = *reinterpret_cast<const Vec<T, VEC>*>(t + i);
      Vec<T, VEC> out;
      float la = 0.f, lp = 0.f;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float a = to_float(ps.v[k]);
        float g = 0.f;
        if (CE) g = c1 * ex2((a - ms) * kLog2e) - (i + k == y ? lm_coef : 0.f);
        if (KL) {
          const float b = to_float(pt.v[k]);
          const float qs = ex2((a - ms) * ltau) * cs;
          const float qt = ex2((b - mt) * ltau) * ct;
          la = fmaf(qt, b - a, la);
          lp += qt;
          g = fmaf(kl_coef, qs - qt, g);
        }
        out.v[k] = from_float<T>(g);
      }
      A += la;
      P += lp;
      if (WRITE) *reinterpret_cast<Vec<T, VEC>*>(s + i) = out;
    }
    if (VEC == 1) {
      for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
        const float a = to_float(s[i]);
        float g = 0.f;
        if (CE) g = c1 * ex2((a - ms) * kLog2e) - (i == y ? lm_coef : 0.f);
        if (KL) {
          const float b = to_float(t[i]);
          const float qs = ex2((a - ms) * ltau) * cs;
          const float qt = ex2((b - mt) * ltau) * ct;
          A = fmaf(qt, b - a, A);
          P += qt;
          g = fmaf(kl_coef, qs - qt, g);
        }
        if (WRITE) s[i] = from_float<T>(g);
      }
    }
  }
  if (KL) {
    float ap[2] = {A, P};
    block_allreduce<2, false>(ap);
    A = ap[0];
    P = ap[1];
  }
  if (threadIdx.x == 0) {
    if (CE) ce_out[row] = static_cast<float>(double(ms) - double(sy) + log(double(S1)));
    if (KL) {
      // Once per row, in double: KL is a small difference of O(1) terms at large tau.
      const double c = (double(mt) - double(ms)) * inv_tau + log(double(St) / double(Ss));
      kl_out[row] = static_cast<float>(double(inv_tau) * A - c * P);
    }
  }
}

template <typename T, int VEC, bool CE, bool KL, bool WRITE>
void launch(T* zs, int64_t ldzs, const T* zt, int64_t ldzt, const int64_t* labels, int64_t rows, int64_t V,
            float inv_tau, float lm_coef, float kl_coef, int64_t ignore_index, float* ce, float* kl,
            cudaStream_t st) {
  // Enough threads to stream a row with 16-byte accesses; few for small vocabularies.
  const int threads = V >= 16384 ? 512 : (V >= 2048 ? 256 : 128);
  distill_rows_kernel<T, VEC, CE, KL, WRITE><<<static_cast<unsigned>(rows), threads, 0, st>>>(
      zs, ldzs, zt, ldzt, labels, V, inv_tau, lm_coef, kl_coef, ignore_index, ce, kl);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

void distill_head_rows_cuda(void* zs, int64_t ldzs, const void* zt, int64_t ldzt, DType dt, const int64_t* labels,
                            int64_t rows, int64_t vocab, float inv_tau, float lm_coef, float kl_coef,
                            int64_t ignore_index, float* ce_out, float* kl_out, bool write_grad, void* stream) {
  const char* op = "distill_head";
  if (rows < 0 || vocab < 0) fail(op, "negative shape");
  if (rows == 0) return;
  if (vocab == 0) fail(op, "vocabulary size must be positive");
  if (rows > 0x7fffffffLL) fail(op, "too many rows in one chunk");
  if (!zs || !labels) fail(op, "null data pointer");
  if (rows > 1 && (ldzs < vocab || (zt && ldzt < vocab))) fail(op, "row stride smaller than the vocabulary size");
  if (!(inv_tau > 0.f)) fail(op, "1/tau must be positive");
  const bool ce = ce_out != nullptr, kl = zt != nullptr && kl_out != nullptr;
  if (!ce && !kl) fail(op, "nothing to compute: neither the CE nor the KL term is enabled");
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  dispatch_cuda_dtype(dt, op, [&](auto* tp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    constexpr int VEC = 16 / sizeof(T);
    const bool vec = vocab % VEC == 0 && ldzs % VEC == 0 && aligned16(zs) &&
                     (!kl || (ldzt % VEC == 0 && aligned16(zt)));
    T* s = static_cast<T*>(zs);
    const T* t = static_cast<const T*>(zt);
    auto go = [&](auto vec_tag) {
      constexpr int V_ = decltype(vec_tag)::value;
#define LRC_DH_CASE(C, K, W)                                                                                   \
  if (ce == C && kl == K && write_grad == W)                                                                   \
    return launch<T, V_, C, K, W>(s, ldzs, t, ldzt, labels, rows, vocab, inv_tau, lm_coef, kl_coef, ignore_index, \
                                  ce_out, kl_out, st);
      LRC_DH_CASE(true, true, true)
      LRC_DH_CASE(true, true, false)
      LRC_DH_CASE(true, false, true)
      LRC_DH_CASE(true, false, false)
      LRC_DH_CASE(false, true, true)
      LRC_DH_CASE(false, true, false)
#undef LRC_DH_CASE
    };
    if (vec)
      go(std::integral_constant<int, VEC>{});
    else
      go(std::integral_constant<int, 1>{});
  });
  cuda_check(cudaGetLastError(), op, "distill_rows_kernel launch");
}

}  // namespace lrc
