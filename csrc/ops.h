// Host launchers of fusedformer._C. Pointers are passed as integers (tensor.data_ptr()), strides
// in elements, `stream` is a cudaStream_t as an integer (torch.cuda.current_stream().cuda_stream).
// `vec` promises 16-byte aligned row starts (base pointers and row strides), checked on the
// Python side; without it the kernels use scalar accesses.
#pragma once

#include <cstdint>
#include <vector>

namespace ff {

// How the largest launch of a kernel looks; each .cu lists its kernels' (the *_launch_limits()
// below), _C exports them for tests/test_cuda_resources.py.
constexpr int64_t kDefaultSmemBytes = 48 * 1024;  // static + dynamic shared memory without opt-in
constexpr int64_t kRowCacheSmem = -1;  // max_dynamic_smem of a row cache: row_cache_bytes() of the device

struct LaunchLimit {
  const char* kernel;        // the kernel's name in the binary (template arguments aside)
  int head_dim;              // attention kernels: their D template argument; 0 otherwise
  int max_threads;           // the largest block any launch uses (= its __launch_bounds__)
  int64_t max_dynamic_smem;  // bytes, or kRowCacheSmem
  bool opt_in;               // the launcher raises cudaFuncAttributeMaxDynamicSharedMemorySize
};

std::vector<LaunchLimit> softmax_launch_limits();
std::vector<LaunchLimit> norm_launch_limits();  // layer_norm.cu; rms_norm.cu has the same kernels
std::vector<LaunchLimit> linear_act_launch_limits();
std::vector<LaunchLimit> attention_launch_limits();

// The row cache a kernel with `static_bytes` of static shared memory may take on a device whose
// opt-in shared memory limit per block is `optin_bytes` (16-byte multiples).
inline int64_t row_cache_bytes(int64_t optin_bytes, int64_t static_bytes) {
  const int64_t left = optin_bytes - static_bytes;
  return left > 0 ? left / 16 * 16 : 0;
}

void softmax_forward(int dtype, uintptr_t x, uintptr_t y, int64_t M, int64_t N, int64_t sx, int64_t sy, bool vec,
                     uintptr_t stream);
void softmax_backward(int dtype, uintptr_t dy, uintptr_t y, uintptr_t dx, int64_t M, int64_t N, int64_t sdy,
                      int64_t sy, int64_t sdx, bool vec, uintptr_t stream);

void layer_norm_forward(int dtype, uintptr_t x, uintptr_t res, uintptr_t w, uintptr_t b, uintptr_t y,
                        uintptr_t res_out, uintptr_t mean, uintptr_t rstd, int64_t M, int64_t N, int64_t sx,
                        int64_t sres, int64_t sy, int64_t sro, double eps, bool vec, uintptr_t stream);
void layer_norm_backward(int dtype, uintptr_t dy, uintptr_t x, uintptr_t w, uintptr_t mean, uintptr_t rstd,
                         uintptr_t dres, uintptr_t dx, uintptr_t dw_part, uintptr_t db_part, uintptr_t dw_out,
                         uintptr_t db_out, int64_t M, int64_t N, int64_t sdy, int64_t sx, int64_t sdr, int64_t sdx,
                         int64_t nparts, bool vec, uintptr_t stream);

void rms_norm_forward(int dtype, uintptr_t x, uintptr_t res, uintptr_t w, uintptr_t y, uintptr_t res_out,
                      uintptr_t rstd, int64_t M, int64_t N, int64_t sx, int64_t sres, int64_t sy, int64_t sro,
                      double eps, bool vec, uintptr_t stream);
void rms_norm_backward(int dtype, uintptr_t dy, uintptr_t x, uintptr_t w, uintptr_t rstd, uintptr_t dres,
                       uintptr_t dx, uintptr_t dw_part, uintptr_t dw_out, int64_t M, int64_t N, int64_t sdy,
                       int64_t sx, int64_t sdr, int64_t sdx, int64_t nparts, bool vec, uintptr_t stream);

void bias_act_forward(int dtype, uintptr_t z, uintptr_t bias, uintptr_t y, int64_t M, int64_t Ny, int64_t sz,
                      int64_t sy, int act, bool vec, uintptr_t stream);
void bias_act_backward(int dtype, uintptr_t dy, uintptr_t h, uintptr_t dh, int64_t M, int64_t Ny, int64_t sdy,
                       int64_t sh, int64_t sdh, int act, bool vec, uintptr_t stream);

void attention_forward(int dtype, int head_dim, uintptr_t q, uintptr_t k, uintptr_t v, std::vector<int64_t> strides,
                       uintptr_t out, uintptr_t lse, int64_t B, int64_t H, int64_t Hkv, int64_t Lq, int64_t Lk,
                       double scale, bool causal, int bias_kind, uintptr_t bias, std::vector<int64_t> bias_strides,
                       uintptr_t stream);
void attention_backward(int dtype, int head_dim, uintptr_t q, uintptr_t k, uintptr_t v, std::vector<int64_t> strides,
                        uintptr_t out, uintptr_t dout, uintptr_t lse, uintptr_t delta, uintptr_t dq, uintptr_t dk,
                        uintptr_t dv, int64_t B, int64_t H, int64_t Hkv, int64_t Lq, int64_t Lk, double scale,
                        bool causal, int bias_kind, uintptr_t bias, std::vector<int64_t> bias_strides,
                        uintptr_t stream);

}  // namespace ff
