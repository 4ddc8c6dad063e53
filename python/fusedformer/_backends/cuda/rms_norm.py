"""cuda backend: RMSNorm over the last dim of (M, N) rows, residual add fused (csrc/rms_norm.cu);
deterministic dweight as in layer_norm."""

import torch

from fusedformer._backends.cuda import _common

REQUIRED_SYMBOLS = ("rms_norm_forward", "rms_norm_backward", "set_device")


def unsupported(x, weight, eps, residual):
    return _common.norm_reason("rms_norm", x, residual)


def rms_norm_forward(x, weight, eps, residual=None):
    ext = _common.extension(REQUIRED_SYMBOLS)
    x2, r2, y, res_out, rstd = _common.norm_forward_buffers(x, residual, row_stats=1)
    M, N = x2.shape
    w = _common.weight_vector(weight)
    with _common.launch_context(x) as stream:
        ext.rms_norm_forward(_common.code(x), x2.data_ptr(), _common.ptr(r2), _common.ptr(w), y.data_ptr(),
                             _common.ptr(res_out), rstd.data_ptr(), M, N, x2.stride(0), _common.row_stride(r2),
                             y.stride(0), _common.row_stride(res_out), float(eps),
                             _common.rows_aligned(x2, r2, y, res_out), stream)
    return y, res_out, rstd


def rms_norm_backward(grad_y, x, weight, rstd, grad_residual_out=None):
    ext = _common.extension(REQUIRED_SYMBOLS)
    x2, dy2, dr2, dx, nparts = _common.norm_backward_buffers(grad_y, x, grad_residual_out)
    M, N = x2.shape
    dw_part, dw = _common.param_grad_buffers(weight, nparts, N, x.device)
    w = _common.weight_vector(weight)
    rstd32 = rstd.to(torch.float32).contiguous()
    with _common.launch_context(x) as stream:
        ext.rms_norm_backward(_common.code(x), dy2.data_ptr(), x2.data_ptr(), _common.ptr(w), rstd32.data_ptr(),
                              _common.ptr(dr2), dx.data_ptr(), _common.ptr(dw_part), _common.ptr(dw), M, N,
                              dy2.stride(0), x2.stride(0), _common.row_stride(dr2), dx.stride(0), nparts,
                              _common.rows_aligned(dy2, x2, dr2, dx), stream)
    return dx, dw.to(weight.dtype) if weight is not None else None
