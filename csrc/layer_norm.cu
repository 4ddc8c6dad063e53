// LayerNorm over the last dim: the RMS = false instantiation of norm.cuh.
#include "norm.cuh"
#include "ops.h"

namespace ff {

std::vector<LaunchLimit> norm_launch_limits() {
  return {{"norm_fwd_kernel", 0, kRowThreads, kRowCacheSmem, true},
          {"norm_bwd_kernel", 0, kRowThreads, kRowCacheSmem, true},
          {"column_sum_kernel", 0, kColumnSumThreads, 0, false}};
}

void layer_norm_forward(int dtype, uintptr_t x, uintptr_t res, uintptr_t w, uintptr_t b, uintptr_t y,
                        uintptr_t res_out, uintptr_t mean, uintptr_t rstd, int64_t M, int64_t N, int64_t sx,
                        int64_t sres, int64_t sy, int64_t sro, double eps, bool vec, uintptr_t stream) {
  require(mean != 0, "layer_norm_forward: mean buffer is null");
  norm_forward<false>(dtype, x, res, w, b, y, res_out, mean, rstd, M, N, sx, sres, sy, sro, eps, vec, stream);
}

void layer_norm_backward(int dtype, uintptr_t dy, uintptr_t x, uintptr_t w, uintptr_t mean, uintptr_t rstd,
                         uintptr_t dres, uintptr_t dx, uintptr_t dw_part, uintptr_t db_part, uintptr_t dw_out,
                         uintptr_t db_out, int64_t M, int64_t N, int64_t sdy, int64_t sx, int64_t sdr, int64_t sdx,
                         int64_t nparts, bool vec, uintptr_t stream) {
  require(mean != 0, "layer_norm_backward: mean is null");
  norm_backward<false>(dtype, dy, x, w, mean, rstd, dres, dx, dw_part, db_part, dw_out, db_out, M, N, sdy, sx, sdr,
                       sdx, nparts, vec, stream);
}

}  // namespace ff
