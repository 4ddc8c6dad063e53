// Row norms over the last dim of (M, N) rows, shared by layer_norm.cu (RMS = false) and
// rms_norm.cu (RMS = true). Statistics in fp32; weight and bias arrive as fp32 (N,) vectors.
//
// forward  reads M*N (x) [+ M*N residual], writes M*N (y) [+ M*N residual_out] + 2M floats.
// backward reads 2*M*N [+ M*N grad_residual_out], writes M*N + grid*N partials per dw/db.
// A row is cached in shared memory (fp32) when it fits the device (row_cache_smem), so each input
// is read once.
//
// dW/dB are deterministic: block b owns a fixed row range and writes its column sums to
// partial[b, :] (each column is always handled by the same thread: no race, no atomics); a
// second kernel sums the partials over b in a fixed order.
#pragma once

#include "common.cuh"

namespace ff {
namespace {  // each including .cu gets its own copy of these kernels

constexpr int kColumnSumThreads = 256;

// h = x (+ residual); y = (h - mean) * rstd * w + b   (RMS: mean = 0, no b)
template <typename T, bool VEC, bool RMS>
__global__ void __launch_bounds__(kRowThreads, 1) norm_fwd_kernel(const T* __restrict__ x,      // input, (M, N), row stride sx
                                const T* __restrict__ res,    // residual or null, (M, N), row stride sres
                                const float* __restrict__ w,  // weight or null, (N,)
                                const float* __restrict__ b,  // bias or null, (N,)
                                T* __restrict__ y,            // output, (M, N), row stride sy
                                T* __restrict__ res_out,      // h or null, (M, N), row stride sro
                                float* __restrict__ mean_out, // (M,) or null (RMS)
                                float* __restrict__ rstd_out, // (M,)
                                int64_t M, int64_t N, int64_t sx, int64_t sres, int64_t sy, int64_t sro,
                                float eps, bool cached) {
  extern __shared__ float cache[];  // h, N floats when `cached`
  __shared__ float scratch[32];
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const T* xr = x + row * sx;
    const T* rr = res ? res + row * sres : nullptr;
    float s1 = 0.f;
    for_chunks<T, VEC>(N, [&](int64_t j, auto w_) {
      constexpr int W = decltype(w_)::value;
      float h[W];
      load_f<W>(xr + j, h);
      if (rr) {
        float r[W];
        load_f<W>(rr + j, r);
#pragma unroll
        for (int k = 0; k < W; ++k) h[k] += r[k];
        store_f<W>(res_out + row * sro + j, h);
      }
#pragma unroll
      for (int k = 0; k < W; ++k) s1 += RMS ? h[k] * h[k] : h[k];
      if (cached) cache_store<W>(cache, j, h);
    });
    s1 = block_sum(s1, scratch);
    // fetch h again: from the cache, else from global memory
    auto fetch = [&](int64_t j, float* h, int W) {
      if (cached) {
        for (int k = 0; k < W; ++k) h[k] = cache[j + k];
      } else {
        for (int k = 0; k < W; ++k) h[k] = to_float(xr[j + k]) + (rr ? to_float(rr[j + k]) : 0.f);
      }
    };
    float mean = 0.f, rstd;
    if constexpr (RMS) {
      rstd = rsqrtf(s1 / float(N) + eps);
    } else {
      mean = s1 / float(N);
      float s2 = 0.f;  // two-pass variance: no cancellation for rows far from zero mean
      for_chunks<T, VEC>(N, [&](int64_t j, auto w_) {
        constexpr int W = decltype(w_)::value;
        float h[W];
        fetch(j, h, W);
#pragma unroll
        for (int k = 0; k < W; ++k) s2 += (h[k] - mean) * (h[k] - mean);
      });
      rstd = rsqrtf(block_sum(s2, scratch) / float(N) + eps);
    }
    T* yr = y + row * sy;
    for_chunks<T, VEC>(N, [&](int64_t j, auto w_) {
      constexpr int W = decltype(w_)::value;
      float h[W];
      fetch(j, h, W);
#pragma unroll
      for (int k = 0; k < W; ++k) {
        float v = (h[k] - mean) * rstd;
        if (w) v *= w[j + k];
        if (!RMS && b) v += b[j + k];
        h[k] = v;
      }
      store_f<W>(yr + j, h);
    });
    if (threadIdx.x == 0) {
      if (!RMS) mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
  }
}

// xhat = (x - mean) * rstd, g = dy * w:
// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dres)   (RMS: without mean(g))
// dw_part[blk] = sum over the block's rows of dy * xhat, db_part[blk] = sum of dy.
template <typename T, bool VEC, bool RMS>
__global__ void __launch_bounds__(kRowThreads, 1) norm_bwd_kernel(const T* __restrict__ dy,       // grad of y, (M, N), row stride sdy
                                const T* __restrict__ x,        // normalized input h, (M, N), row stride sx
                                const float* __restrict__ w,    // weight or null, (N,)
                                const float* __restrict__ mean, // (M,) or null (RMS)
                                const float* __restrict__ rstd, // (M,)
                                const T* __restrict__ dres,     // grad of residual_out or null, row stride sdr
                                T* __restrict__ dx,             // grad of x, (M, N), row stride sdx
                                float* __restrict__ dw_part,    // (gridDim.x, N) or null
                                float* __restrict__ db_part,    // (gridDim.x, N) or null
                                int64_t M, int64_t N, int64_t sdy, int64_t sx, int64_t sdr, int64_t sdx,
                                int64_t rows_per_block, bool cached) {
  extern __shared__ float cache[];  // 2N floats when `cached`: dy then xhat
  __shared__ float scratch[32];
  const int64_t r0 = int64_t(blockIdx.x) * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < M ? r0 + rows_per_block : M;
  float* dwp = dw_part ? dw_part + int64_t(blockIdx.x) * N : nullptr;
  float* dbp = db_part ? db_part + int64_t(blockIdx.x) * N : nullptr;
  if (r0 >= r1) {  // a block without rows still owns a partial row: zero it
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      if (dwp) dwp[j] = 0.f;
      if (dbp) dbp[j] = 0.f;
    }
    return;
  }
  for (int64_t row = r0; row < r1; ++row) {
    const bool first = row == r0;
    const T* dyr = dy + row * sdy;
    const T* xr = x + row * sx;
    const float mu = RMS ? 0.f : mean[row];
    const float rs = rstd[row];
    auto fetch = [&](int64_t j, float* g, float* xh, int W) {
      if (cached) {
        for (int k = 0; k < W; ++k) {
          g[k] = cache[j + k];
          xh[k] = cache[N + j + k];
        }
      } else {
        for (int k = 0; k < W; ++k) {
          g[k] = to_float(dyr[j + k]);
          xh[k] = (to_float(xr[j + k]) - mu) * rs;
        }
      }
    };
    float sg = 0.f, sgx = 0.f;
    for_chunks<T, VEC>(N, [&](int64_t j, auto w_) {
      constexpr int W = decltype(w_)::value;
      float g[W], xh[W];
      load_f<W>(dyr + j, g);
      load_f<W>(xr + j, xh);
#pragma unroll
      for (int k = 0; k < W; ++k) {
        xh[k] = (xh[k] - mu) * rs;
        const float gw = w ? g[k] * w[j + k] : g[k];
        sg += gw;
        sgx += gw * xh[k];
      }
      if (cached) {
        cache_store<W>(cache, j, g);
        cache_store<W>(cache + N, j, xh);
      }
    });
    const float c1 = RMS ? 0.f : block_sum(sg, scratch) / float(N);
    const float c2 = block_sum(sgx, scratch) / float(N);
    const T* dr = dres ? dres + row * sdr : nullptr;
    T* dxr = dx + row * sdx;
    for_chunks<T, VEC>(N, [&](int64_t j, auto w_) {
      constexpr int W = decltype(w_)::value;
      float g[W], xh[W], out[W];
      fetch(j, g, xh, W);
      if (dr) {
        load_f<W>(dr + j, out);
      } else {
#pragma unroll
        for (int k = 0; k < W; ++k) out[k] = 0.f;
      }
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const float gw = w ? g[k] * w[j + k] : g[k];
        out[k] += rs * (gw - c1 - xh[k] * c2);
        if (dwp) dwp[j + k] = (first ? 0.f : dwp[j + k]) + g[k] * xh[k];
        if (dbp) dbp[j + k] = (first ? 0.f : dbp[j + k]) + g[k];
      }
      store_f<W>(dxr + j, out);
    });
  }
}

