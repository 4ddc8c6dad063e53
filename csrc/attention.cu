// FlashAttention-2-style attention on tensor cores (mma.sync m16n8k16, fp16/bf16 in, fp32
// accumulate), forward and backward, head dims 64 and 128.
//
// Legend: B batch, H query heads, Hkv key/value heads (GQA: head h reads kv head h / (H/Hkv)),
// Lq/Lk lengths, D head dim. Tiles: kBM = 64 query rows x kBN = 64 keys per step, 4 warps;
// warp w owns 16 rows of the block's tile. Scores live in the log2 domain (exp2).
//
// forward  reads Q once and K, V once per query block; writes O (B,H,Lq,D) and lse (B,H,Lq).
// backward: one block per (key block, b, h) walks the query blocks, keeps dK, dV in registers
// and adds dQ into an fp32 buffer with atomics; dK, dV are written per query head in fp32 (the
// Python side sums GQA groups). delta = rowsum(dO * O) comes from a small preprocess kernel.
//
// Masks: causal (key j <= query i, top-left), keys >= Lk, and an optional bool (uint8) or float32
// bias read through 4-D strides (0 for broadcast dims). A row with no key left gives O = 0,
// lse = -inf, and zero gradients.
#include "common.cuh"
#include "ops.h"

namespace ff {
namespace {

constexpr int kBM = 64, kBN = 64, kWarps = 4, kThreads = kWarps * 32;
constexpr int kDeltaThreads = 256;  // attn_bwd_delta_kernel: a warp per row
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// D = A (16x16, row) * B (16x8, col) + D, fp32 accumulators
template <typename T>
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, const uint32_t* b) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// Four 8x8 b16 matrices; lanes 8q..8q+7 give the row addresses of matrix q.
__device__ __forceinline__ void ldsm_x4(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

__device__ __forceinline__ void ldsm_x4_t(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
}

// 16-byte global -> shared copy; zero-fills (reads nothing) when !valid
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Rows [r0, r0 + 64) of an (L, D) matrix with row stride ld -> shared tile with row pitch
// D + 8 (16 bytes of padding: the 8 row addresses of an ldmatrix hit distinct banks).
// Rows >= L are zeros.
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t r0, int64_t L, int64_t ld) {
  constexpr int kChunks = D / 8;
  for (int c = threadIdx.x; c < 64 * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool ok = r0 + r < L;
    cp_async16(s + r * (D + 8) + col, ok ? g + (r0 + r) * ld + col : g, ok);
  }
}

struct Bias {
  const void* ptr;  // bool (as uint8) or float32 mask, broadcastable to (B, H, Lq, Lk); null: none
  int kind;         // 0 none, 1 bool (True = attend), 2 float (added)
  int64_t sb, sh, sq, sk;  // strides in elements, 0 on broadcast dims
};

struct Params {
  const void *q, *k, *v;          // (B, H, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D); unit last stride
  int64_t q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl;
  void* o;                        // forward: out (B, H, Lq, D), contiguous
  float* lse;                     // (B, H, Lq), contiguous; natural log
  const void* dout;               // backward: grad of out, (B, H, Lq, D), contiguous
  const float* delta;             // backward: rowsum(dO * O), (B, H, Lq)
  float *dq, *dk, *dv;            // backward: fp32 (B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, D)
  int64_t B, H, Hkv, Lq, Lk;
  float scale;                    // softmax scale (natural units)
  bool causal;
  Bias bias;
};

// Finite log2-domain scores are clamped at kScoreFloor. A float mask of finfo(float32 or
// bfloat16).min overflows to -inf once scaled by log2(e), which would make a row the reference
// computes (uniform over such keys) a masked row of zeros. The floor lies below every score a
// mask of finfo(float16).min gives (-65504 -> -94502) and near enough to 0 that the lse of a row
// at the floor still carries log2(row sum) (fp32 ulp there: 2^-7). Only a row with no score
// above about -69000 (natural units) tells the floor from the exact result.
constexpr float kScoreFloor = -1.0e5f;

// The log2-domain score of query i, key j from the raw q.k product, or -inf where masked.
__device__ __forceinline__ float score2(const Params& p, const Bias& bias_bh, float qk, int64_t i, int64_t j) {
  if (j >= p.Lk || (p.causal && j > i)) return -INFINITY;
  float s = qk * p.scale * kLog2e;
  if (bias_bh.kind != 0 && i < p.Lq) {
    const int64_t off = i * bias_bh.sq + j * bias_bh.sk;
    if (bias_bh.kind == 1) {
      if (!static_cast<const uint8_t*>(bias_bh.ptr)[off]) return -INFINITY;
    } else {
      const float b = static_cast<const float*>(bias_bh.ptr)[off];
      if (b == -INFINITY) return -INFINITY;  // only a true -inf masks a key
      s += b * kLog2e;
    }
  }
  return s < kScoreFloor ? kScoreFloor : s;  // NaN stays NaN
}

__device__ __forceinline__ Bias bias_at(const Bias& b, int64_t bi, int64_t hi) {
  Bias r = b;
  if (b.kind == 1) r.ptr = static_cast<const uint8_t*>(b.ptr) + bi * b.sb + hi * b.sh;
  if (b.kind == 2) r.ptr = static_cast<const float*>(b.ptr) + bi * b.sb + hi * b.sh;
  return r;
}

// Where batch b, head h starts in q, k and v; k and v: the head's key/value head (GQA).
template <typename T>
struct HeadPtrs {
  const T *q, *k, *v;
};
template <typename T>
__device__ __forceinline__ HeadPtrs<T> head_ptrs(const Params& p, int64_t b, int64_t h) {
  const int64_t kvh = h / (p.H / p.Hkv);
  return {static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh, static_cast<const T*>(p.k) + b * p.k_sb + kvh * p.k_sh,
          static_cast<const T*>(p.v) + b * p.v_sb + kvh * p.v_sh};
}

// acc = A B^T for this warp: A its 16 rows of sA, B the first 8 * NT rows of sB, both (rows, D)
// tiles in shared memory with pitch D + 8; acc[nt] holds n-tile nt (columns 8nt..8nt+7).
template <typename T, int D, int NT>
__device__ __forceinline__ void warp_abt(float (&acc)[NT][4], const T* sA, const T* sB, int warp, int lane) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    ldsm_x4(a, sA + (warp * 16 + lane % 16) * (D + 8) + kk * 16 + (lane / 16) * 8);
#pragma unroll
    for (int nt2 = 0; nt2 < NT / 2; ++nt2) {
      uint32_t b[4];  // B fragments of n-tiles 2*nt2 and 2*nt2 + 1
      ldsm_x4(b, sB + (nt2 * 16 + lane % 8 + (lane / 16) * 8) * (D + 8) + kk * 16 + ((lane / 8) % 2) * 8);
      mma16816<T>(acc[2 * nt2], a, b);
      mma16816<T>(acc[2 * nt2 + 1], a, b + 2);
    }
  }
}

