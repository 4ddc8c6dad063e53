"""Shared by the cuda backend modules: the compiled extension, dtype codes, alignment checks and
launch context (device + current stream). The kernels take raw pointers, sizes, strides (in
elements) and a stream handle; everything they assume is checked here first."""

import torch

from fusedformer import backends

# codes of csrc/common.cuh's ff::DType
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
HALF_DTYPES = (torch.float16, torch.bfloat16)


def extension(required=()):
    """fusedformer._C, checked to export ``required``; raises RuntimeError when it cannot run."""
    ext = backends.cuda_extension()
    if ext is None:
        raise RuntimeError("fusedformer._C is not built (no nvcc at install time, or FUSEDFORMER_BUILD_CUDA=0)")
    missing = [name for name in required if not hasattr(ext, name)]
    if missing:
        raise RuntimeError(f"fusedformer._C is stale: it lacks {', '.join(missing)}; rebuild it")
    return ext


def dtype_reason(op, t, allowed=tuple(DTYPE_CODES)):
    """Why the cuda ``op`` cannot take ``t``'s dtype, or None."""
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        return f"the cuda {op} kernel takes {names}, not {str(t.dtype).replace('torch.', '')}"
    return None


def norm_reason(op, x, residual):
    """Why the cuda norm ``op`` cannot take x (its dtype) or residual (not in x's dtype), or None."""
    reason = dtype_reason(op, x)
    if reason:
        return reason
    if residual is not None and residual.dtype != x.dtype:
        return (f"the cuda {op} kernel needs residual in x's dtype ({str(x.dtype).replace('torch.', '')}), "
                f"got {str(residual.dtype).replace('torch.', '')}")
    return None


def code(t):
    return DTYPE_CODES[t.dtype]


def ptr(t):
    return 0 if t is None else t.data_ptr()


def row_stride(t):
    return 0 if t is None else t.stride(0)


def unit_rows(t):
    """A 2-D tensor whose rows have unit element stride (a copy only when they do not)."""
    if t is None:
        return None
    return t if t.stride(-1) == 1 or t.numel() == 0 else t.contiguous()


def rows_aligned(*tensors):
    """True when every row start of these 2-D tensors is 16-byte aligned: the kernels may then
    use 16-byte vector loads and stores (the row tail is handled element-wise)."""
    for t in tensors:
        if t is None:
            continue
        if t.data_ptr() % 16 or (t.shape[0] > 1 and (t.stride(0) * t.element_size()) % 16):
            return False
    return True


def dense_aligned(t):
    """``t`` with unit last stride, a 16-byte aligned start and strides that are multiples of
    16 bytes (what cp.async tile loads need); copied only when it is not already so."""
    esize = t.element_size()
    ok = t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(
        (s * esize) % 16 == 0 for n, s in zip(t.shape[:-1], t.stride()[:-1]) if n > 1)
    return t if ok else t.clone(memory_format=torch.contiguous_format)


class launch_context:
    """``with launch_context(t) as stream:`` — t's device is current (in torch and in _C's own
    static CUDA runtime) and ``stream`` is torch's current stream handle there."""

    def __init__(self, t):
        self.device = t.device
        self._guard = torch.cuda.device(t.device)

    def __enter__(self):
        self._guard.__enter__()
        extension(("set_device",)).set_device(self.device.index if self.device.index is not None
                                               else torch.cuda.current_device())
        return torch.cuda.current_stream(self.device).cuda_stream

    def __exit__(self, *exc):
        return self._guard.__exit__(*exc)


def num_sms(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def weight_vector(t):
    """A norm's (N,) weight or bias as the contiguous fp32 vector the kernels read, or None."""
    return None if t is None else t.detach().to(torch.float32).contiguous()


def num_partials(M, device):
    """Blocks of a norm backward = rows of the dW/dB partial buffers: enough to fill the GPU twice."""
    return max(1, min(M, 2 * num_sms(device)))


def norm_backward_rows(grad_y, x, grad_residual_out):
    """(x2, dy2, dr2): a norm backward's row inputs with unit-stride rows, gradients in x's dtype."""
    x2, dy2 = unit_rows(x), unit_rows(grad_y.to(x.dtype))
    dr2 = unit_rows(grad_residual_out.to(x.dtype)) if grad_residual_out is not None else None
    return x2, dy2, dr2
