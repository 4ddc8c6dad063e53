// Epilogue of linear_act: the GEMM z = x @ W^T stays torch's matmul; these kernels add the
// bias and apply the activation (forward), or turn dy into dh (backward).
// forward reads M*Nz (+ Nz bias), writes M*Nz (preact, in place over z) + M*Ny (y);
// backward reads M*Ny + M*Nz, writes M*Nz. Gated activations: Nz = 2 * Ny, gate = h[:, :Ny],
// up = h[:, Ny:], y = act(gate) * up.
#include "common.cuh"
#include "ops.h"

namespace ff {
namespace {

// codes shared with python/fusedformer/_backends/cuda/linear_act.py
enum Act : int { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3, kIdentity = 4, kSwiglu = 5, kGeglu = 6 };

constexpr int kThreads = 256;  // every launch's block size

// Run body(row, j, Width<W>{}) over this thread's columns [j0, j0 + V) of every row it owns
// (rows grid-strided along y): one chunk of V, or element by element in a row's last partial vector.
template <int V, typename F>
__device__ __forceinline__ void for_own_columns(int64_t M, int64_t Ny, int64_t j0, F&& body) {
  for (int64_t row = blockIdx.y; row < M; row += gridDim.y) {
    if (j0 + V <= Ny) {
      body(row, j0, Width<V>{});
    } else {
      for (int64_t j = j0; j < Ny; ++j) body(row, j, Width<1>{});
    }
  }
}

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;

__device__ __forceinline__ float act_fwd(float h, int act) {
  switch (act) {
    case kRelu: return h <= 0.f ? 0.f : h;  // NaN stays NaN
    case kGelu: case kGeglu: return 0.5f * h * (1.f + erff(h * kInvSqrt2));
    case kGeluTanh: return 0.5f * h * (1.f + tanhf(kSqrt2OverPi * (h + 0.044715f * h * h * h)));
    case kSilu: case kSwiglu: return h / (1.f + expf(-h));
    default: return h;
  }
}

// dL/dh = dy * act'(h); relu's is a select, as torch's threshold_backward: 0 where h <= 0 even
// for a NaN dy, dy elsewhere (a NaN h included)
__device__ __forceinline__ float act_grad(float dy, float h, int act) {
  switch (act) {
    case kRelu: return h <= 0.f ? 0.f : dy;
    case kGelu: case kGeglu:
      return dy * (0.5f * (1.f + erff(h * kInvSqrt2)) + h * expf(-0.5f * h * h) * kInvSqrt2Pi);
    case kGeluTanh: {
      const float t = tanhf(kSqrt2OverPi * (h + 0.044715f * h * h * h));
      return dy * (0.5f * (1.f + t) + 0.5f * h * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * 0.044715f * h * h));
    }
    case kSilu: case kSwiglu: {
      const float s = 1.f / (1.f + expf(-h));
      return dy * (s * (1.f + h * (1.f - s)));
    }
    default: return dy;
  }
}

// One thread handles W consecutive output columns j of one row; blocks tile (columns, rows).
template <typename T, bool VEC, bool GATED>
__global__ void __launch_bounds__(kThreads, 1) bias_act_fwd_kernel(T* __restrict__ z,              // GEMM output (M, Nz), row stride sz; becomes preact
                                    const float* __restrict__ bias, // (Nz,) or null
                                    T* __restrict__ y,              // output (M, Ny), row stride sy
                                    int64_t M, int64_t Ny, int64_t sz, int64_t sy, int act) {
  constexpr int V = VEC ? kVec<T> : 1;
  const int64_t j0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (j0 >= Ny) return;
  auto body = [&](int64_t row, int64_t j, auto w_) {
    constexpr int W = decltype(w_)::value;
    T* zr = z + row * sz;
    float g[W], out[W];
    load_f<W>(zr + j, g);
#pragma unroll
    for (int k = 0; k < W; ++k) g[k] += bias ? bias[j + k] : 0.f;
    store_f<W>(zr + j, g);
    if constexpr (GATED) {
      float u[W];
      load_f<W>(zr + Ny + j, u);
#pragma unroll
      for (int k = 0; k < W; ++k) u[k] += bias ? bias[Ny + j + k] : 0.f;
      store_f<W>(zr + Ny + j, u);
#pragma unroll
      for (int k = 0; k < W; ++k) out[k] = act_fwd(g[k], act) * u[k];
    } else {
#pragma unroll
      for (int k = 0; k < W; ++k) out[k] = act_fwd(g[k], act);
    }
    store_f<W>(y + row * sy + j, out);
  };
  for_own_columns<V>(M, Ny, j0, body);
}

// dh = dy * act'(h); gated: dgate = dy * up * act'(gate), dup = dy * act(gate).
template <typename T, bool VEC, bool GATED>
__global__ void __launch_bounds__(kThreads, 1) bias_act_bwd_kernel(const T* __restrict__ dy,  // grad of y (M, Ny), row stride sdy
                                    const T* __restrict__ h,   // preact (M, Nz), row stride sh
                                    T* __restrict__ dh,        // grad of preact (M, Nz), row stride sdh
                                    int64_t M, int64_t Ny, int64_t sdy, int64_t sh, int64_t sdh, int act) {
  constexpr int V = VEC ? kVec<T> : 1;
  const int64_t j0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (j0 >= Ny) return;
  auto body = [&](int64_t row, int64_t j, auto w_) {
    constexpr int W = decltype(w_)::value;
    float g[W], a[W];
    load_f<W>(dy + row * sdy + j, g);
    load_f<W>(h + row * sh + j, a);
    if constexpr (GATED) {
      float u[W], dg[W], du[W];
      load_f<W>(h + row * sh + Ny + j, u);
#pragma unroll
      for (int k = 0; k < W; ++k) {
        dg[k] = act_grad(g[k] * u[k], a[k], act);
        du[k] = g[k] * act_fwd(a[k], act);
      }
      store_f<W>(dh + row * sdh + j, dg);
      store_f<W>(dh + row * sdh + Ny + j, du);
    } else {
#pragma unroll
      for (int k = 0; k < W; ++k) a[k] = act_grad(g[k], a[k], act);
      store_f<W>(dh + row * sdh + j, a);
    }
  };
  for_own_columns<V>(M, Ny, j0, body);
}

// The launchers' shared argument checks (`op` names the entry point); false: nothing to launch.
bool bias_act_launchable(const char* op, int64_t M, int64_t Ny, int act) {
  require(M >= 0 && Ny >= 0, std::string(op) + ": negative size");
  require(act >= kRelu && act <= kGeglu, std::string(op) + ": unknown activation code");
  return M > 0 && Ny > 0;
}

// Threads along x cover Ny columns V at a time; rows along y, grid-strided past the y limit.
dim3 bias_act_grid(int64_t M, int64_t Ny, int64_t V) {
  return dim3(unsigned((Ny + kThreads * V - 1) / (kThreads * V)), unsigned(M < 65535 ? M : 65535));
}

// The <VEC, GATED> instance `pick(vec_constant, gated_constant)` names, for run-time vec and act.
template <typename Pick>
auto bias_act_instance(bool vec, int act, Pick pick) {
  using Y = std::true_type;
  using N = std::false_type;
  const bool gated = act == kSwiglu || act == kGeglu;
  return gated ? (vec ? pick(Y{}, Y{}) : pick(N{}, Y{})) : (vec ? pick(Y{}, N{}) : pick(N{}, N{}));
}

}  // namespace

