#include "mse_grad.h"

#include <algorithm>
#include <vector>

namespace lrc {
namespace {

// Fixed blocks of rows (by element count), summed in order: deterministic for any
// number of threads.
constexpr int64_t kBlockElems = 1 << 15;

template <typename T, typename G>
double run(const T* a, int64_t lda, const T* b, int64_t ldb, int64_t rows, int64_t cols, G* g, int64_t ldg,
           double scale) {
  const int64_t rows_per_block = std::max<int64_t>(1, kBlockElems / std::max<int64_t>(cols, 1));
  const int64_t nblocks = (rows + rows_per_block - 1) / rows_per_block;
  std::vector<double> partial(nblocks, 0.0);
#pragma omp parallel for schedule(static) if (rows * cols > kBlockElems)
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int64_t r0 = blk * rows_per_block, r1 = std::min(rows, r0 + rows_per_block);
    double acc = 0.0;
    for (int64_t r = r0; r < r1; ++r) {
      const T* ar = a + r * lda;
      const T* br = b + r * ldb;
      // Row in fp32 (fp64 for fp64) lanes; 8 partial sums let the compiler vectorise.
      using Acc = decltype(load(ar));
      Acc s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t c = 0;
      if (g) {
        G* gr = g + r * ldg;
        for (; c < cols; ++c) {
          Acc d = load(ar + c) - load(br + c);
          s[c & 7] += d * d;
          store(gr + c, scale * d);
        }
      } else {
        for (; c + 8 <= cols; c += 8)
          for (int k = 0; k < 8; ++k) {
            Acc d = load(ar + c + k) - load(br + c + k);
            s[k] += d * d;
          }
        for (; c < cols; ++c) {
          Acc d = load(ar + c) - load(br + c);
          s[c & 7] += d * d;
        }
      }
      acc += ((double(s[0]) + s[1]) + (double(s[2]) + s[3])) + ((double(s[4]) + s[5]) + (double(s[6]) + s[7]));
    }
    partial[blk] = acc;
  }
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

}  // namespace

double mse_grad_cpu(const void* a, int64_t lda, const void* b, int64_t ldb, int64_t rows, int64_t cols,
                    DType dt, void* g, int64_t ldg, DType gdt, double scale) {
  const char* op = "mse_grad";
  if (rows < 0 || cols < 0) fail(op, "negative shape");
  if (rows == 0 || cols == 0) return 0.0;
  if (!a || !b) fail(op, "null data pointer");
  if (rows > 1 && (lda < cols || ldb < cols || (g && ldg < cols))) fail(op, "row stride smaller than the row width");
  return dispatch_dtype(dt, op, [&](auto* tp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    const T* ta = static_cast<const T*>(a);
    const T* tb = static_cast<const T*>(b);
    if (!g) return run<T, T>(ta, lda, tb, ldb, rows, cols, nullptr, 0, scale);
    return dispatch_dtype(gdt, op, [&](auto* gp) {
      using G = std::remove_pointer_t<decltype(gp)>;
      return run<T, G>(ta, lda, tb, ldb, rows, cols, static_cast<G*>(g), ldg, scale);
    });
  });
}

}  // namespace lrc