// acc += A B over k-step kt for this warp: A's fragment a (16 x 16), B rows 16kt..16kt+15 of the
// (rows, D) shared tile sB (pitch D + 8), read through a transposing ldmatrix.
template <typename T, int D>
__device__ __forceinline__ void mma_k_step(float (&acc)[D / 8][4], const uint32_t (&a)[4], const T* sB, int kt,
                                           int lane) {
#pragma unroll
  for (int dt2 = 0; dt2 < D / 16; ++dt2) {
    uint32_t f[4];
    ldsm_x4_t(f, sB + (kt * 16 + lane % 8 + ((lane / 8) % 2) * 8) * (D + 8) + dt2 * 16 + (lane / 16) * 8);
    mma16816<T>(acc[2 * dt2], a, f);
    mma16816<T>(acc[2 * dt2 + 1], a, f + 2);
  }
}

// acc += P B for this warp: P (16, 8 * NT) held in accumulators pm, B the first 8 * NT rows of sB.
template <typename T, int D, int NT>
__device__ __forceinline__ void warp_pb(float (&acc)[D / 8][4], const float (&pm)[NT][4], const T* sB, int lane) {
#pragma unroll
  for (int kt = 0; kt < NT / 2; ++kt) {
    // the accumulators of n-tiles 2kt, 2kt+1 are exactly the A fragment of k-step kt
    const uint32_t pa[4] = {pack2<T>(pm[2 * kt][0], pm[2 * kt][1]), pack2<T>(pm[2 * kt][2], pm[2 * kt][3]),
                            pack2<T>(pm[2 * kt + 1][0], pm[2 * kt + 1][1]),
                            pack2<T>(pm[2 * kt + 1][2], pm[2 * kt + 1][3])};
    mma_k_step<T, D>(acc, pa, sB, kt, lane);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(const Params p) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // (kBM, D + 8)
  T* sK = sQ + kBM * (D + 8);              // (kBN, D + 8)
  T* sV = sK + kBN * (D + 8);              // (kBN, D + 8)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, tig = lane & 3;
  const int64_t m0 = int64_t(blockIdx.x) * kBM;
  for (int64_t b = blockIdx.z; b < p.B; b += gridDim.z) {
    for (int64_t h = blockIdx.y; h < p.H; h += gridDim.y) {
      const auto [qb, kb, vb] = head_ptrs<T>(p, b, h);
      const Bias bias = bias_at(p.bias, b, h);
      __syncthreads();  // the previous (b, h) is done with shared memory
      load_tile<T, D>(sQ, qb, m0, p.Lq, p.q_sl);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      uint32_t qf[D / 16][4];  // this warp's 16 query rows as A fragments, one per 16-wide k step
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) ldsm_x4(qf[kk], sQ + (warp * 16 + lane % 16) * (D + 8) + kk * 16 + (lane / 16) * 8);
      float o[D / 8][4];
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
      float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.f, 0.f};  // rows g and g + 8
      const int64_t n_end = p.causal ? (m0 + kBM < p.Lk ? m0 + kBM : p.Lk) : p.Lk;
      for (int64_t n0 = 0; n0 < n_end; n0 += kBN) {
        __syncthreads();  // the previous K, V tiles are consumed
        load_tile<T, D>(sK, kb, n0, p.Lk, p.k_sl);
        cp_async_commit();
        load_tile<T, D>(sV, vb, n0, p.Lk, p.v_sl);
        cp_async_commit();
        cp_async_wait<1>();  // K has landed; V may still be in flight
        __syncthreads();
        float s[kBN / 8][4];
#pragma unroll
        for (int nt = 0; nt < kBN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
          for (int nt2 = 0; nt2 < kBN / 16; ++nt2) {
            uint32_t kf[4];  // B fragments of n-tiles 2*nt2 and 2*nt2 + 1
            ldsm_x4(kf, sK + (nt2 * 16 + lane % 8 + (lane / 16) * 8) * (D + 8) + kk * 16 + ((lane / 8) % 2) * 8);
            mma16816<T>(s[2 * nt2], qf[kk], kf);
            mma16816<T>(s[2 * nt2 + 1], qf[kk], kf + 2);
          }
        }
#pragma unroll
        for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int64_t i = m0 + warp * 16 + g + (e >> 1) * 8, j = n0 + nt * 8 + tig * 2 + (e & 1);
            s[nt][e] = score2(p, bias, s[nt][e], i, j);
          }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {  // online softmax for row g + 8r
          float mx = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < kBN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          const float m_new = fmaxf(mrow[r], mx);
          const float m_use = m_new == -INFINITY ? 0.f : m_new;  // all masked so far: keep p = 0
          const float alpha = exp2f(mrow[r] - m_use);
          mrow[r] = m_new;
          float rs = 0.f;
#pragma unroll
          for (int nt = 0; nt < kBN / 8; ++nt) {
            s[nt][2 * r] = exp2f(s[nt][2 * r] - m_use);
            s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - m_use);
            rs += s[nt][2 * r] + s[nt][2 * r + 1];
          }
          lrow[r] = lrow[r] * alpha + rs;  // this thread's columns only; summed over the quad at the end
#pragma unroll
          for (int dt = 0; dt < D / 8; ++dt) {
            o[dt][2 * r] *= alpha;
            o[dt][2 * r + 1] *= alpha;
          }
        }
        cp_async_wait<0>();
        __syncthreads();
        warp_pb<T, D>(o, s, sV, lane);  // O += P V
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float l = lrow[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const int64_t i = m0 + warp * 16 + g + r * 8;
        if (i < p.Lq) {
          T* orow = static_cast<T*>(p.o) + ((b * p.H + h) * p.Lq + i) * D;
#pragma unroll
          for (int dt = 0; dt < D / 8; ++dt) {
            *reinterpret_cast<uint32_t*>(orow + dt * 8 + tig * 2) = pack2<T>(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
          }
          if (tig == 0) p.lse[(b * p.H + h) * p.Lq + i] = l > 0.f ? (mrow[r] + log2f(l)) * kLn2 : -INFINITY;
        }
      }
    }
  }
}