std::vector<LaunchLimit> linear_act_launch_limits() {
  return {{"bias_act_fwd_kernel", 0, kThreads, 0, false}, {"bias_act_bwd_kernel", 0, kThreads, 0, false}};
}

void bias_act_forward(int dtype, uintptr_t z, uintptr_t bias, uintptr_t y, int64_t M, int64_t Ny, int64_t sz,
                      int64_t sy, int act, bool vec, uintptr_t stream) {
  if (!bias_act_launchable("bias_act_forward", M, Ny, act)) return;
  FF_DISPATCH(dtype, T, {
    auto kernel = bias_act_instance(vec, act, [](auto v, auto g) {
      return bias_act_fwd_kernel<T, decltype(v)::value, decltype(g)::value>;
    });
    kernel<<<bias_act_grid(M, Ny, vec ? kVec<T> : 1), kThreads, 0, as_stream(stream)>>>(
        ptr<T>(z), ptr<const float>(bias), ptr<T>(y), M, Ny, sz, sy, act);
  });
  FF_LAUNCH_CHECK("bias_act_fwd_kernel");
}

void bias_act_backward(int dtype, uintptr_t dy, uintptr_t h, uintptr_t dh, int64_t M, int64_t Ny, int64_t sdy,
                       int64_t sh, int64_t sdh, int act, bool vec, uintptr_t stream) {
  if (!bias_act_launchable("bias_act_backward", M, Ny, act)) return;
  FF_DISPATCH(dtype, T, {
    auto kernel = bias_act_instance(vec, act, [](auto v, auto g) {
      return bias_act_bwd_kernel<T, decltype(v)::value, decltype(g)::value>;
    });
    kernel<<<bias_act_grid(M, Ny, vec ? kVec<T> : 1), kThreads, 0, as_stream(stream)>>>(
        ptr<const T>(dy), ptr<const T>(h), ptr<T>(dh), M, Ny, sdy, sh, sdh, act);
  });
  FF_LAUNCH_CHECK("bias_act_bwd_kernel");
}

}  // namespace ff
