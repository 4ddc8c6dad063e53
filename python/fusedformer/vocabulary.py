"""What every layer of fusedformer shares: the activations, the compute-dtype rule, the tensor
types run eagerly, the Philox dropout stream and the parity rule. Defined once here; the
reference backend, the Triton and CUDA launchers, ops, nn, models, patch and the parity harness
all import them from this module.

It imports torch only (never triton or fusedformer._C), so any layer may use it.
"""

import dataclasses
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

# The tensor types an op runs eagerly (its Python body, or a backend's lean entry); any other
# subclass (fake, functional, a tracer's or a user's __torch_function__ type) takes the custom op.
EAGER_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


# --------------------------------------------------------------------------------------------
# the compute-dtype rule
# --------------------------------------------------------------------------------------------


def compute_dtype(t):
    """The dtype math (and saved statistics: mean, rstd, lse) use for ``t``: float64 stays,
    everything else is float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def empty_dense(t):
    """An uninitialized contiguous tensor of t's shape, dtype and device, for a kernel to fill:
    empty_like with contiguous_format is half the host cost of torch.empty(t.shape, dtype=,
    device=) (9k instructions against 21k: no torch.device object, no keyword parsing)."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def rms_norm_eps(x, eps):
    """RMS norm's epsilon: ``eps``, or for None the machine epsilon of x's compute dtype (as
    F.rms_norm since torch 2.6; 2.5 took a 16-bit x's own)."""
    return torch.finfo(compute_dtype(x)).eps if eps is None else eps


# --------------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------------

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_C = 0.044715


def _gelu(h):
    return 0.5 * h * (1.0 + torch.erf(h * _INV_SQRT_2))


def _gelu_grad(h):
    return 0.5 * (1.0 + torch.erf(h * _INV_SQRT_2)) + h * torch.exp(-0.5 * h * h) * _INV_SQRT_2PI


def _gelu_tanh(h):
    return 0.5 * h * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (h + _GELU_TANH_C * h**3)))


def _gelu_tanh_grad(h):
    t = torch.tanh(_SQRT_2_OVER_PI * (h + _GELU_TANH_C * h**3))
    return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * _GELU_TANH_C * h * h)


def _silu(h):
    return h * torch.sigmoid(h)


def _silu_grad(h):
    s = torch.sigmoid(h)
    return s * (1.0 + h * (1.0 - s))


def _times(derivative):
    """dL/dh = dy * f'(h), for f with a derivative everywhere."""
    return lambda dy, h: dy * derivative(h)


def _relu_grad(dy, h):
    # a select, as torch's threshold_backward: 0 where h <= 0 even for a NaN dy, dy elsewhere
    # (a NaN h included: NaN <= 0 is false)
    return torch.where(h <= 0, 0.0, dy)


@dataclasses.dataclass(frozen=True)
class Elementwise:
    """An elementwise function a (1-D) activation applies."""

    name: str
    kernel_id: int  # the ACT constexpr of kernels/bias_act.py's act_fn / act_grad_fn switch
    forward: Callable  # written out: the reference's math
    grad: Callable  # dL/dh from (dL/dy, h), as torch's backward of torch_forward computes it
    torch_forward: Callable  # torch's own function: what parity and the tests compare against


ELEMENTWISE = {e.name: e for e in (
    # identity copies: the reference's y and its saved preact never alias
    Elementwise("identity", 0, torch.clone, lambda dy, h: dy.clone(), lambda h: h),
    Elementwise("relu", 1, torch.relu, _relu_grad, F.relu),
    Elementwise("gelu", 2, _gelu, _times(_gelu_grad), F.gelu),
    Elementwise("gelu_tanh", 3, _gelu_tanh, _times(_gelu_tanh_grad), functools.partial(F.gelu, approximate="tanh")),
    Elementwise("silu", 4, _silu, _times(_silu_grad), F.silu),
)}