// delta[row] = sum_d dO[row, d] * O[row, d] over (B*H*Lq) contiguous rows of D; a warp per row
template <typename T>
__global__ void __launch_bounds__(kDeltaThreads, 1) attn_bwd_delta_kernel(const T* __restrict__ dout, const T* __restrict__ out, float* __restrict__ delta,
                                      int64_t rows, int D) {
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  float s = 0.f;
  for (int d = threadIdx.x % 32; d < D; d += 32) s += to_float(dout[row * D + d]) * to_float(out[row * D + d]);
  s = warp_sum(s);
  if (threadIdx.x % 32 == 0) delta[row] = s;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_bwd_kernel(const Params p) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);  // (kBN, D + 8)
  T* sV = sK + kBN * (D + 8);              // (kBN, D + 8)
  T* sQ = sV + kBN * (D + 8);              // (kBM, D + 8)
  T* sdO = sQ + kBM * (D + 8);             // (kBM, D + 8)
  T* sdS = sdO + kBM * (D + 8);            // dS^T, (kBN, kBM + 8)
  float* sLse = reinterpret_cast<float*>(sdS + kBN * (kBM + 8));  // (kBM,) log2 domain; +inf: p = 0
  float* sDelta = sLse + kBM;                                     // (kBM,)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, tig = lane & 3;
  const int64_t n0 = int64_t(blockIdx.x) * kBN;
  for (int64_t b = blockIdx.z; b < p.B; b += gridDim.z) {
    for (int64_t h = blockIdx.y; h < p.H; h += gridDim.y) {
      const auto [qb, kb, vb] = head_ptrs<T>(p, b, h);
      const int64_t bh = b * p.H + h;
      const T* dob = static_cast<const T*>(p.dout) + bh * p.Lq * D;
      const Bias bias = bias_at(p.bias, b, h);
      __syncthreads();  // the previous (b, h) is done with shared memory
      load_tile<T, D>(sK, kb, n0, p.Lk, p.k_sl);
      load_tile<T, D>(sV, vb, n0, p.Lk, p.v_sl);
      cp_async_commit();
      float dk[D / 8][4], dv[D / 8][4];  // this warp's 16 keys
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[dt][e] = dv[dt][e] = 0.f;
      }
      for (int64_t m0 = p.causal ? n0 : 0; m0 < p.Lq; m0 += kBM) {  // causal: queries i >= n0 only
        __syncthreads();  // the previous query block is consumed
        load_tile<T, D>(sQ, qb, m0, p.Lq, p.q_sl);
        load_tile<T, D>(sdO, dob, m0, p.Lq, D);
        cp_async_commit();
        for (int t = threadIdx.x; t < kBM; t += kThreads) {
          const int64_t i = m0 + t;
          const float l = i < p.Lq ? p.lse[bh * p.Lq + i] : -INFINITY;
          sLse[t] = l == -INFINITY ? INFINITY : l * kLog2e;
          sDelta[t] = i < p.Lq ? p.delta[bh * p.Lq + i] : 0.f;
        }
        cp_async_wait<0>();
        __syncthreads();
        // S^T = K Q^T: rows are this warp's keys, columns the block's 64 queries
        float st[kBM / 8][4];
        warp_abt<T, D>(st, sK, sQ, warp, lane);
#pragma unroll
        for (int nt = 0; nt < kBM / 8; ++nt) {  // P^T = exp2(S^T - lse)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int il = nt * 8 + tig * 2 + (e & 1);
            const int64_t j = n0 + warp * 16 + g + (e >> 1) * 8;
            st[nt][e] = exp2f(score2(p, bias, st[nt][e], m0 + il, j) - sLse[il]);
          }
        }
        warp_pb<T, D>(dv, st, sdO, lane);  // dV += P^T dO
        float dpt[kBM / 8][4];
        warp_abt<T, D>(dpt, sV, sdO, warp, lane);  // dP^T = V dO^T
        // dS^T = P^T * (dP^T - delta), kept in registers for dK and in shared memory for dQ
#pragma unroll
        for (int nt = 0; nt < kBM / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) dpt[nt][e] = st[nt][e] * (dpt[nt][e] - sDelta[nt * 8 + tig * 2 + (e & 1)]);
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + g + r * 8) * (kBM + 8) + nt * 8 + tig * 2) =
                pack2<T>(dpt[nt][2 * r], dpt[nt][2 * r + 1]);
          }
        }
        warp_pb<T, D>(dk, dpt, sQ, lane);  // dK += dS^T Q
        __syncthreads();  // every warp's dS^T is in shared memory
        // dQ (this warp's 16 queries) = dS K, read dS through a transposing ldmatrix of dS^T
        float dq[D / 8][4];
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.f;
#pragma unroll
        for (int kt = 0; kt < kBN / 16; ++kt) {
          uint32_t a[4];
          ldsm_x4_t(a, sdS + (kt * 16 + lane % 8 + (lane / 16) * 8) * (kBM + 8) + warp * 16 + ((lane / 8) % 2) * 8);
          mma_k_step<T, D>(dq, a, sK, kt, lane);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int64_t i = m0 + warp * 16 + g + r * 8;
          if (i < p.Lq) {
            float* dqrow = p.dq + (bh * p.Lq + i) * D;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
              atomicAdd(dqrow + dt * 8 + tig * 2, dq[dt][2 * r] * p.scale);
              atomicAdd(dqrow + dt * 8 + tig * 2 + 1, dq[dt][2 * r + 1] * p.scale);
            }
          }
        }
      }
      cp_async_wait<0>();  // no query block at all: the K, V copies must still finish
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t j = n0 + warp * 16 + g + r * 8;
        if (j < p.Lk) {
          float* dkrow = p.dk + (bh * p.Lk + j) * D;
          float* dvrow = p.dv + (bh * p.Lk + j) * D;
#pragma unroll
          for (int dt = 0; dt < D / 8; ++dt) {
            *reinterpret_cast<float2*>(dkrow + dt * 8 + tig * 2) = make_float2(dk[dt][2 * r] * p.scale, dk[dt][2 * r + 1] * p.scale);
            *reinterpret_cast<float2*>(dvrow + dt * 8 + tig * 2) = make_float2(dv[dt][2 * r], dv[dt][2 * r + 1]);
          }
        }
      }
    }
  }
}

