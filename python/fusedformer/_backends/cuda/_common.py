"""Shared by the cuda backend modules: the compiled extension, dtype codes, alignment checks and
launch context (device + current stream). The kernels take raw pointers, sizes, strides (in
elements) and a stream handle; everything they assume is checked here first."""

import torch

from fusedformer import backends
from fusedformer.kernels import _device

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


# The driver branch each CUDA major version needs at least (NVIDIA's compatibility table)
MIN_DRIVER_BRANCH = {12: 525, 13: 580}

_runtime_reasons = {}  # device index -> runtime_reason(); a GPU's driver and architecture never change


def _version(v):
    return f"{v // 1000}.{v % 1000 // 10}"


def _arch_capability(target):
    """(major, minor) of a build target such as "sm_90a" or "compute_90"."""
    digits = target.split("_")[1].rstrip("af")
    return int(digits[:-1]), int(digits[-1])


def runs_on(targets, capability):
    """Whether a binary with these build targets has code a GPU of ``capability`` can run:
    sm_XY (and family-specific sm_XYf) machine code on XY and later minors of the same major,
    arch-specific sm_XYa on XY only, compute_XY PTX on XY and every later GPU (the driver
    compiles it)."""
    for target in targets:
        arch = _arch_capability(target)
        if target.startswith("compute_"):
            if capability >= arch:
                return True
        elif target.endswith("a"):
            if capability == arch:
                return True
        elif capability[0] == arch[0] and capability[1] >= arch[1]:
            return True
    return False


def runtime_reason(device_index):
    """Why fusedformer._C cannot launch kernels on GPU ``device_index`` although it imports, or
    None: a driver older than the CUDA runtime linked into _C, or a GPU architecture _C has no
    code for. Either would make every op fail at its first launch."""
    if device_index not in _runtime_reasons:
        missing = missing_symbols(("probe", "BUILT_ARCHS"))
        if missing:
            return f"fusedformer._C is stale: it lacks {', '.join(missing)}; rebuild it"
        ext = extension()
        _runtime_reasons[device_index] = _probe_reason(ext.probe(device_index), tuple(ext.BUILT_ARCHS))
    return _runtime_reasons[device_index]


def _probe_reason(info, built):
    driver, runtime = info["driver_version"], info["runtime_version"]
    if driver == 0:
        return "fusedformer._C finds no NVIDIA driver"
    if driver // 1000 < runtime // 1000:
        branch = MIN_DRIVER_BRANCH.get(runtime // 1000)
        need = f" (R{branch} or newer)" if branch else ""
        return (f"the NVIDIA driver supports CUDA {_version(driver)}, but fusedformer._C links the CUDA "
                f"{_version(runtime)} runtime: it needs a driver for CUDA {runtime // 1000}.x{need}")
    if "error" in info:
        return f"fusedformer._C's CUDA runtime cannot use the GPU ({info['error']})"
    capability = tuple(info["capability"])
    if not runs_on(built, capability):
        arch = f"{capability[0]}{capability[1]}"
        return (f"fusedformer._C is built for {', '.join(built)}, which cannot run on this GPU (sm_{arch}): "
                f"rebuild with FUSEDFORMER_CUDA_ARCHS={arch}")
    return None


def missing_symbols(required):
    """The names of ``required`` that the built _C lacks (all of them when it is not built)."""
    ext = backends.cuda_extension()
    return list(required) if ext is None else [name for name in required if not hasattr(ext, name)]


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
    return _device.properties(device).multi_processor_count


def weight_vector(t):
    """A norm's (N,) weight or bias as the contiguous fp32 vector the kernels read, or None."""
    return None if t is None else t.detach().to(torch.float32).contiguous()


def num_partials(M, device):
    """Blocks of a norm backward = rows of the dW/dB partial buffers: enough to fill the GPU twice."""
    return max(1, min(M, 2 * num_sms(device)))


def norm_backward_buffers(grad_y, x, grad_residual_out):
    """(x2, dy2, dr2, dx, nparts): a norm backward's row inputs with unit-stride rows, gradients in
    x's dtype, its dx output and how many blocks write parameter-gradient partial sums."""
    x2, dy2 = unit_rows(x), unit_rows(grad_y.to(x.dtype))
    dr2 = unit_rows(grad_residual_out.to(x.dtype)) if grad_residual_out is not None else None
    dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    return x2, dy2, dr2, dx, num_partials(x2.shape[0], x.device)


def norm_forward_buffers(x, residual, row_stats):
    """(x2, r2, y, res_out, *stats): a norm forward's row inputs with unit-stride rows, its output,
    the residual-sum output (None without a residual) and ``row_stats`` fp32 (M,) vectors (mean,
    rstd)."""
    x2, r2 = unit_rows(x), unit_rows(residual)
    M, N = x2.shape
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    res_out = torch.empty(M, N, dtype=residual.dtype, device=x.device) if residual is not None else None
    return (x2, r2, y, res_out, *(torch.empty(M, dtype=torch.float32, device=x.device) for _ in range(row_stats)))


def param_grad_buffers(param, nparts, N, device):
    """(partials, total): fp32 (nparts, N) per-block partial sums of a norm parameter's gradient and
    their (N,) reduction, both None when the parameter is."""
    if param is None:
        return None, None
    f32 = dict(dtype=torch.float32, device=device)
    return torch.empty(nparts, N, **f32), torch.empty(N, **f32)
