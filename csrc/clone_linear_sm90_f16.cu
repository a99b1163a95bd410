// The CUTLASS sm90 clone GEMMs for fp16 (both sides); see clone_linear_sm90.cuh.
#include "clone_linear_sm90.cuh"

namespace lrc {
namespace sm90 {
size_t gemm_workspace_f16(const Problem& p) { return workspace<cutlass::half_t>(p); }
void gemm_run_f16(const Problem& p) { run<cutlass::half_t>(p); }
}  // namespace sm90
}  // namespace lrc