// out[j] = sum over b of part[b, j], b in order: the deterministic second reduction.
__global__ void __launch_bounds__(kColumnSumThreads, 1) column_sum_kernel(const float* __restrict__ part,  // (nparts, N)
                                  float* __restrict__ out,         // (N,)
                                  int64_t nparts, int64_t N) {
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < N; j += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int64_t b = 0; b < nparts; ++b) s += part[b * N + j];
    out[j] = s;
  }
}

template <bool RMS>
void norm_forward(int dtype, uintptr_t x, uintptr_t res, uintptr_t w, uintptr_t b, uintptr_t y, uintptr_t res_out,
                  uintptr_t mean, uintptr_t rstd, int64_t M, int64_t N, int64_t sx, int64_t sres, int64_t sy,
                  int64_t sro, double eps, bool vec, uintptr_t stream) {
  require(M >= 0 && N >= 0, "norm forward: negative size");
  require((res == 0) == (res_out == 0), "norm forward: residual and residual_out go together");
  if (M == 0 || N == 0) return;
  const unsigned blocks = unsigned(M < kMaxRowBlocks ? M : kMaxRowBlocks);
  FF_DISPATCH(dtype, T, {
    auto kernel = vec ? norm_fwd_kernel<T, true, RMS> : norm_fwd_kernel<T, false, RMS>;
    const int64_t smem = row_cache_smem(kernel, N * 4);
    kernel<<<blocks, row_threads(N, vec ? kVec<T> : 1), smem, as_stream(stream)>>>(
        ptr<const T>(x), ptr<const T>(res), ptr<const float>(w), ptr<const float>(b), ptr<T>(y), ptr<T>(res_out),
        ptr<float>(mean), ptr<float>(rstd), M, N, sx, sres, sy, sro, float(eps), smem > 0);
  });
  FF_LAUNCH_CHECK(RMS ? "rms_norm_fwd_kernel" : "layer_norm_fwd_kernel");
}

