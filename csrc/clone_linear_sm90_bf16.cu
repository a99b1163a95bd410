// The CUTLASS sm90 clone GEMMs for bf16 (both sides); see clone_linear_sm90.cuh.
#include "clone_linear_sm90.cuh"

namespace lrc {
namespace sm90 {
size_t gemm_workspace_bf16(const Problem& p) { return workspace<cutlass::bfloat16_t>(p); }
void gemm_run_bf16(const Problem& p) { run<cutlass::bfloat16_t>(p); }
}  // namespace sm90
}  // namespace lrc
