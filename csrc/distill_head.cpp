#include "distill_head.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <thread>
#include <type_traits>
#include <vector>

namespace lrc {
namespace {

#if defined(__GNUC__)
#define LRC_DH_INLINE inline __attribute__((always_inline))
#else
#define LRC_DH_INLINE inline
#endif

// Elements per partial sum: summed in Acc lanes, then added to a double in order.
constexpr int64_t kBlock = 1024;

// exp in fp32, ~1e-7 relative (Cephes polynomial), for the max-shifted arguments here
// (x <= 0, finite). Written so that loops over it vectorise at -O3 without -ffast-math:
// no calls and no floating-point comparisons (GCC will not if-convert those under
// -ftrapping-math); the exponent is clamped as an integer, so x below -87 gives ~1e-38
// instead of a denormal or 0, which is negligible in every sum and gradient here.
LRC_DH_INLINE float exp_ps(float x) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * 1.44269504088896341f + kMagic;
  int32_t n;
  std::memcpy(&n, &t, 4);
  n -= 0x4B400000;  // round(x / ln 2)
  const float nf = t - kMagic;
  const float r = (x - nf * 0.693359375f) - nf * -2.12194440e-4f;  // |r| <= ln2 / 2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  n = n < -126 ? -126 : n;
  n = n > 127 ? 127 : n;
  const int32_t e = (n + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &e, 4);
  return y * scale;
}
LRC_DH_INLINE float exp_acc(float x) { return exp_ps(x); }
LRC_DH_INLINE double exp_acc(double x) { return std::exp(x); }

template <typename Acc>
struct RowResult {
  Acc ce, kl;
};

// Lanes of the partial sums: inner loops over kLanes elements vectorise (SLP) at -O3
// without -ffast-math, and the lanes are added in a fixed order.
constexpr int kLanes = 8;

template <typename Acc>
LRC_DH_INLINE double lanes_total(const Acc (&a)[kLanes]) {
  return ((double(a[0]) + a[1]) + (double(a[2]) + a[3])) + ((double(a[4]) + a[5]) + (double(a[6]) + a[7]));
}

// Max of a row. fp32: compared as order-preserving integers (branch-free, so it vectorises;
// a NaN wins, as it should); fp64: plain.
LRC_DH_INLINE int32_t ordered(float x) {
  int32_t i;
  std::memcpy(&i, &x, 4);
  return i ^ ((i >> 31) & 0x7fffffff);
}
LRC_DH_INLINE float row_max(const float* x, int64_t V) {
  int32_t m[kLanes];
  for (int k = 0; k < kLanes; ++k) m[k] = ordered(-std::numeric_limits<float>::infinity());
  const int64_t vmain = V - V % kLanes;
  for (int64_t v = 0; v < vmain; v += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      const int32_t o = ordered(x[v + k]);
      m[k] = o > m[k] ? o : m[k];
    }
  for (int64_t v = vmain; v < V; ++v) {
    const int32_t o = ordered(x[v]);
    m[0] = o > m[0] ? o : m[0];
  }
  int32_t r = m[0];
  for (int k = 1; k < kLanes; ++k) r = m[k] > r ? m[k] : r;
  r = r ^ ((r >> 31) & 0x7fffffff);
  float f;
  std::memcpy(&f, &r, 4);
  return f;
}
LRC_DH_INLINE double row_max(const double* x, int64_t V) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t v = 0; v < V; ++v) m = x[v] > m || std::isnan(x[v]) ? x[v] : m;
  return m;
}