// dw/db partial buffers hold `nparts` rows of N floats; dw_out/db_out receive their sums.
template <bool RMS>
void norm_backward(int dtype, uintptr_t dy, uintptr_t x, uintptr_t w, uintptr_t mean, uintptr_t rstd, uintptr_t dres,
                   uintptr_t dx, uintptr_t dw_part, uintptr_t db_part, uintptr_t dw_out, uintptr_t db_out,
                   int64_t M, int64_t N, int64_t sdy, int64_t sx, int64_t sdr, int64_t sdx, int64_t nparts, bool vec,
                   uintptr_t stream) {
  require(M >= 0 && N >= 0, "norm backward: negative size");
  require(nparts >= 1 && nparts <= (int64_t(1) << 31) - 1, "norm backward: nparts out of range");
  require((dw_part == 0) == (dw_out == 0) && (db_part == 0) == (db_out == 0),
          "norm backward: partial and output buffers go together");
  if (M == 0 || N == 0) return;
  const int64_t rows_per_block = (M + nparts - 1) / nparts;
  FF_DISPATCH(dtype, T, {
    auto kernel = vec ? norm_bwd_kernel<T, true, RMS> : norm_bwd_kernel<T, false, RMS>;
    const int64_t smem = row_cache_smem(kernel, N * 8);
    kernel<<<unsigned(nparts), row_threads(N, vec ? kVec<T> : 1), smem, as_stream(stream)>>>(
        ptr<const T>(dy), ptr<const T>(x), ptr<const float>(w), ptr<const float>(mean), ptr<const float>(rstd),
        ptr<const T>(dres), ptr<T>(dx), ptr<float>(dw_part), ptr<float>(db_part), M, N, sdy, sx, sdr, sdx,
        rows_per_block, smem > 0);
  });
  FF_LAUNCH_CHECK(RMS ? "rms_norm_bwd_kernel" : "layer_norm_bwd_kernel");
  const int64_t cblocks64 = (N + kColumnSumThreads - 1) / kColumnSumThreads;
  const unsigned cblocks = unsigned(cblocks64 < kMaxRowBlocks ? cblocks64 : kMaxRowBlocks);
  if (dw_part) {
    column_sum_kernel<<<cblocks, kColumnSumThreads, 0, as_stream(stream)>>>(ptr<const float>(dw_part), ptr<float>(dw_out), nparts, N);
    FF_LAUNCH_CHECK("column_sum_kernel");
  }
  if (db_part) {
    column_sum_kernel<<<cblocks, kColumnSumThreads, 0, as_stream(stream)>>>(ptr<const float>(db_part), ptr<float>(db_out), nparts, N);
    FF_LAUNCH_CHECK("column_sum_kernel");
  }
}

}  // namespace
}  // namespace ff
