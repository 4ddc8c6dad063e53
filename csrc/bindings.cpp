// pybind11 module fusedformer._C: the host launchers of csrc/*.cu. No libtorch: arguments are
// integers (data pointers, sizes, strides, stream handles), floats and bools. C++ exceptions
// become Python exceptions: std::invalid_argument -> ValueError, ff::CudaError (a
// std::runtime_error carrying cudaGetErrorString) -> RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "ops.h"

#ifndef FF_BUILT_ARCHS
#define FF_BUILT_ARCHS
#endif

namespace py = pybind11;

// _C links its own static CUDA runtime, whose current device is not torch's: the Python side
// sets it before every launch (a no-op when it is already current).
static void set_device(int device) {
  const cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fusedformer._C: cudaSetDevice(") + std::to_string(device) +
                             ") failed: " + cudaGetErrorString(err));
  }
}

// What the CUDA runtime linked into _C sees, for the backend's availability check
// (python/fusedformer/_backends/cuda/_common.py): the driver's and the runtime's CUDA versions
// (1000 * major + 10 * minor; driver 0: no driver) and `device`'s compute capability, or the
// error that kept the runtime from reading it (an old driver, no device).
static py::dict probe(int device) {
  py::dict info;
  int driver = 0, runtime = 0, major = 0, minor = 0;
  cudaDriverGetVersion(&driver);
  cudaRuntimeGetVersion(&runtime);
  info["driver_version"] = driver;
  info["runtime_version"] = runtime;
  cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err == cudaSuccess) {
    info["capability"] = py::make_tuple(major, minor);
  } else {
    cudaGetLastError();  // a failed query must not surface at the next launch check
    info["error"] = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  }
  return info;
}

static py::list launch_limits() {
  py::list out;
  for (auto family : {ff::softmax_launch_limits, ff::norm_launch_limits, ff::linear_act_launch_limits,
                      ff::attention_launch_limits}) {
    for (const ff::LaunchLimit& l : family()) {
      py::dict d;
      d["kernel"] = l.kernel;
      d["head_dim"] = l.head_dim;
      d["max_threads"] = l.max_threads;
      d["max_dynamic_smem"] = l.max_dynamic_smem == ff::kRowCacheSmem ? py::object(py::none())
                                                                      : py::object(py::int_(l.max_dynamic_smem));
      d["opt_in"] = l.opt_in;
      out.append(d);
    }
  }
  return out;
}

// setup.py passes the targets of the build (e.g. sm_80:sm_90a:compute_90) as FF_BUILT_ARCHS
#define FF_STRINGIFY(...) #__VA_ARGS__
#define FF_STRING(...) FF_STRINGIFY(__VA_ARGS__)

static py::tuple built_archs() {
  py::list archs;
  std::string all = FF_STRING(FF_BUILT_ARCHS), item;
  for (char c : all + ":") {
    if (c != ':') {
      item += c;
    } else if (!item.empty()) {
      archs.append(item);
      item.clear();
    }
  }
  return py::tuple(archs);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedformer CUDA kernels (raw-pointer launchers; see python/fusedformer/_backends/cuda)";
  m.attr("DTYPE_FLOAT32") = 0;
  m.attr("DTYPE_FLOAT16") = 1;
  m.attr("DTYPE_BFLOAT16") = 2;
  m.attr("ATTENTION_HEAD_DIMS") = py::make_tuple(64, 128);
  m.attr("BUILT_ARCHS") = built_archs();
  m.attr("DEFAULT_SMEM_BYTES") = ff::kDefaultSmemBytes;
  m.def("probe", &probe, py::arg("device"));
  m.def("launch_limits", &launch_limits,
        "the largest launch of every kernel: max_threads, max_dynamic_smem (None: a row cache, "
        "row_cache_bytes of the device), opt_in");
  m.def("row_cache_bytes", &ff::row_cache_bytes, py::arg("optin_bytes"), py::arg("static_bytes"));
  auto gil = py::call_guard<py::gil_scoped_release>();
  m.def("set_device", &set_device);
  m.def("softmax_forward", &ff::softmax_forward, gil);
  m.def("softmax_backward", &ff::softmax_backward, gil);
  m.def("layer_norm_forward", &ff::layer_norm_forward, gil);
  m.def("layer_norm_backward", &ff::layer_norm_backward, gil);
  m.def("rms_norm_forward", &ff::rms_norm_forward, gil);
  m.def("rms_norm_backward", &ff::rms_norm_backward, gil);
  m.def("bias_act_forward", &ff::bias_act_forward, gil);
  m.def("bias_act_backward", &ff::bias_act_backward, gil);
  m.def("attention_forward", &ff::attention_forward, gil);
  m.def("attention_backward", &ff::attention_backward, gil);
}
