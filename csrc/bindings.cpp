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

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedformer CUDA kernels (raw-pointer launchers; see python/fusedformer/_backends/cuda)";
  m.attr("DTYPE_FLOAT32") = 0;
  m.attr("DTYPE_FLOAT16") = 1;
  m.attr("DTYPE_BFLOAT16") = 2;
  m.attr("ATTENTION_HEAD_DIMS") = py::make_tuple(64, 128);
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