// One row in Acc precision, in place: s holds the student logits and receives the
// gradient (when WRITE); t holds the teacher logits (when KL).
template <typename Acc, bool CE, bool KL, bool WRITE>
LRC_DH_INLINE RowResult<Acc> row(Acc* s, const Acc* t, int64_t V, int64_t y, Acc inv_tau, Acc lm_coef, Acc kl_coef) {
  // Pass 1, blockwise online softmax: per block of kBlock elements (in L1 after its max is
  // taken), update the running maxima ms, mt (rescaling the sums so far), then add
  // S1 = sum exp(s - ms), Ss = sum exp((s - ms)/tau), St = sum exp((t - mt)/tau), each in
  // kLanes lanes and added in order in double.
  Acc ms = -std::numeric_limits<Acc>::infinity(), mt = ms;
  double S1 = 0, Ss = 0, St = 0;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t b1 = std::min(V, b0 + kBlock);
    const Acc bs = row_max(s + b0, b1 - b0);
    if (bs > ms) {
      if (S1 != 0) S1 *= std::exp(double(ms) - double(bs));
      if (Ss != 0) Ss *= std::exp((double(ms) - double(bs)) * double(inv_tau));
      ms = bs;
    }
    if constexpr (KL) {
      const Acc bt = row_max(t + b0, b1 - b0);
      if (bt > mt) {
        if (St != 0) St *= std::exp((double(mt) - double(bt)) * double(inv_tau));
        mt = bt;
      }
    }
    Acc a1[kLanes] = {}, as[kLanes] = {}, at[kLanes] = {};
    const int64_t bmain = b0 + (b1 - b0) / kLanes * kLanes;
    int64_t v = b0;
    for (; v < bmain; v += kLanes)
      for (int k = 0; k < kLanes; ++k) {
        const Acc d = s[v + k] - ms;
        if constexpr (CE) a1[k] += exp_acc(d);
        if constexpr (KL) {
          as[k] += exp_acc(d * inv_tau);
          at[k] += exp_acc((t[v + k] - mt) * inv_tau);
        }
      }
    for (; v < b1; ++v) {
      const Acc d = s[v] - ms;
      if constexpr (CE) a1[0] += exp_acc(d);
      if constexpr (KL) {
        as[0] += exp_acc(d * inv_tau);
        at[0] += exp_acc((t[v] - mt) * inv_tau);
      }
    }
    if constexpr (CE) S1 += lanes_total(a1);
    if constexpr (KL) {
      Ss += lanes_total(as);
      St += lanes_total(at);
    }
  }
  const Acc sy = CE ? s[y] : Acc(0);
  const Acc c1 = CE ? Acc(lm_coef / S1) : Acc(0);
  const Acc cs = KL ? Acc(1.0 / Ss) : Acc(0), ct = KL ? Acc(1.0 / St) : Acc(0);
  // KL = sum p_T (t - s)/tau - [(mt - ms)/tau + log St - log Ss] * sum p_T; the sums
  // of p_T (t - s) and p_T are taken in the same pass that writes the gradient.
  double A = 0, P = 0;
  if constexpr (KL || WRITE) {
    for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
      const int64_t b1 = std::min(V, b0 + kBlock);
      Acc a[kLanes] = {}, p[kLanes] = {};
      auto step = [&](int64_t v, int k) {
        const Acc d = s[v] - ms;
        Acc g = 0;
        if constexpr (CE) g = c1 * exp_acc(d);
        if constexpr (KL) {
          const Acc ps = exp_acc(d * inv_tau) * cs;
          const Acc pt = exp_acc((t[v] - mt) * inv_tau) * ct;
          a[k] += pt * (t[v] - s[v]);
          p[k] += pt;
          g += kl_coef * (ps - pt);
        }
        if constexpr (WRITE) s[v] = g;
      };
      const int64_t bmain = b0 + (b1 - b0) / kLanes * kLanes;
      int64_t v = b0;
      for (; v < bmain; v += kLanes)
        for (int k = 0; k < kLanes; ++k) step(v + k, k);
      for (; v < b1; ++v) step(v, 0);
      A += lanes_total(a);
      P += lanes_total(p);
    }
    if constexpr (CE && WRITE) s[y] -= lm_coef;
  }
  RowResult<Acc> r{0, 0};
  if constexpr (CE) r.ce = static_cast<Acc>(double(ms) + std::log(S1) - double(sy));
  if constexpr (KL) {
    const double c = (double(mt) - double(ms)) * double(inv_tau) + std::log(St) - std::log(Ss);
    r.kl = static_cast<Acc>(double(inv_tau) * A - c * P);
  }
  return r;
}

