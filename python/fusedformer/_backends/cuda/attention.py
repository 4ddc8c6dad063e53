"""cuda backend: FlashAttention-2-style attention on tensor cores (csrc/attention.cu).

Shape legend: B batch, H query heads, Hkv key/value heads, G = H // Hkv, Lq/Lk lengths, D head
dim. Runs fp16/bf16 with D == Dv in HEAD_DIMS, causal, bool or float masks broadcast through
strides (key padding included), GQA. Not in the kernel, so ``auto`` moves on to the next backend:
dropout, sliding windows, ALiBi, and the gradient of a float mask.
"""

import torch

from fusedformer._backends.cuda import _common

REQUIRED_SYMBOLS = ("attention_forward", "attention_backward", "set_device")
HEAD_DIMS = (64, 128)  # the head dims csrc/attention.cu instantiates

# bias kinds of csrc/attention.cu's Bias
_NO_BIAS, _BOOL_BIAS, _FLOAT_BIAS = 0, 1, 2


def _reason(q, v, bias, dropout_p, window, alibi_slopes, bias_grad):
    reason = _common.dtype_reason("attention", q, allowed=_common.HALF_DTYPES)
    if reason:
        return reason + " (tensor-core kernel)"
    D, Dv = q.shape[-1], v.shape[-1]
    if D not in HEAD_DIMS or Dv != D:
        return (f"the cuda attention kernel is compiled for head dims {HEAD_DIMS} with value dim == head dim, "
                f"got head dim {D} and value dim {Dv}")
    if dropout_p > 0.0:
        return "attention dropout is not implemented in the cuda kernel"
    if tuple(window) != (-1, -1):
        return "sliding-window attention is not implemented in the cuda kernel"
    if alibi_slopes is not None:
        return "ALiBi is not implemented in the cuda kernel"
    if bias is not None and bias.dim() != 4:
        return f"the cuda attention kernel takes a 4-D mask, got {bias.dim()}-D"
    if bias_grad:
        return "the gradient of a float attn_mask is not computed by the cuda kernel"
    return None


def unsupported(q, k, v, bias, causal, scale, dropout_p, seed, window, alibi_slopes):
    bias_grad = bias is not None and bias.is_floating_point() and bias.requires_grad
    return _reason(q, v, bias, dropout_p, window, alibi_slopes, bias_grad)


def _qkv_strides(q, k, v):
    return [s for t in (q, k, v) for s in t.stride()[:3]]


def _bias_args(bias, B, H, Lq, Lk):
    """(kind, tensor kept alive, 4 strides): bool masks as uint8, float masks as float32, with
    stride 0 on broadcast dims."""
    if bias is None:
        return _NO_BIAS, None, [0, 0, 0, 0]
    if bias.dtype == torch.bool:
        kind, t = _BOOL_BIAS, bias.view(torch.uint8)
    else:
        kind, t = _FLOAT_BIAS, bias.detach().to(torch.float32)
    return kind, t, list(t.expand(B, H, Lq, Lk).stride())


def _check(q, v, bias, dropout_p, window, alibi_slopes, bias_grad=False):
    reason = _reason(q, v, bias, dropout_p, window, alibi_slopes, bias_grad)
    if reason:
        raise ValueError(f"attention: {reason}")


def attention_forward(q, k, v, bias, causal, scale, dropout_p=0.0, seed=None, window=(-1, -1), alibi_slopes=None):
    _check(q, v, bias, dropout_p, window, alibi_slopes)
    ext = _common.extension(REQUIRED_SYMBOLS)
    q, k, v = (_common.dense_aligned(t) for t in (q, k, v))
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    out = torch.empty(B, H, Lq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    kind, bias_t, bias_strides = _bias_args(bias, B, H, Lq, Lk)
    with _common.launch_context(q) as stream:
        ext.attention_forward(_common.code(q), D, q.data_ptr(), k.data_ptr(), v.data_ptr(), _qkv_strides(q, k, v),
                              out.data_ptr(), lse.data_ptr(), B, H, Hkv, Lq, Lk, float(scale), bool(causal), kind,
                              _common.ptr(bias_t), bias_strides, stream)
    return out, lse


def attention_backward(grad_out, q, k, v, bias, out, lse, causal, scale, dropout_p=0.0, seed=None, window=(-1, -1),
                       alibi_slopes=None, bias_requires_grad=False):
    _check(q, v, bias, dropout_p, window, alibi_slopes,
           bias_grad=bool(bias_requires_grad) and bias is not None and bias.is_floating_point())
    ext = _common.extension(REQUIRED_SYMBOLS)
    q_dtype, k_dtype, v_dtype = q.dtype, k.dtype, v.dtype
    q, k, v = (_common.dense_aligned(t) for t in (q, k, v))
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    dout = _common.dense_aligned(grad_out.to(q.dtype).contiguous())
    out = _common.dense_aligned(out.to(q.dtype).contiguous())
    lse = lse.to(torch.float32).contiguous()
    f32 = dict(dtype=torch.float32, device=q.device)
    delta = torch.empty(B, H, Lq, **f32)
    dq = torch.zeros(B, H, Lq, D, **f32)  # accumulated with atomics
    dk = torch.empty(B, H, Lk, D, **f32)  # per query head; GQA groups are summed below
    dv = torch.empty(B, H, Lk, D, **f32)
    kind, bias_t, bias_strides = _bias_args(bias, B, H, Lq, Lk)
    with _common.launch_context(q) as stream:
        ext.attention_backward(_common.code(q), D, q.data_ptr(), k.data_ptr(), v.data_ptr(), _qkv_strides(q, k, v),
                               out.data_ptr(), dout.data_ptr(), lse.data_ptr(), delta.data_ptr(), dq.data_ptr(),
                               dk.data_ptr(), dv.data_ptr(), B, H, Hkv, Lq, Lk, float(scale), bool(causal), kind,
                               _common.ptr(bias_t), bias_strides, stream)
    if H != Hkv:
        dk = dk.view(B, Hkv, H // Hkv, Lk, D).sum(2)
        dv = dv.view(B, Hkv, H // Hkv, Lk, D).sum(2)
    return dq.to(q_dtype), dk.to(k_dtype), dv.to(v_dtype), None