template <int D> constexpr size_t fwd_smem(int elem) { return size_t(kBM + 2 * kBN) * (D + 8) * elem; }
template <int D> constexpr size_t bwd_smem(int elem) {
  return size_t(2 * kBN + 2 * kBM) * (D + 8) * elem + size_t(kBN) * (kBM + 8) * elem + 2 * kBM * sizeof(float);
}

Params make_params(uintptr_t q, uintptr_t k, uintptr_t v, const std::vector<int64_t>& strides, int64_t B, int64_t H,
                   int64_t Hkv, int64_t Lq, int64_t Lk, double scale, bool causal, int bias_kind, uintptr_t bias,
                   const std::vector<int64_t>& bias_strides) {
  require(strides.size() == 9, "attention: expected 9 q/k/v strides");
  require(bias_strides.size() == 4, "attention: expected 4 bias strides");
  require(B > 0 && H > 0 && Hkv > 0 && H % Hkv == 0 && Lq > 0 && Lk > 0, "attention: bad sizes");
  require(bias_kind >= 0 && bias_kind <= 2 && (bias_kind == 0) == (bias == 0), "attention: bad bias");
  Params p{};
  p.q = reinterpret_cast<const void*>(q);
  p.k = reinterpret_cast<const void*>(k);
  p.v = reinterpret_cast<const void*>(v);
  p.q_sb = strides[0]; p.q_sh = strides[1]; p.q_sl = strides[2];
  p.k_sb = strides[3]; p.k_sh = strides[4]; p.k_sl = strides[5];
  p.v_sb = strides[6]; p.v_sh = strides[7]; p.v_sl = strides[8];
  p.B = B; p.H = H; p.Hkv = Hkv; p.Lq = Lq; p.Lk = Lk;
  p.scale = float(scale);
  p.causal = causal;
  p.bias = Bias{reinterpret_cast<const void*>(bias), bias_kind, bias_strides[0], bias_strides[1], bias_strides[2],
                bias_strides[3]};
  return p;
}