@dataclasses.dataclass(frozen=True)
class Activation:
    """A linear layer's activation. Plain: y = f(h). Gated: h = [gate | up] (the weight stacks
    [W_gate; W_up], 2F rows) and y = f(gate) * up, F wide."""

    name: str
    function: Elementwise  # f
    gated: bool
    # ff.linear_act / ff.feed_forward run it in one fused pass (and the CUDA epilogue knows it
    # as csrc/linear_act.cu's Act code ``cuda_code``). Unfused gated activations run as two
    # GEMMs in nn.FeedForward and patch.
    fused: bool
    cuda_code: int | None

    def forward(self, h):
        """y = act(h), by the reference's written-out math."""
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.function.forward(gate) * up
        return self.function.forward(h)

    def backward(self, grad_y, h):
        """dL/dh given dL/dy (gated: dgate = dy * up * f'(gate), dup = dy * f(gate))."""
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            f = self.function
            return torch.cat([f.grad(grad_y * up, gate), grad_y * f.forward(gate)], dim=-1)
        return self.function.grad(grad_y, h)

    def torch_forward(self, h):
        """act(h) by torch's own functions (F.gelu, F.silu, ...)."""
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.function.torch_forward(gate) * up
        return self.function.torch_forward(h)

    def output_width(self, n):
        """Width of y for a preact of width n."""
        return n // 2 if self.gated else n


ACTIVATIONS = {a.name: a for a in (
    Activation("relu", ELEMENTWISE["relu"], gated=False, fused=True, cuda_code=0),
    Activation("gelu", ELEMENTWISE["gelu"], gated=False, fused=True, cuda_code=1),
    Activation("gelu_tanh", ELEMENTWISE["gelu_tanh"], gated=False, fused=True, cuda_code=2),
    Activation("silu", ELEMENTWISE["silu"], gated=False, fused=True, cuda_code=3),
    Activation("swiglu", ELEMENTWISE["silu"], gated=True, fused=True, cuda_code=5),
    Activation("geglu", ELEMENTWISE["gelu"], gated=True, fused=True, cuda_code=6),
    Activation("identity", ELEMENTWISE["identity"], gated=False, fused=True, cuda_code=4),
    Activation("geglu_tanh", ELEMENTWISE["gelu_tanh"], gated=True, fused=False, cuda_code=None),  # T5 v1.1
    Activation("reglu", ELEMENTWISE["relu"], gated=True, fused=False, cuda_code=None),
)}

# the activations ff.linear_act and ff.feed_forward take, and the gated ones
FUSED_ACTIVATIONS = tuple(name for name, a in ACTIVATIONS.items() if a.fused)
GATED_ACTIVATIONS = tuple(name for name, a in ACTIVATIONS.items() if a.gated)


def gated_activation(function_name):
    """The gated activation whose gate goes through ``function_name`` ('silu' -> swiglu), or None."""
    return next((a for a in ACTIVATIONS.values() if a.gated and a.function.name == function_name), None)


# --------------------------------------------------------------------------------------------
# attention masks: what causal, window, a bool/float mask and ALiBi mean, for every backend
# --------------------------------------------------------------------------------------------


def attention_mask_bias(Lq, Lk, bias, causal, window, alibi_slopes, device, dtype):
    """Everything added to the scaled scores, as one float (.., Lq, Lk) tensor broadcastable to
    (B, H, Lq, Lk): -inf where a bool mask, the causal rule or the window forbids a key, the float
    bias where given, and -slope * |i - j| for ALiBi."""
    i = torch.arange(Lq, device=device)[:, None]
    j = torch.arange(Lk, device=device)[None, :]
    allowed = torch.ones(Lq, Lk, dtype=torch.bool, device=device)
    if causal:
        allowed &= j <= i
    left, right = window
    if left >= 0:
        allowed &= j >= i - left
    if right >= 0:
        allowed &= j <= i + right
    total = torch.zeros(Lq, Lk, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))
    if bias is not None:
        if bias.dtype == torch.bool:
            total = total.masked_fill(~bias, float("-inf"))
        else:
            total = total + bias.to(dtype)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(dtype)
        slopes = slopes[None, :, None, None] if slopes.dim() == 1 else slopes[:, :, None, None]
        total = total - slopes * (i - j).abs().to(dtype)
    return total


