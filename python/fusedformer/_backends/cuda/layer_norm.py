"""cuda backend: LayerNorm over the last dim of (M, N) rows, residual add fused
(csrc/layer_norm.cu). dweight/dbias are reduced deterministically: per-block partial sums, then
a second kernel over the blocks."""

import torch

from fusedformer._backends.cuda import _common

REQUIRED_SYMBOLS = ("layer_norm_forward", "layer_norm_backward", "set_device")


def unsupported(x, weight, bias, eps, residual):
    return _common.norm_reason("layer_norm", x, residual)


def layer_norm_forward(x, weight, bias, eps, residual=None):
    ext = _common.extension(REQUIRED_SYMBOLS)
    x2, r2, y, res_out, mean, rstd = _common.norm_forward_buffers(x, residual, row_stats=2)
    M, N = x2.shape
    w, b = _common.weight_vector(weight), _common.weight_vector(bias)
    with _common.launch_context(x) as stream:
        ext.layer_norm_forward(_common.code(x), x2.data_ptr(), _common.ptr(r2), _common.ptr(w), _common.ptr(b),
                               y.data_ptr(), _common.ptr(res_out), mean.data_ptr(), rstd.data_ptr(), M, N,
                               x2.stride(0), _common.row_stride(r2), y.stride(0), _common.row_stride(res_out),
                               float(eps), _common.rows_aligned(x2, r2, y, res_out), stream)
    return y, res_out, mean, rstd


def layer_norm_backward(grad_y, x, weight, bias, mean, rstd, grad_residual_out=None):
    ext = _common.extension(REQUIRED_SYMBOLS)
    x2, dy2, dr2, dx, nparts = _common.norm_backward_buffers(grad_y, x, grad_residual_out)
    M, N = x2.shape
    dw_part, dw = _common.param_grad_buffers(weight, nparts, N, x.device)
    db_part, db = _common.param_grad_buffers(bias, nparts, N, x.device)
    w = _common.weight_vector(weight)
    mean32, rstd32 = mean.to(torch.float32).contiguous(), rstd.to(torch.float32).contiguous()
    with _common.launch_context(x) as stream:
        ext.layer_norm_backward(_common.code(x), dy2.data_ptr(), x2.data_ptr(), _common.ptr(w), mean32.data_ptr(),
                                rstd32.data_ptr(), _common.ptr(dr2), dx.data_ptr(), _common.ptr(dw_part),
                                _common.ptr(db_part), _common.ptr(dw), _common.ptr(db), M, N, dy2.stride(0),
                                x2.stride(0), _common.row_stride(dr2), dx.stride(0), nparts,
                                _common.rows_aligned(dy2, x2, dr2, dx), stream)
    return (dx, dw.to(weight.dtype) if weight is not None else None,
            db.to(bias.dtype) if bias is not None else None)
