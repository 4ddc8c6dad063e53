"""What the triton attention test files share: the device, float64 random inputs, torch's own
attention on the same inputs, and the parity.Case builder. Shape legend: B batch, H/Hkv heads,
Lq/Lk lengths, D/Dv head dims."""

import math

import fusedformer as ff
import torch
import torch.nn.functional as F
from _testing import assert_triton_parity
from fusedformer import parity, reference, vocabulary

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on CPU, compiled kernels on a GPU


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEV)


def torch_sdpa(q, k, v, bias, causal, window, alibi, dropout_p):
    """PyTorch's own attention on the same inputs: F.sdpa with every rule folded into one mask."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    if dropout_p > 0 or q.shape[-1] == 0:  # torch's dropout stream differs: its math in the reference
        return reference.attention_forward(q, k, v, bias, causal, 1 / math.sqrt(q.shape[-1]), dropout_p,
                                           torch.randint(0, 2**62, (), device=q.device).item(), window, alibi)[0]
    plain = bias is None and not causal and window == (-1, -1) and alibi is None
    mask = None if plain else vocabulary.attention_mask_bias(Lq, Lk, bias, causal, window, alibi, q.device, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)


def case(B, H, Hkv, Lq, Lk, D, Dv=None, *, causal=False, bias=None, window=(-1, -1), alibi=False,
         dropout_p=0.0, strided=False, transpose_out=False):
    """A parity.Case for ff.scaled_dot_product_attention. ``bias``: None, 'float' (1, H, Lq, Lk),
    'pad' float (B, 1, 1, Lk), 'rows' float (1, 1, Lq, 1), 'cols' float (1, H, 1, Lk), 'bool'
    (B, 1, Lq, Lk) or 'boolpad' (B, 1, 1, Lk).
    ``strided`` reads q/k/v from (B, L, H, D) storage; ``transpose_out`` hands the backward a
    non-contiguous grad_output."""
    Dv = Dv or D
    shapes = {"float": (1, H, Lq, Lk), "pad": (B, 1, 1, Lk), "rows": (1, 1, Lq, 1), "cols": (1, H, 1, Lk),
              "bool": (B, 1, Lq, Lk),
              "boolpad": (B, 1, 1, Lk)}

    def make(g):
        args = [randn(g, B, H, Lq, D), randn(g, B, Hkv, Lk, D), randn(g, B, Hkv, Lk, Dv)]
        diff = [0, 1, 2]
        if bias is None:
            args.append(None)
        elif bias.startswith("bool"):
            m = torch.rand(*shapes[bias], generator=g) > 0.3
            args.append(m)
        else:
            args.append(randn(g, *shapes[bias]))
            diff.append(3)
        slopes_shape = (B, H) if alibi == "batch" else (H,)
        args.append(torch.rand(*slopes_shape, generator=g, dtype=torch.float64) if alibi else None)
        return args, {}, diff

    def view(t):
        return t.transpose(1, 2).contiguous().transpose(1, 2) if strided else t

    def finish(out):
        return out.transpose(-1, -2) if transpose_out else out

    def ours(q, k, v, m, slopes, backend):
        torch.manual_seed(1234)  # the same dropout seed for the oracle and the kernel
        return finish(ff.scaled_dot_product_attention(
            view(q), view(k), view(v), m, dropout_p=dropout_p, is_causal=causal, enable_gqa=True,
            window_size=window, alibi_slopes=slopes, backend=backend))

    def theirs(q, k, v, m, slopes):
        torch.manual_seed(1234)
        return finish(torch_sdpa(q, k, v, m, causal, window, slopes, dropout_p))

    shape = dict(B=B, H=H, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=Dv, causal=causal, bias=bias, window=window,
                 alibi=alibi, dropout_p=dropout_p, strided=strided)
    return parity.Case("attention", shape, make, ours, theirs)


def assert_parity(case, dtype):
    return assert_triton_parity(case, dtype, DEV)


def packed(gen, lens_q, lens_k, H, Hkv, D):
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    return (randn(gen, int(cu_q[-1]), H, D), randn(gen, int(cu_k[-1]), Hkv, D), randn(gen, int(cu_k[-1]), Hkv, D),
            cu_q, cu_k)
