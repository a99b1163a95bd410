// CUTLASS 3.x sm90 GEMMs with the clone MSE in the epilogue (included by one translation
// unit per dtype; compiled for sm_90a only).
//
// Both kernels: TMA warp-specialized cooperative mainloop (2 consumer warpgroups, 128x128x64
// CTA tile, 2x1 cluster so the B tile is multicast to the CTA pair), persistent data-parallel
// tile scheduler (no split-K / stream-K: every output tile is produced by exactly one CTA in
// one fixed order, so results are bit-reproducible). The epilogue is a visitor tree:
//
//   input side   D = d = SqPartials( (Aux:y <- round_T(acc + bias_row)) - C )      C = y_T
//   output side  D = d = SqPartials( C - acc )                                       C = y
//
// SqPartials passes d through (fp32) and accumulates d^2 per row of each CTA tile in
// registers (fixed per-thread order), then reduces across the lanes that share a row with a
// fixed shuffle tree and writes one fp32 per (row, N-tile); no atomics. The caller sums those
// partials in a fixed order. d^2 is taken from the fp32 difference of the rounded y and the
// target, as the cuBLAS path's epilogue kernel does; d itself is stored rounded to T.
//
// Not fused: the backward's merge g = grad_y + s * d (s known only in the backward). g is the
// A operand of grad_x = g W_S and grad_W_S = g^T x; this mainloop moves operands TMA -> smem ->
// wgmma with no register stage where s * d could be added (CUTLASS's register-staged A
// transform is the mixed-dtype one, over a single tensor), and splitting by linearity doubles
// the GEMM FLOPs to save one elementwise pass, so the merge kernel stays.
#pragma once
#include <stdexcept>
#include <string>

#include "clone_linear_sm90.h"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

namespace lrc {
namespace sm90 {

using namespace cute;
namespace fus = cutlass::epilogue::fusion;

// Register-stage reduction of SqPartials: acc + x^2.
template <class X>
struct PlusSquare {
  CUTLASS_HOST_DEVICE X operator()(X const& acc, X const& x) const { return acc + x * x; }
};

template <class T, bool OUT_SIDE>
struct Kernel {
  static constexpr int kAlign = 16 / sizeof(T);  // 16-byte TMA alignment
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
  using TileShape = Shape<Int<kTileM>, Int<kTileN>, _64>;
  using ClusterShape = Shape<_2, _1, _1>;
  using MainSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using EpiSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
  using EpiTileType = cutlass::epilogue::collective::EpilogueTileAuto;
  using RowMajor = cutlass::layout::RowMajor;
  // Input side: B = W_S (N, K) row-major is CUTLASS's column-major (K-major) B.
  // Output side: B = P (K, N) row-major is CUTLASS's row-major (N-major) B.
  using LayoutB = cute::conditional_t<OUT_SIDE, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor>;

  using EpiDesc = cutlass::epilogue::collective::detail::EpilogueDescriptor<TileShape, EpiTileType, T, T, EpiSchedule>;
  using AuxDesc = cutlass::epilogue::collective::detail::AuxStoreDescriptor<EpiDesc, RowMajor, T>;

  // One fp32 per (row, N-tile); FinalReduction=false: written to the caller's buffer, no atomics.
  using SqPartials = fus::Sm90ColReduction<PlusSquare, cutlass::plus, cutlass::plus, 0, TileShape, float, float,
                                           kRound, Stride<_1, _0, _0>, 4, /*EnableNullptr=*/false,
                                           /*FinalReduction=*/false>;

