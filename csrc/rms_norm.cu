// RMSNorm over the last dim: the RMS = true instantiation of norm.cuh (no mean, no bias).
#include "norm.cuh"
#include "ops.h"

namespace ff {

void rms_norm_forward(int dtype, uintptr_t x, uintptr_t res, uintptr_t w, uintptr_t y, uintptr_t res_out,
                      uintptr_t rstd, int64_t M, int64_t N, int64_t sx, int64_t sres, int64_t sy, int64_t sro,
                      double eps, bool vec, uintptr_t stream) {
  norm_forward<true>(dtype, x, res, w, 0, y, res_out, 0, rstd, M, N, sx, sres, sy, sro, eps, vec, stream);
}

void rms_norm_backward(int dtype, uintptr_t dy, uintptr_t x, uintptr_t w, uintptr_t rstd, uintptr_t dres,
                       uintptr_t dx, uintptr_t dw_part, uintptr_t dw_out, int64_t M, int64_t N, int64_t sdy,
                       int64_t sx, int64_t sdr, int64_t sdx, int64_t nparts, bool vec, uintptr_t stream) {
  norm_backward<true>(dtype, dy, x, w, 0, rstd, dres, dx, dw_part, 0, dw_out, 0, M, N, sdy, sx, sdr, sdx, nparts,
                      vec, stream);
}

}  // namespace ff