// The row worker is compiled twice on x86-64 (AVX2 + FMA, and baseline) and picked at
// load time: the exp polynomial runs ~2x faster with 8 lanes and FMA.
#if defined(__x86_64__) && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 14) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define LRC_DH_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LRC_DH_CLONES
#endif

template <typename T, bool CE, bool KL, bool WRITE, typename Acc = decltype(load(static_cast<T*>(nullptr)))>
LRC_DH_CLONES void one_row(T* zr, const T* tr, int64_t V, int64_t y, double inv_tau, double lm_coef, double kl_coef,
                           Acc* sbuf, Acc* tbuf, Acc* ce, Acc* kl) {
  constexpr bool kDirect = std::is_same_v<T, Acc>;
  Acc* s;
  const Acc* t = nullptr;
  if constexpr (kDirect) {
    s = reinterpret_cast<Acc*>(zr);
    if constexpr (KL) t = reinterpret_cast<const Acc*>(tr);
  } else {
    for (int64_t v = 0; v < V; ++v) sbuf[v] = load(zr + v);
    if constexpr (KL)
      for (int64_t v = 0; v < V; ++v) tbuf[v] = load(tr + v);
    s = sbuf;
    t = tbuf;
  }
  const RowResult<Acc> res = row<Acc, CE, KL, WRITE>(s, t, V, y, Acc(inv_tau), Acc(lm_coef), Acc(kl_coef));
  if constexpr (WRITE && !kDirect)
    for (int64_t v = 0; v < V; ++v) store(zr + v, sbuf[v]);
  if constexpr (CE) *ce = res.ce;
  if constexpr (KL) *kl = res.kl;
}

