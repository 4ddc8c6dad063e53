// Softmax over the last dim of (M, N) rows, forward and backward.
// forward reads M*N, writes M*N; backward reads 2*M*N, writes M*N. One block per row; the row
// is kept in shared memory (fp32) when it fits the device (row_cache_smem), so global memory is
// read once.
#include "common.cuh"
#include "ops.h"

namespace ff {
namespace {

// y = exp(x - max) / sum(exp(x - max)); an all -inf row gives NaN, as torch.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kRowThreads, 1) softmax_fwd_kernel(const T* __restrict__ x,  // input, (M, N), row stride sx
                                   T* __restrict__ y,        // output, (M, N), row stride sy
                                   int64_t M, int64_t N, int64_t sx, int64_t sy, bool cached) {
  extern __shared__ float cache[];  // N floats when `cached`
  __shared__ float scratch[32];
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const T* xr = x + row * sx;
    T* yr = y + row * sy;
    float m = -INFINITY;
    for_chunks<T, VEC>(N, [&](int64_t j, auto w) {
      constexpr int W = decltype(w)::value;
      float a[W];
      load_f<W>(xr + j, a);
#pragma unroll
      for (int k = 0; k < W; ++k) m = fmaxf(m, a[k]);
      if (cached) cache_store<W>(cache, j, a);
    });
    m = block_max(m, scratch);
    float s = 0.f;
    for_chunks<T, VEC>(N, [&](int64_t j, auto w) {
      constexpr int W = decltype(w)::value;
      float a[W];
      reload_f<W>(xr, cache, cached, j, a);
#pragma unroll
      for (int k = 0; k < W; ++k) s += __expf(a[k] - m);
    });
    const float inv = 1.f / block_sum(s, scratch);
    for_chunks<T, VEC>(N, [&](int64_t j, auto w) {
      constexpr int W = decltype(w)::value;
      float a[W];
      reload_f<W>(xr, cache, cached, j, a);
#pragma unroll
      for (int k = 0; k < W; ++k) a[k] = __expf(a[k] - m) * inv;
      store_f<W>(yr + j, a);
    });
  }
}

// dx = y * (dy - sum(dy * y))
template <typename T, bool VEC>
__global__ void __launch_bounds__(kRowThreads, 1) softmax_bwd_kernel(const T* __restrict__ dy,  // grad of y, (M, N), row stride sdy
                                   const T* __restrict__ y,   // forward output, (M, N), row stride sy
                                   T* __restrict__ dx,        // grad of x, (M, N), row stride sdx
                                   int64_t M, int64_t N, int64_t sdy, int64_t sy, int64_t sdx, bool cached) {
  extern __shared__ float cache[];  // 2N floats when `cached`: dy then y
  __shared__ float scratch[32];
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const T* dyr = dy + row * sdy;
    const T* yr = y + row * sy;
    T* dxr = dx + row * sdx;
    float dot = 0.f;
    for_chunks<T, VEC>(N, [&](int64_t j, auto w) {
      constexpr int W = decltype(w)::value;
      float g[W], p[W];
      load_f<W>(dyr + j, g);
      load_f<W>(yr + j, p);
#pragma unroll
      for (int k = 0; k < W; ++k) dot += g[k] * p[k];
      if (cached) {
        cache_store<W>(cache, j, g);
        cache_store<W>(cache + N, j, p);
      }
    });
    dot = block_sum(dot, scratch);
    for_chunks<T, VEC>(N, [&](int64_t j, auto w) {
      constexpr int W = decltype(w)::value;
      float g[W], p[W];
      reload_f<W>(dyr, cache, cached, j, g);
      reload_f<W>(yr, cache + N, cached, j, p);
#pragma unroll
      for (int k = 0; k < W; ++k) g[k] = p[k] * (g[k] - dot);
      store_f<W>(dxr + j, g);
    });
  }
}

}  // namespace

std::vector<LaunchLimit> softmax_launch_limits() {
  return {{"softmax_fwd_kernel", 0, kRowThreads, kRowCacheSmem, true},
          {"softmax_bwd_kernel", 0, kRowThreads, kRowCacheSmem, true}};
}

void softmax_forward(int dtype, uintptr_t x, uintptr_t y, int64_t M, int64_t N, int64_t sx, int64_t sy,
                     bool vec, uintptr_t stream) {
  require(M >= 0 && N >= 0, "softmax_forward: negative size");
  if (M == 0 || N == 0) return;
  const unsigned blocks = unsigned(M < kMaxRowBlocks ? M : kMaxRowBlocks);
  FF_DISPATCH(dtype, T, {
    auto kernel = vec ? softmax_fwd_kernel<T, true> : softmax_fwd_kernel<T, false>;
    const int64_t smem = row_cache_smem(kernel, N * 4);
    kernel<<<blocks, row_threads(N, vec ? kVec<T> : 1), smem, as_stream(stream)>>>(
        ptr<const T>(x), ptr<T>(y), M, N, sx, sy, smem > 0);
  });
  FF_LAUNCH_CHECK("softmax_fwd_kernel");
}

void softmax_backward(int dtype, uintptr_t dy, uintptr_t y, uintptr_t dx, int64_t M, int64_t N, int64_t sdy,
                      int64_t sy, int64_t sdx, bool vec, uintptr_t stream) {
  require(M >= 0 && N >= 0, "softmax_backward: negative size");
  if (M == 0 || N == 0) return;
  const unsigned blocks = unsigned(M < kMaxRowBlocks ? M : kMaxRowBlocks);
  FF_DISPATCH(dtype, T, {
    auto kernel = vec ? softmax_bwd_kernel<T, true> : softmax_bwd_kernel<T, false>;
    const int64_t smem = row_cache_smem(kernel, N * 8);
    kernel<<<blocks, row_threads(N, vec ? kVec<T> : 1), smem, as_stream(stream)>>>(
        ptr<const T>(dy), ptr<const T>(y), ptr<T>(dx), M, N, sdy, sy, sdx, smem > 0);
  });
  FF_LAUNCH_CHECK("softmax_bwd_kernel");
}

}  // namespace ff
