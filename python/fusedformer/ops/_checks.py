"""Argument validation shared by the ops: each check raises TypeError/ValueError naming the
op and the argument, before anything reaches a kernel. Also the rows layout the row-wise ops
(norms, linear_act, feed_forward) hand their backends.

These run on every op call, so each tests the valid case first, in as few Python and tensor
attribute operations as it can (a tensor attribute costs ~500 instructions, a Python call ~1000,
a generator several), and works out the message only when it is going to raise.
"""

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(op, name, t, *, optional=False):
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def check_float(op, name, t, *, optional=False):
    if not isinstance(t, torch.Tensor):
        if t is not None or not optional:
            check_tensor(op, name, t)
    elif t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}, expected one of float16, bfloat16, "
                        "float32, float64")


def check_same_device(op, ref_name, ref, **others):
    """Each of ``others`` (None or a tensor) is on ref's device."""
    device = ref.device
    for name, t in others.items():
        if t is not None and (not isinstance(t, torch.Tensor) or t.device != device):
            check_tensor(op, name, t)
            raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {device}")


def check_same_dtype(op, ref_name, ref, **others):
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")


def check_shape(op, name, t, expected):
    # torch.Size compares equal to a tuple of the same ints; a list expected takes the second test
    if t is not None and t.shape != expected and tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(expected)}")


def check_number(op, name, value, *, low=None, high=None, high_open=False, kind=(int, float)):
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{op}: {name} must be >= {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{op}: {name} must be {'<' if high_open else '<='} {high}, got {value}")


def normalize_dim(op, name, dim, ndim):
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(dim).__name__}")
    size = max(ndim, 1)
    if not -size <= dim < size:
        raise ValueError(f"{op}: {name}={dim} is out of range for a {ndim}-D input")
    return dim % size


def normalized_size(op, x, normalized_shape):
    """The row length N of a norm over ``normalized_shape`` (the trailing dims of x)."""
    if type(normalized_shape) is tuple and len(normalized_shape) == 1:  # the common case first
        n = normalized_shape[0]
        if type(n) is int and x.ndim and x.shape[-1] == n:
            return normalized_shape, n
    if isinstance(normalized_shape, int) and not isinstance(normalized_shape, bool):
        normalized_shape = (normalized_shape,)
    elif isinstance(normalized_shape, (tuple, list)):  # torch.Size is a tuple
        normalized_shape = tuple(normalized_shape)
    if not isinstance(normalized_shape, tuple) or any(
            [not isinstance(n, int) or isinstance(n, bool) for n in normalized_shape]):
        raise TypeError(f"{op}: normalized_shape must be an int or a tuple of ints, got {normalized_shape!r}")
    k, shape = len(normalized_shape), x.shape
    if k == 0 or k > len(shape) or shape[len(shape) - k:] != normalized_shape:
        raise ValueError(f"{op}: normalized_shape {normalized_shape} does not match the trailing dims "
                         f"of input of shape {tuple(shape)}")
    return normalized_shape, math.prod(normalized_shape)


def check_attention_options(op, dropout_p, is_causal, scale, window_size, alibi_slopes, heads, batch):
    """The options attention and varlen attention share; ``alibi_slopes`` is (heads,) or (batch, heads)."""
    check_number(op, "dropout_p", dropout_p)
    if not 0.0 <= dropout_p <= 1.0:  # also refuses NaN, which compares false with everything
        raise ValueError(f"{op}: dropout_p must be in [0, 1], got {dropout_p}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"{op}: is_causal must be a bool, got {type(is_causal).__name__}")
    if scale is not None:
        check_number(op, "scale", scale)
    if window_size is not None:
        if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2 or not all(
                isinstance(w, int) and not isinstance(w, bool) for w in window_size)):
            raise TypeError(f"{op}: window_size must be a (left, right) pair of ints, got {window_size!r}")
        if min(window_size) < -1:
            raise ValueError(f"{op}: window_size entries must be >= 0, or -1 for no limit, got {window_size}")
    if alibi_slopes is not None:
        check_float(op, "alibi_slopes", alibi_slopes)
        if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
            raise ValueError(f"{op}: alibi_slopes has shape {tuple(alibi_slopes.shape)}, expected ({heads},) or "
                             f"({batch}, {heads})")


def as_rows(t, n_dims):
    """(..., *trailing n_dims) -> 2-D (M, N), M and N the products of the leading and trailing
    sizes (reshape(-1, N) cannot tell M when N is 0). A view when the layout allows (unit stride
    in the row), else a contiguous copy."""
    if t.ndim == 2 and n_dims == 1:  # rows already: a reshape that changes nothing still costs ~10k instructions
        rows = t
    else:
        split = t.dim() - n_dims
        rows = t.reshape(math.prod(t.shape[:split]), math.prod(t.shape[split:]))
    return rows if rows.stride(-1) == 1 or rows.numel() == 0 else rows.contiguous()


def as_vector(t):
    """A norm's weight or bias (normalized_shape) as 1-D: itself when it is already (or None)."""
    return t if t is None or t.ndim == 1 else t.reshape(-1)