def expand_kv(t, group):
    """K or V (B, Hkv, L, D) with each head repeated ``group`` times: (B, Hkv * group, L, D)."""
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def varlen_spans(cu_seqlens_q, cu_seqlens_k):
    """(q_start, q_end, k_start, k_end) of each packed sequence."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(cq[b], cq[b + 1], ck[b], ck[b + 1]) for b in range(len(cq) - 1)]


def varlen_slopes(alibi_slopes, b):
    """The ALiBi slopes of sequence ``b``: (H,) shared, or row b of (B, H)."""
    return alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b]


# --------------------------------------------------------------------------------------------
# dropout randomness: Philox4x32-10, shared bit for bit by every backend
# --------------------------------------------------------------------------------------------
# One Philox call gives four uint32 draws, each decides one element: element (b, h, i, j) of the
# attention probabilities is kept iff
#   philox(key=(seed & 0xffffffff, seed >> 32), counter=(off & 0xffffffff, off >> 32, 0, 0))[j % 4]
#     >= dropout_threshold(p),            off = ((b * H + h) * Lq + i) * ceil(Lk / 4) + j // 4,
# so a row of Lk keys takes ceil(Lk / 4) calls (the last one's draws past Lk go unused). This is
# what tl.randint4x(seed, off) produces; the kernels compare all four outputs, so they and the
# reference agree exactly. Each decision keeps its full 32-bit draw: p is resolved to 2^-32 (a
# byte-per-decision scheme, 16 decisions per call, would round p to multiples of 1/256).

_M32 = 0xFFFFFFFF
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85


def _mul_hi_lo(a, b):
    """(a * b) >> 32 and (a * b) & 0xffffffff for int64 tensors holding uint32 values (a) and a
    uint32 constant (b), without overflowing int64."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_lo, p_hi = a * b_lo, a * b_hi  # each < 2^48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _M32
    return hi, lo


def philox4x32(seed, offset):
    """The four uint32 outputs (as int64) of Philox4x32-10 at counter ``offset`` under key ``seed``."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    offset = offset.to(torch.int64)
    c0, c1 = offset & _M32, (offset >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, _PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def philox_uint32(seed, offset):
    """The first uint32 (as int64) of Philox4x32-10 at counter ``offset`` under key ``seed``."""
    return philox4x32(seed, offset)[0]


def dropout_threshold(p):
    """uint32 threshold below which a random draw drops the element: round(p * 2^32)."""
    return min(int(round(p * 4294967296.0)), 4294967295)


DRAWS_PER_PHILOX = 4  # keep decisions per Philox call: its four outputs


def attention_dropout_keep(seed, B, H, Lq, Lk, p, device="cpu"):
    """The (B, H, Lq, Lk) bool keep-mask of attention dropout for ``seed``."""
    calls = -(-Lk // DRAWS_PER_PHILOX)  # per row
    off = torch.arange(B * H * Lq * calls, device=device, dtype=torch.int64).view(B, H, Lq, calls)
    draws = torch.stack(philox4x32(seed, off), dim=-1).view(B, H, Lq, calls * DRAWS_PER_PHILOX)
    return draws[..., :Lk] >= dropout_threshold(p)


# --------------------------------------------------------------------------------------------
# the parity rule
# --------------------------------------------------------------------------------------------
# A backend passes when, for an output and every gradient, its max-abs error against the float64
# oracle is err <= PARITY_FACTOR * torch_err + PARITY_FLOOR[dtype] * max(1, max|oracle|), with
# torch_err PyTorch's own error in that dtype. The floor: summation order alone moves results by
# about this much, relative to the oracle's magnitude.

PARITY_FACTOR = 2.0
PARITY_FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def parity_bound(torch_err, dtype, scale):
    """The largest error the parity rule allows in ``dtype``, for an oracle of magnitude ``scale``."""
    return PARITY_FACTOR * torch_err + PARITY_FLOOR[dtype] * max(1.0, scale)