dim3 attn_grid(int64_t blocks_x, int64_t H, int64_t B) {
  require(blocks_x <= 0x7fffffff, "attention: sequence too long for the grid");
  return dim3(unsigned(blocks_x), unsigned(H < 65535 ? H : 65535), unsigned(B < 65535 ? B : 65535));
}

template <typename K>
void launch(K kernel, dim3 grid, size_t smem, cudaStream_t stream, const Params& p, const char* name) {
  FF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  FF_LAUNCH_CHECK(name);
}

}  // namespace

std::vector<LaunchLimit> attention_launch_limits() {
  return {{"attn_fwd_kernel", 64, kThreads, int64_t(fwd_smem<64>(2)), true},
          {"attn_fwd_kernel", 128, kThreads, int64_t(fwd_smem<128>(2)), true},
          {"attn_bwd_kernel", 64, kThreads, int64_t(bwd_smem<64>(2)), true},
          {"attn_bwd_kernel", 128, kThreads, int64_t(bwd_smem<128>(2)), true},
          {"attn_bwd_delta_kernel", 0, kDeltaThreads, 0, false}};
}

void attention_forward(int dtype, int head_dim, uintptr_t q, uintptr_t k, uintptr_t v, std::vector<int64_t> strides,
                       uintptr_t out, uintptr_t lse, int64_t B, int64_t H, int64_t Hkv, int64_t Lq, int64_t Lk,
                       double scale, bool causal, int bias_kind, uintptr_t bias, std::vector<int64_t> bias_strides,
                       uintptr_t stream) {
  Params p = make_params(q, k, v, strides, B, H, Hkv, Lq, Lk, scale, causal, bias_kind, bias, bias_strides);
  p.o = reinterpret_cast<void*>(out);
  p.lse = reinterpret_cast<float*>(lse);
  const dim3 grid = attn_grid((Lq + kBM - 1) / kBM, H, B);
  FF_DISPATCH_HALF(dtype, T, {
    if (head_dim == 64) {
      launch(attn_fwd_kernel<T, 64>, grid, fwd_smem<64>(2), as_stream(stream), p, "attn_fwd_kernel");
    } else if (head_dim == 128) {
      launch(attn_fwd_kernel<T, 128>, grid, fwd_smem<128>(2), as_stream(stream), p, "attn_fwd_kernel");
    } else {
      require(false, "attention_forward: head_dim must be 64 or 128, got " + std::to_string(head_dim));
    }
  });
}

