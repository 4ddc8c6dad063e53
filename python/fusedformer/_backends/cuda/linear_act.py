"""cuda backend: linear_act = act(x @ W^T + b). The GEMM is torch's matmul; csrc/linear_act.cu
is the epilogue (bias + activation forward, dh = act'(preact) * dy backward), written over the
GEMM output in place so preact costs no extra buffer."""

import torch

from fusedformer._backends.cuda import _common
from fusedformer.vocabulary import ACTIVATIONS, GATED_ACTIVATIONS

REQUIRED_SYMBOLS = ("bias_act_forward", "bias_act_backward", "set_device")

# codes of csrc/linear_act.cu's Act
ACT_CODES = {name: a.cuda_code for name, a in ACTIVATIONS.items() if a.cuda_code is not None}


def unsupported(x, weight, bias, activation):
    reason = _common.dtype_reason("linear_act", x)
    if reason:
        return reason
    if activation not in ACT_CODES:
        return f"the cuda linear_act epilogue has no activation {activation!r}"
    return None


def _bias_act(ext, z, bias, activation, stream):
    """z (M, N) -> (y, preact): preact = z + bias written over z."""
    gated = activation in GATED_ACTIVATIONS
    M, N = z.shape
    Ny = N // 2 if gated else N
    y = torch.empty(M, Ny, dtype=z.dtype, device=z.device)
    b = None if bias is None else bias.detach().to(torch.float32).contiguous()
    vec = _common.rows_aligned(z, y) and (not gated or (Ny * z.element_size()) % 16 == 0)
    ext.bias_act_forward(_common.code(z), z.data_ptr(), _common.ptr(b), y.data_ptr(), M, Ny, z.stride(0),
                         y.stride(0), ACT_CODES[activation], vec, stream)
    return y, z


def linear_act_forward(x, weight, bias, activation):
    ext = _common.extension(REQUIRED_SYMBOLS)
    z = torch.matmul(x, weight.t()).contiguous()
    with _common.launch_context(x) as stream:
        return _bias_act(ext, z, bias, activation, stream)


def linear_act_backward(grad_y, x, weight, bias, preact, activation):
    ext = _common.extension(REQUIRED_SYMBOLS)
    gated = activation in GATED_ACTIVATIONS
    with _common.launch_context(x) as stream:
        if preact is None:
            _, preact = _bias_act(ext, torch.matmul(x, weight.t()).contiguous(), bias, activation, stream)
        h = _common.unit_rows(preact.to(x.dtype))
        dy = _common.unit_rows(grad_y.to(x.dtype))
        M, N = h.shape
        Ny = N // 2 if gated else N
        dh = torch.empty(M, N, dtype=x.dtype, device=x.device)
        vec = _common.rows_aligned(dy, h, dh) and (not gated or (Ny * h.element_size()) % 16 == 0)
        ext.bias_act_backward(_common.code(h), dy.data_ptr(), h.data_ptr(), dh.data_ptr(), M, Ny, dy.stride(0),
                              h.stride(0), dh.stride(0), ACT_CODES[activation], vec, stream)
    dx = dh @ weight
    dweight = dh.t() @ x
    dbias = dh.sum(0, dtype=torch.float32).to(bias.dtype) if bias is not None else None
    return dx, dweight.to(weight.dtype), dbias
