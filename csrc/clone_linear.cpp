#include "clone_linear.h"

#include <algorithm>
#include <type_traits>
#include <vector>

namespace lrc {
namespace {

const char* const kOp = "clone_linear";

// Fixed blocks of rows (by element count), summed in order: deterministic for any
// number of threads.
constexpr int64_t kBlockElems = 1 << 15;

int64_t rows_per_block(int64_t cols) { return std::max<int64_t>(1, kBlockElems / std::max<int64_t>(cols, 1)); }

// d may alias t (same pointer and row stride): every element of t is read before the
// same element of d is written, and no other element of t is read afterwards.
// w (nullable): per-row weights; row r's difference and its sum of squares are scaled by w[r].
template <typename T>
double epilogue(const T* y, int64_t ldy, const T* t, int64_t ldt, T* d, int64_t ldd, const float* w, int64_t rows,
                int64_t cols) {
  using Acc = decltype(load(y));  // float, double for double
  const int64_t rpb = rows_per_block(cols);
  const int64_t nblocks = (rows + rpb - 1) / rpb;
  std::vector<double> partial(nblocks, 0.0);
#pragma omp parallel for schedule(static) if (rows * cols > kBlockElems)
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int64_t r0 = blk * rpb, r1 = std::min(rows, r0 + rpb);
    double acc = 0.0;
    for (int64_t r = r0; r < r1; ++r) {
      const T* yr = y + r * ldy;
      const T* tr = t + r * ldt;
      T* dr = d + r * ldd;
      const Acc wr = w ? static_cast<Acc>(w[r]) : Acc(1);  // 1 * v == v: unweighted rows are unchanged
      Acc s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t c = 0;
      for (; c + 8 <= cols; c += 8) {
        Acc v[8];
        for (int k = 0; k < 8; ++k) v[k] = load(yr + c + k) - load(tr + c + k);
        for (int k = 0; k < 8; ++k) {
          s[k] += v[k] * v[k];
          store(dr + c + k, wr * v[k]);
        }
      }
      for (; c < cols; ++c) {
        const Acc v = load(yr + c) - load(tr + c);
        s[c & 7] += v * v;
        store(dr + c, wr * v);
      }
      acc += double(wr) *
             (((double(s[0]) + s[1]) + (double(s[2]) + s[3])) + ((double(s[4]) + s[5]) + (double(s[6]) + s[7])));
    }
    partial[blk] = acc;
  }
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

template <typename T>
void merge(const T* gy, int64_t ldgy, const T* d, int64_t ldd, T* g, int64_t ldg, int64_t rows, int64_t cols,
           double s) {
  using Acc = decltype(load(d));
  const Acc sa = static_cast<Acc>(s);
#pragma omp parallel for schedule(static) if (rows * cols > kBlockElems)
  for (int64_t r = 0; r < rows; ++r) {
    const T* dr = d + r * ldd;
    T* gr = g + r * ldg;
    if (gy) {
      const T* yr = gy + r * ldgy;
      for (int64_t c = 0; c < cols; ++c) store(gr + c, load(yr + c) + sa * load(dr + c));
    } else {
      for (int64_t c = 0; c < cols; ++c) store(gr + c, sa * load(dr + c));
    }
  }
}

void check_shape(int64_t rows, int64_t cols) {
  if (rows < 0 || cols < 0) fail(kOp, "negative shape");
}

}  // namespace

double clone_linear_epilogue_cpu(const void* y, int64_t ldy, const void* t, int64_t ldt, void* d, int64_t ldd,
                                 const float* w, int64_t rows, int64_t cols, DType dt, double inv_numel) {
  check_shape(rows, cols);
  if (rows == 0 || cols == 0) return 0.0 * inv_numel;
  if (!y || !t || !d) fail(kOp, "null data pointer");
  if (rows > 1 && (ldy < cols || ldt < cols || ldd < cols)) fail(kOp, "row stride smaller than the row width");
  return dispatch_dtype(dt, kOp, [&](auto* tp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    return epilogue<T>(static_cast<const T*>(y), ldy, static_cast<const T*>(t), ldt, static_cast<T*>(d), ldd, w,
                       rows, cols) *
           inv_numel;
  });
}

void clone_linear_merge_cpu(const void* gy, int64_t ldgy, const void* d, int64_t ldd, void* g, int64_t ldg,
                            int64_t rows, int64_t cols, DType dt, double s) {
  check_shape(rows, cols);
  if (rows == 0 || cols == 0) return;
  if (!d || !g) fail(kOp, "null data pointer");
  if (rows > 1 && ((gy && ldgy < cols) || ldd < cols || ldg < cols))
    fail(kOp, "row stride smaller than the row width");
  dispatch_dtype(dt, kOp, [&](auto* tp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    merge<T>(static_cast<const T*>(gy), ldgy, static_cast<const T*>(d), ldd, static_cast<T*>(g), ldg, rows, cols, s);
    return 0;
  });
}

}  // namespace lrc
