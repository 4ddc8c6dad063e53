"""fusedformer._C's attention entry points run by the lane emulation (_attention_emulator) on CPU
tensors, behind the real Python cuda backend (fusedformer/_backends/cuda/attention.py).

`emulated_cuda_attention()` swaps this in for _C: the backend's own host code (alignment copies,
mask strides, buffers, the GQA sum of dK/dV, dtype casts) runs unchanged and hands raw pointers
to these launchers, which find the tensors behind them (every tensor the backend creates is
recorded by a dispatch mode) and run the kernels. `exact_attention_forward/backward` take the
same path in float64 (a dtype code _C does not have), so the kernel's algorithm can be checked
against the reference with no rounding at all.
"""

import contextlib
import types
from unittest import mock

import torch
from _attention_emulator import attn_bwd_delta_kernel, attn_bwd_kernel, attn_fwd_kernel, kBM, kBN
from _device_memory import EXACT_CODE, DeviceMemory, Numerics
from fusedformer._backends.cuda import _common
from fusedformer._backends.cuda import attention as cuda_attention
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _RecordTensors(TorchDispatchMode):
    """Remembers every tensor an op returns, so a raw pointer can be traced to its storage."""

    def __init__(self):
        super().__init__()
        self.tensors = []

    def __torch_dispatch__(self, func, tensor_types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.tensors += [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def _require(ok, msg):  # common.cuh: require (std::invalid_argument -> ValueError)
    if not ok:
        raise ValueError("fusedformer._C: " + msg)


def _make_params(mem, q, k, v, strides, B, H, Hkv, Lq, Lk, scale, causal, bias_kind, bias, bias_strides):
    """attention.cu: make_params, with each pointer resolved to the memory behind it."""
    _require(len(strides) == 9, "attention: expected 9 q/k/v strides")
    _require(len(bias_strides) == 4, "attention: expected 4 bias strides")
    _require(B > 0 and H > 0 and Hkv > 0 and H % Hkv == 0 and Lq > 0 and Lk > 0, "attention: bad sizes")
    _require(0 <= bias_kind <= 2 and (bias_kind == 0) == (bias == 0), "attention: bad bias")
    _require(B < 65535 and H < 65535, "emulation: one block per (b, h), no grid-stride loop")
    num = mem.numerics
    names = ("q_sb", "q_sh", "q_sl", "k_sb", "k_sh", "k_sl", "v_sb", "v_sh", "v_sl")
    bias_buf = mem.buffer(bias, "uint8" if bias_kind == 1 else "float") if bias_kind else None
    return types.SimpleNamespace(
        num=num, q=mem.buffer(q, "T"), k=mem.buffer(k, "T"), v=mem.buffer(v, "T"), **dict(zip(names, strides)),
        B=B, H=H, Hkv=Hkv, Lq=Lq, Lk=Lk, scale=num.f(scale), causal=bool(causal),
        bias=types.SimpleNamespace(kind=bias_kind, buf=bias_buf, sb=bias_strides[0], sh=bias_strides[1],
                                   sq=bias_strides[2], sk=bias_strides[3]))


def _check_dtype(dtype, head_dim, what):  # FF_DISPATCH_HALF and the head_dim require()
    _require(dtype in (1, 2, EXACT_CODE), f"dtype code {dtype} is not fp16/bf16")
    _require(head_dim in (64, 128), f"{what}: head_dim must be 64 or 128, got {head_dim}")


class EmulatedC:
    """The attention part of fusedformer._C; `tensors` are those the pointers may point into."""

    def __init__(self, tensors):
        self._tensors = tensors

    def set_device(self, index):
        pass

    def attention_forward(self, dtype, head_dim, q, k, v, strides, out, lse, B, H, Hkv, Lq, Lk, scale, causal,
                          bias_kind, bias, bias_strides, stream):
        """attention.cu: attention_forward: one attn_fwd_kernel<T, head_dim> launch."""
        _check_dtype(dtype, head_dim, "attention_forward")
        mem = DeviceMemory(self._tensors(), Numerics(dtype))
        p = _make_params(mem, q, k, v, strides, B, H, Hkv, Lq, Lk, scale, causal, bias_kind, bias, bias_strides)
        p.o, p.lse = mem.buffer(out, "T"), mem.buffer(lse, "float")
        for block_x in range((Lq + kBM - 1) // kBM):
            attn_fwd_kernel(p, head_dim, block_x)
        mem.flush()

    def attention_backward(self, dtype, head_dim, q, k, v, strides, out, dout, lse, delta, dq, dk, dv, B, H, Hkv,
                           Lq, Lk, scale, causal, bias_kind, bias, bias_strides, stream):
        """attention.cu: attention_backward: attn_bwd_delta_kernel<T>, then attn_bwd_kernel<T, head_dim>."""
        _check_dtype(dtype, head_dim, "attention_backward")
        mem = DeviceMemory(self._tensors(), Numerics(dtype))
        p = _make_params(mem, q, k, v, strides, B, H, Hkv, Lq, Lk, scale, causal, bias_kind, bias, bias_strides)
        p.delta = mem.buffer(delta, "float")
        attn_bwd_delta_kernel(p.num, mem.buffer(dout, "T"), mem.buffer(out, "T"), p.delta, B * H * Lq, head_dim)
        mem.flush()  # the second launch reads delta from memory
        p.dout, p.lse, p.delta = mem.buffer(dout, "T"), mem.buffer(lse, "float"), mem.buffer(delta, "float")
        p.dq, p.dk, p.dv = mem.buffer(dq, "float"), mem.buffer(dk, "float"), mem.buffer(dv, "float")
        for block_x in range((Lk + kBN - 1) // kBN):
            attn_bwd_kernel(p, head_dim, block_x)
        mem.flush()


@contextlib.contextmanager
def emulated_cuda_attention(*inputs):
    """Within the block, fusedformer._backends.cuda.attention runs on the CPU with the emulated _C;
    `inputs` are the tensors the caller passes it (the backend's own are recorded)."""
    recorder = _RecordTensors()
    ext = EmulatedC(lambda: list(inputs) + recorder.tensors)
    with mock.patch.object(_common, "extension", lambda required=(): ext), \
            mock.patch.object(_common, "launch_context", lambda t: contextlib.nullcontext(0)), recorder:
        yield cuda_attention


def _exact_bias(bias, B, H, Lq, Lk):
    """cuda_attention._bias_args, a float mask kept in float64 (its float32 copy would round)."""
    kind, t, strides = cuda_attention._bias_args(bias, B, H, Lq, Lk)
    if kind == cuda_attention._FLOAT_BIAS:
        t = t.to(torch.float64)
        assert list(t.expand(B, H, Lq, Lk).stride()) == strides
    return kind, t, strides


def exact_attention_forward(q, k, v, bias, causal, scale):
    """The kernel in float64 through the launcher (the host code of cuda_attention.attention_forward,
    every buffer float64): (out, lse)."""
    q, k, v = (_common.dense_aligned(t) for t in (q, k, v))
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    out, lse = q.new_empty(B, H, Lq, D), q.new_empty(B, H, Lq)
    kind, bias_t, bias_strides = _exact_bias(bias, B, H, Lq, Lk)
    EmulatedC(lambda: [q, k, v, out, lse, bias_t]).attention_forward(
        EXACT_CODE, D, q.data_ptr(), k.data_ptr(), v.data_ptr(), cuda_attention._qkv_strides(q, k, v),
        out.data_ptr(), lse.data_ptr(), B, H, Hkv, Lq, Lk, scale, causal, kind, _common.ptr(bias_t), bias_strides, 0)
    return out, lse


def exact_attention_backward(dout, q, k, v, bias, out, lse, causal, scale):
    """As cuda_attention.attention_backward in float64: (dq, dk, dv), dk/dv summed over GQA groups."""
    q, k, v = (_common.dense_aligned(t) for t in (q, k, v))
    dout, out = dout.contiguous(), out.contiguous()
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    delta, dq = q.new_empty(B, H, Lq), q.new_zeros(B, H, Lq, D)
    dk, dv = q.new_empty(B, H, Lk, D), q.new_empty(B, H, Lk, D)
    kind, bias_t, bias_strides = _exact_bias(bias, B, H, Lq, Lk)
    EmulatedC(lambda: [q, k, v, out, dout, lse, delta, dq, dk, dv, bias_t]).attention_backward(
        EXACT_CODE, D, q.data_ptr(), k.data_ptr(), v.data_ptr(), cuda_attention._qkv_strides(q, k, v),
        out.data_ptr(), dout.data_ptr(), lse.data_ptr(), delta.data_ptr(), dq.data_ptr(), dk.data_ptr(),
        dv.data_ptr(), B, H, Hkv, Lq, Lk, scale, causal, kind, _common.ptr(bias_t), bias_strides, 0)
    group = H // Hkv
    return dq, dk.view(B, Hkv, group, Lk, D).sum(2), dv.view(B, Hkv, group, Lk, D).sum(2)