  // Input side. Bias: one instantiation for both cases (a null pointer broadcasts 0).
  using Bias = fus::Sm90RowBroadcast<0, TileShape, T, float, Stride<_0, _1, int64_t>, kAlign>;
  using YRounded = fus::Sm90EVT<fus::Sm90Compute<cutlass::plus, T, float, kRound>, fus::Sm90AccFetch, Bias>;
  using YStore = fus::Sm90EVT<fus::Sm90AuxStore<AuxDesc::Stages, typename EpiDesc::EpilogueTile, T, kRound,
                                                typename AuxDesc::Stride, typename AuxDesc::SmemLayoutAtom,
                                                typename AuxDesc::CopyOpR2S, kAlign, /*EnableNullptr=*/false>,
                              YRounded>;
  using InDiff = fus::Sm90EVT<fus::Sm90Compute<cutlass::minus, float, float, kRound>, YStore, fus::Sm90SrcFetch<T>>;
  // Output side: t = acc never leaves registers.
  using OutDiff =
      fus::Sm90EVT<fus::Sm90Compute<cutlass::minus, float, float, kRound>, fus::Sm90SrcFetch<T>, fus::Sm90AccFetch>;
  using Fusion = fus::Sm90EVT<SqPartials, cute::conditional_t<OUT_SIDE, OutDiff, InDiff>>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape, EpiTileType, float, float, T,
      RowMajor, kAlign, T, RowMajor, kAlign, EpiSchedule, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, T, RowMajor, kAlign, T, LayoutB, kAlign, float, TileShape,
      ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      MainSchedule>::CollectiveOp;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  using StrideA = typename GemmKernel::StrideA;
  using StrideB = typename GemmKernel::StrideB;
  using StrideC = typename GemmKernel::StrideC;
  using StrideD = typename GemmKernel::StrideD;

  static typename Fusion::Arguments fusion_args(const Problem& p) {
    typename SqPartials::Arguments partials{p.partials, 0.f, {}};
    if constexpr (OUT_SIDE) {
      return {{{}, {}, {}}, partials};  // {{C, acc, minus}, partials}
    } else {
      typename Bias::Arguments bias{static_cast<const T*>(p.bias), T(0), {_0{}, _1{}, int64_t(0)}};
      typename YStore::Arguments ystore{{{}, bias, {}}, {static_cast<T*>(p.aux), make_stride(p.ldaux, _1{}, int64_t(0))}};
      return {{ystore, {}, {}}, partials};  // {{y, C, minus}, partials}
    }
  }

  static typename Gemm::Arguments arguments(const Problem& p) {
    StrideA sa = make_stride(p.lda, _1{}, int64_t(0));
    StrideB sb;
    if constexpr (OUT_SIDE)
      sb = make_stride(_1{}, p.ldb, int64_t(0));  // (n, k) -> n + k * ldb
    else
      sb = make_stride(p.ldb, _1{}, int64_t(0));  // (n, k) -> n * ldb + k
    StrideC sc = make_stride(p.ldc, _1{}, int64_t(0));
    StrideD sd = make_stride(p.ldd, _1{}, int64_t(0));
    cutlass::KernelHardwareInfo hw;
    hw.sm_count = p.sm_count;
    return {cutlass::gemm::GemmUniversalMode::kGemm,
            {p.m, p.n, p.k, 1},
            {static_cast<const T*>(p.a), sa, static_cast<const T*>(p.b), sb},
            {fusion_args(p), static_cast<const T*>(p.c), sc, static_cast<T*>(p.d), sd},
            hw};
  }

  static size_t workspace(const Problem& p) { return Gemm::get_workspace_size(arguments(p)); }

  static void run(const Problem& p) {
    Gemm gemm;
    auto args = arguments(p);
    cutlass::Status st = gemm.can_implement(args);
    if (st != cutlass::Status::kSuccess)
      throw std::runtime_error(std::string("clone_linear: the CUTLASS sm90 kernel cannot run this problem: ") +
                               cutlassGetStatusString(st));
    st = gemm.initialize(args, p.workspace, p.stream);
    if (st == cutlass::Status::kSuccess) st = gemm.run(p.stream);
    if (st != cutlass::Status::kSuccess)
      throw std::runtime_error(std::string("clone_linear: CUTLASS sm90 kernel launch failed: ") +
                               cutlassGetStatusString(st) + " (" + cudaGetErrorString(cudaGetLastError()) + ")");
  }
};

template <class T>
size_t workspace(const Problem& p) {
  return p.out_side ? Kernel<T, true>::workspace(p) : Kernel<T, false>::workspace(p);
}

template <class T>
void run(const Problem& p) {
  if (p.out_side)
    Kernel<T, true>::run(p);
  else
    Kernel<T, false>::run(p);
}

}  // namespace sm90
}  // namespace lrc
