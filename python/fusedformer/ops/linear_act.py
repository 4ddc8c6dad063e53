"""ff.linear_act: act(x @ W^T + b), the first half of a transformer MLP."""

import math

import torch

from fusedformer import backends
from fusedformer._backends.tables import LINEAR_ACT
from fusedformer.ops._checks import FLOAT_DTYPES, check_float, check_same_device, check_same_dtype
from fusedformer.ops._dispatch import call, custom_op, differentiable
from fusedformer.vocabulary import ACTIVATIONS, FUSED_ACTIVATIONS

OP = LINEAR_ACT.name


def output_width(weight, activation):
    return ACTIVATIONS[activation].output_width(weight.shape[0])


def rows_backend(backend, x, *weights):
    """The backend that runs x (M, K) against ``weights``: empty inputs go to the reference."""
    if x.numel() == 0:
        return "reference"
    for w in weights:  # a loop, not any(generator): this runs on every call
        if w.numel() == 0:
            return "reference"
    return backend


@custom_op("linear_act_fwd")
def linear_act_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (y (M, N or N/2), preact (M, N))."""
    impl = LINEAR_ACT.implementation(rows_backend(backend, x, weight))
    y, preact = impl.linear_act_forward(x, weight, bias, activation)
    return y, preact


@linear_act_fwd.register_fake
def _(x, weight, bias, activation, backend):
    return x.new_empty(x.shape[0], output_width(weight, activation)), x.new_empty(x.shape[0], weight.shape[0])


@custom_op("linear_act_bwd")
def linear_act_bwd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   preact: torch.Tensor, activation: str, backend: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx, dweight, dbias or an empty tensor)."""
    impl = LINEAR_ACT.implementation(rows_backend(backend, x, weight))
    dx, dw, db = impl.linear_act_backward(grad_y, x, weight, bias, preact, activation)
    return dx, dw, db if db is not None else x.new_empty(0)


@linear_act_bwd.register_fake
def _(grad_y, x, weight, bias, preact, activation, backend):
    db = bias.new_empty(bias.shape) if bias is not None else x.new_empty(0)
    return x.new_empty(x.shape), weight.new_empty(weight.shape), db


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation, backend = inputs
    ctx.activation, ctx.backend = activation, backend
    ctx.save_for_backward(x, weight, bias, output[1])


def _backward(ctx, grad_y, grad_preact):
    x, weight, bias, preact = ctx.saved_tensors
    dx, dw, db = call(linear_act_bwd, grad_y, x, weight, bias, preact, ctx.activation, ctx.backend)
    return dx, dw, db if bias is not None else None, None, None


_linear_act_fwd = differentiable(linear_act_fwd, _setup_context, _backward)


def validate_linear(op, x, weight, bias, activation, weight_name="weight", bias_name="bias", in_features=None):
    """x (..., K) against weight (N, in_features, x's K by default) and bias (N,)."""
    if plain_call(x, weight, bias, activation, in_features):
        return
    check_float(op, "x", x)
    check_float(op, weight_name, weight)
    check_float(op, bias_name, bias, optional=True)
    check_same_device(op, "x", x, **{weight_name: weight, bias_name: bias})
    check_same_dtype(op, "x", x, **{weight_name: weight, bias_name: bias})
    if not isinstance(activation, str):
        raise TypeError(f"{op}: activation must be a str, got {type(activation).__name__}")
    if activation not in FUSED_ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation {activation!r}; choose one of {FUSED_ACTIVATIONS}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dim, got a 0-D tensor")
    if weight.dim() != 2:
        raise ValueError(f"{op}: {weight_name} must be 2-D (out_features, in_features), got shape "
                         f"{tuple(weight.shape)}")
    features = x.shape[-1] if in_features is None else in_features
    if weight.shape[1] != features:
        raise ValueError(f"{op}: {weight_name} has shape {tuple(weight.shape)} but x has {features} "
                         f"features; expected ({weight.shape[0]}, {features})")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: {bias_name} has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    if ACTIVATIONS[activation].gated and weight.shape[0] % 2:
        raise ValueError(f"{op}: activation {activation!r} needs an even number of {weight_name} rows "
                         f"([gate; up]), got {weight.shape[0]}")


def plain_call(x, weight, bias, activation, in_features=None):
    """Whether the call is the common valid one (float tensors of one dtype on x's device, the
    shapes matching, a known activation), told in a few attribute reads: the checks one by one
    cost a third of a small GEMM. False sends the call through every check."""
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and type(activation) is str):
        return False
    dtype, device = x.dtype, x.device
    if (dtype not in FLOAT_DTYPES or weight.dtype is not dtype or weight.ndim != 2 or not x.ndim
            or activation not in FUSED_ACTIVATIONS or weight.device != device):
        return False
    n, k = weight.shape
    if k != (x.shape[-1] if in_features is None else in_features) or ACTIVATIONS[activation].gated and n % 2:
        return False
    return bias is None or (isinstance(bias, torch.Tensor) and bias.dtype is dtype and bias.shape == (n,)
                            and bias.device == device)


@custom_op("linear_act_infer")
def linear_act_infer(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
                     backend: str) -> torch.Tensor:
    """x (M, K) -> y alone, for calls that need no gradient: a backend defining the optional
    ``linear_act_inference`` skips writing the (M, N) preact."""
    impl = LINEAR_ACT.implementation(rows_backend(backend, x, weight))
    return impl.linear_act_inference(x, weight, bias, activation)


@linear_act_infer.register_fake
def _(x, weight, bias, activation, backend):
    return x.new_empty(x.shape[0], output_width(weight, activation))


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear_act_rows(x2, weight, bias, activation, backend):
    """linear_act on 2-D (M, K) rows, x2 already validated."""
    name = backends.select(OP, x2.device, (x2, weight, bias, activation), backend)
    if not _needs_grad(x2, weight, bias):
        return call(linear_act_infer, x2, weight, bias, activation, name)
    return _linear_act_fwd(x2, weight, bias, activation, name)[0]


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "gelu", *,
               backend: str | None = None) -> torch.Tensor:
    """act(x @ weight^T + bias) for x (..., K), weight (N, K), bias (N,). Activations: relu,
    gelu (erf), gelu_tanh, silu, identity, and gated swiglu / geglu, for which weight stacks
    [gate; up] (N = 2F) and the result act(gate) * up is (..., F). x, weight and bias share one
    float dtype, the result's.

    Backends: reference and torch any float dtype; triton float16/bfloat16 through its GEMM with
    the epilogue fused (needs triton >= 3.4), float32 through cuBLAS and a fused epilogue kernel;
    cuda cuBLAS and its epilogue kernel."""
    if type(x) is torch.Tensor:  # the lean path (see backends.lean_choice)
        impl = backends.lean_choice(OP, x, backend)
        if impl is not None and plain_call(x, weight, bias, activation) and x.numel() and weight.numel():
            try:
                return impl.linear_act_lean(x, weight, bias, activation)
            except Exception:  # refused: the full path's checks name the argument
                pass
    validate_linear(OP, x, weight, bias, activation)
    if x.ndim == 2:
        return linear_act_rows(x, weight, bias, activation, backend)
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # reshape(-1, K) cannot tell M when K is 0
    y = linear_act_rows(x2, weight, bias, activation, backend)
    return y.view(*x.shape[:-1], y.shape[-1])
