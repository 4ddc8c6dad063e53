// Shared helpers of every fusedformer CUDA kernel: error checking, dtype dispatch, 16-byte
// vectorized row access, warp/block reductions.
//
// Launchers take raw pointers (as integers), sizes, strides in elements and a cudaStream_t
// handle, so _C links nothing of libtorch. A CUDA error becomes ff::CudaError (a
// std::runtime_error), which pybind11 turns into a Python RuntimeError.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "ops.h"

namespace ff {

struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline void check_cuda(cudaError_t err, const char* what, const char* file, int line) {
  if (err != cudaSuccess) {
    throw CudaError(std::string("fusedformer._C: ") + what + " failed: " + cudaGetErrorString(err) +
                    " (" + file + ":" + std::to_string(line) + ")");
  }
}

#define FF_CUDA_CHECK(expr) ::ff::check_cuda((expr), #expr, __FILE__, __LINE__)
// after a <<<>>> launch: catches invalid configurations and resource errors at once
#define FF_LAUNCH_CHECK(name) ::ff::check_cuda(cudaGetLastError(), name, __FILE__, __LINE__)

inline void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("fusedformer._C: " + msg);
}

// dtype codes shared with python/fusedformer/_backends/cuda/_common.py
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// FF_DISPATCH(code, T, ...) runs the body with T bound to the element type of `code`.
#define FF_DISPATCH(code, T, ...)                                                     \
  switch (code) {                                                                     \
    case ::ff::kFloat32: { using T = float; __VA_ARGS__; break; }                     \
    case ::ff::kFloat16: { using T = __half; __VA_ARGS__; break; }                    \
    case ::ff::kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__; break; }            \
    default: throw std::invalid_argument("fusedformer._C: unknown dtype code " + std::to_string(code)); \
  }

#define FF_DISPATCH_HALF(code, T, ...)                                                \
  switch (code) {                                                                     \
    case ::ff::kFloat16: { using T = __half; __VA_ARGS__; break; }                    \
    case ::ff::kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__; break; }            \
    default: throw std::invalid_argument("fusedformer._C: dtype code " + std::to_string(code) + \
                                         " is not fp16/bf16"); \
  }

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// elements per 16-byte vector
template <typename T> constexpr int kVec = 16 / sizeof(T);

template <typename T>
struct alignas(16) Vec16 {
  T v[kVec<T>];
};

// Load W consecutive elements as floats: one 16-byte transaction when W is the vector width
// (the caller guarantees alignment), otherwise element by element.
template <int W, typename T>
__device__ __forceinline__ void load_f(const T* p, float (&out)[W]) {
  if constexpr (W == kVec<T>) {
    Vec16<T> v = *reinterpret_cast<const Vec16<T>*>(p);
#pragma unroll
    for (int k = 0; k < W; ++k) out[k] = to_float(v.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) out[k] = to_float(p[k]);
  }
}

template <int W, typename T>
__device__ __forceinline__ void store_f(T* p, const float (&in)[W]) {
  if constexpr (W == kVec<T>) {
    Vec16<T> v;
#pragma unroll
    for (int k = 0; k < W; ++k) v.v[k] = from_float<T>(in[k]);
    *reinterpret_cast<Vec16<T>*>(p) = v;
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) p[k] = from_float<T>(in[k]);
  }
}

// The row cache: a row's fp32 values kept in dynamic shared memory when they fit (see
// row_cache_smem), at the same index j as in the row, so a second pass need not reread global memory.
template <int W>
__device__ __forceinline__ void cache_store(float* cache, int64_t j, const float (&in)[W]) {
#pragma unroll
  for (int k = 0; k < W; ++k) cache[j + k] = in[k];
}

// Elements [j, j + W) of a row again: from its cached copy when `cached`, else from global memory.
template <int W, typename T>
__device__ __forceinline__ void reload_f(const T* row, const float* cache, bool cached, int64_t j, float (&out)[W]) {
  if (cached) {
#pragma unroll
    for (int k = 0; k < W; ++k) out[k] = cache[j + k];
  } else {
    load_f<W>(row + j, out);
  }
}

template <int N> using Width = std::integral_constant<int, N>;

// Visit a row of n elements in chunks: f(j, Width<W>{}) handles elements [j, j + W). With VEC
// the row start must be 16-byte aligned: whole vectors first, then a scalar tail. A thread
// always gets the same chunks for the same (n, blockDim), which the norm backward relies on
// for its race-free per-column partial sums.
template <typename T, bool VEC, typename F>
__device__ __forceinline__ void for_chunks(int64_t n, F&& f) {
  constexpr int V = kVec<T>;
  int64_t tail = 0;
  if constexpr (VEC) {
    const int64_t nv = n / V;
    for (int64_t c = threadIdx.x; c < nv; c += blockDim.x) f(c * V, Width<V>{});
    tail = nv * V;
  }
  for (int64_t j = tail + threadIdx.x; j < n; j += blockDim.x) f(j, Width<1>{});
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide reduction; every thread gets the result. `scratch` holds 32 floats; the trailing
// __syncthreads lets the caller reuse it right away.
template <bool MAX>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = MAX ? warp_max(v) : warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = MAX ? -INFINITY : 0.f;
  for (int w = 0; w < nwarps; ++w) r = MAX ? fmaxf(r, scratch[w]) : r + scratch[w];
  __syncthreads();
  return r;
}

__device__ __forceinline__ float block_sum(float v, float* scratch) { return block_reduce<false>(v, scratch); }
__device__ __forceinline__ float block_max(float v, float* scratch) { return block_reduce<true>(v, scratch); }

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

template <typename T> T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// ---- launch limits. A kernel's __launch_bounds__ and its launcher share one constant for the
// block size, and each .cu lists its kernels' largest launches (ops.h's LaunchLimit).
// __launch_bounds__(threads, 1) caps registers at 65536 / threads, so every launch fits; the
// explicit 1 matters: with the block size alone ptxas spilled bias_act_fwd_kernel<float> at 32
// registers where 38 fit.

constexpr int kRowThreads = 1024;  // softmax / norm row kernels: the largest block

// Threads per block for a row-wise kernel over rows of n elements.
inline int row_threads(int64_t n, int vec) {
  const int64_t per_thread = vec * 2;
  int t = 32;
  while (t < kRowThreads && t * per_thread < n) t *= 2;
  return t;
}

// Dynamic shared memory for a row cache of `bytes` in `kernel`: `bytes` when the current device
// has room for it beside the kernel's static shared memory (row_cache_bytes()), else 0 (the
// kernel then rereads global memory).
template <typename K>
int64_t row_cache_smem(K kernel, int64_t bytes) {
  int device = 0, optin = 0;
  FF_CUDA_CHECK(cudaGetDevice(&device));
  FF_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cudaFuncAttributes attr;
  FF_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const int64_t budget = row_cache_bytes(optin, int64_t(attr.sharedSizeBytes));
  if (bytes > budget) return 0;
  // Beyond what the kernel is allowed (48 KB less its static memory at first), opt in: to the
  // whole budget, never to this request, so that launches of the kernel from other threads
  // cannot shrink the limit under each other.
  if (bytes > attr.maxDynamicSharedSizeBytes) {
    FF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(budget)));
  }
  return bytes;
}

// Rows processed by a grid of at most this many blocks (blocks loop over the rest).
constexpr int64_t kMaxRowBlocks = 1 << 20;

}  // namespace ff