// Rows are handed out one at a time to `threads` short-lived std::threads. Not OpenMP: this
// module's OpenMP runtime is not torch's, and two runtimes whose idle threads spin-wait
// on 2 cores slow each other (and every torch GEMM between our calls) down several-fold.
template <typename F>
void parallel_rows(int64_t rows, int64_t work, int threads, F&& f) {
  const int nt = static_cast<int>(std::min<int64_t>(std::max(threads, 1), rows));
  if (nt <= 1 || work < (int64_t(1) << 18)) {
    f(int64_t(0), rows, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  auto worker = [&](int id) {
    for (int64_t r; (r = next.fetch_add(1)) < rows;) f(r, r + 1, id);
  };
  std::vector<std::thread> pool;
  pool.reserve(nt - 1);
  for (int i = 1; i < nt; ++i) pool.emplace_back(worker, i);
  worker(0);
  for (auto& t : pool) t.join();
}

template <typename T, bool CE, bool KL, bool WRITE>
void run(T* zs, int64_t ldzs, const T* zt, int64_t ldzt, const int64_t* labels, int64_t rows, int64_t V,
         double inv_tau, double lm_coef, double kl_coef, int64_t ignore_index, void* ce_out, void* kl_out,
         int threads, std::atomic<int64_t>& bad_row) {
  using Acc = decltype(load(zs));  // float, or double for fp64
  constexpr bool kDirect = std::is_same_v<T, Acc>;
  Acc* ce = static_cast<Acc*>(ce_out);
  Acc* kl = static_cast<Acc*>(kl_out);
  const int nt = static_cast<int>(std::min<int64_t>(std::max(threads, 1), rows));
  // Per-thread conversion buffers for bf16 / fp16 rows.
  std::vector<std::vector<Acc>> sbuf(nt), tbuf(nt);
  if constexpr (!kDirect)
    for (int i = 0; i < nt; ++i) {
      sbuf[i].resize(V);
      if constexpr (KL) tbuf[i].resize(V);
    }
  parallel_rows(rows, rows * V, nt, [&](int64_t r0, int64_t r1, int id) {
    for (int64_t r = r0; r < r1; ++r) {
      T* zr = zs + r * ldzs;
      const T* tr = KL ? zt + r * ldzt : nullptr;
      const int64_t y = labels[r];
      if (y == ignore_index || y < 0 || y >= V) {
        if (y != ignore_index) {
          int64_t none = -1;
          bad_row.compare_exchange_strong(none, r);
        }
        if constexpr (WRITE)
          for (int64_t v = 0; v < V; ++v) store(zr + v, 0.0);
        if constexpr (CE) ce[r] = 0;
        if constexpr (KL) kl[r] = 0;
        continue;
      }
      one_row<T, CE, KL, WRITE>(zr, tr, V, y, inv_tau, lm_coef, kl_coef, sbuf[id].data(), tbuf[id].data(),
                                CE ? ce + r : nullptr, KL ? kl + r : nullptr);
    }
  });
}

template <typename T>
void dispatch_flags(bool ce, bool kl, bool write, T* zs, int64_t ldzs, const T* zt, int64_t ldzt,
                    const int64_t* labels, int64_t rows, int64_t V, double inv_tau, double lm_coef, double kl_coef,
                    int64_t ignore_index, void* ce_out, void* kl_out, int threads, std::atomic<int64_t>& bad) {
#define LRC_DH_CASE(C, K, W)                                                                                    \
  if (ce == C && kl == K && write == W)                                                                         \
    return run<T, C, K, W>(zs, ldzs, zt, ldzt, labels, rows, V, inv_tau, lm_coef, kl_coef, ignore_index, ce_out, \
                           kl_out, threads, bad);
  LRC_DH_CASE(true, true, true)
  LRC_DH_CASE(true, true, false)
  LRC_DH_CASE(true, false, true)
  LRC_DH_CASE(true, false, false)
  LRC_DH_CASE(false, true, true)
  LRC_DH_CASE(false, true, false)
#undef LRC_DH_CASE
  fail("distill_head", "nothing to compute: neither the CE nor the KL term is enabled");
}

}  // namespace

void distill_head_rows_cpu(void* zs, int64_t ldzs, const void* zt, int64_t ldzt, DType dt, const int64_t* labels,
                           int64_t rows, int64_t vocab, double inv_tau, double lm_coef, double kl_coef,
                           int64_t ignore_index, void* ce_out, void* kl_out, bool write_grad, int threads) {
  const char* op = "distill_head";
  if (rows < 0 || vocab < 0) fail(op, "negative shape");
  if (rows == 0) return;
  if (vocab == 0) fail(op, "vocabulary size must be positive");
  if (!zs || !labels) fail(op, "null data pointer");
  if (rows > 1 && (ldzs < vocab || (zt && ldzt < vocab))) fail(op, "row stride smaller than the vocabulary size");
  if (!(inv_tau > 0) || !std::isfinite(inv_tau)) fail(op, "1/tau must be positive and finite");
  const bool ce = ce_out != nullptr, kl = zt != nullptr && kl_out != nullptr;
  std::atomic<int64_t> bad{-1};
  dispatch_dtype(dt, op, [&](auto* tp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    dispatch_flags<T>(ce, kl, write_grad, static_cast<T*>(zs), ldzs, static_cast<const T*>(zt), ldzt, labels, rows,
                      vocab, inv_tau, lm_coef, kl_coef, ignore_index, ce_out, kl_out, threads, bad);
  });
  const int64_t r = bad.load();
  if (r >= 0)
    fail(op, "labels[" + std::to_string(r) + "] = " + std::to_string(labels[r]) + " is outside [0, " +
                 std::to_string(vocab) + ") and is not the ignore index " + std::to_string(ignore_index));
}

}  // namespace lrc