void attention_backward(int dtype, int head_dim, uintptr_t q, uintptr_t k, uintptr_t v, std::vector<int64_t> strides,
                        uintptr_t out, uintptr_t dout, uintptr_t lse, uintptr_t delta, uintptr_t dq, uintptr_t dk,
                        uintptr_t dv, int64_t B, int64_t H, int64_t Hkv, int64_t Lq, int64_t Lk, double scale,
                        bool causal, int bias_kind, uintptr_t bias, std::vector<int64_t> bias_strides,
                        uintptr_t stream) {
  Params p = make_params(q, k, v, strides, B, H, Hkv, Lq, Lk, scale, causal, bias_kind, bias, bias_strides);
  p.dout = reinterpret_cast<const void*>(dout);
  p.lse = reinterpret_cast<float*>(lse);
  p.delta = reinterpret_cast<const float*>(delta);
  p.dq = reinterpret_cast<float*>(dq);
  p.dk = reinterpret_cast<float*>(dk);
  p.dv = reinterpret_cast<float*>(dv);
  require(head_dim == 64 || head_dim == 128,
          "attention_backward: head_dim must be 64 or 128, got " + std::to_string(head_dim));
  const int64_t rows = B * H * Lq;
  constexpr int kRowsPerBlock = kDeltaThreads / 32;
  const int64_t dblocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  require(dblocks <= 0x7fffffff, "attention_backward: too many rows");
  const dim3 grid = attn_grid((Lk + kBN - 1) / kBN, H, B);
  FF_DISPATCH_HALF(dtype, T, {
    attn_bwd_delta_kernel<T><<<unsigned(dblocks), kDeltaThreads, 0, as_stream(stream)>>>(
        ptr<const T>(dout), ptr<const T>(out), ptr<float>(delta), rows, int(head_dim));
    FF_LAUNCH_CHECK("attn_bwd_delta_kernel");
    if (head_dim == 64) {
      launch(attn_bwd_kernel<T, 64>, grid, bwd_smem<64>(2), as_stream(stream), p, "attn_bwd_kernel");
    } else {
      launch(attn_bwd_kernel<T, 128>, grid, bwd_smem<128>(2), as_stream(stream), p, "attn_bwd_kernel");
    }
  });
}

}  // namespace ff
