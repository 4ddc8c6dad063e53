"""What the row-wise cases (one op over the last dim of x (M, N), memory-bound) share: the shape
presets' form, the norms' presets, and the providers each of them compares."""

import torch

from fusedformer.bench.providers import (
    ROWWISE_HEADLINE_PROVIDERS,
    ROWWISE_HEADLINE_SHAPES,
    compiled,
    fusedformer_providers,
)

PRESET_PROVIDERS = {"headline": ROWWISE_HEADLINE_PROVIDERS}


def rows(*sizes):
    """Shape dicts from (M, N) pairs."""
    return [dict(M=M, N=N) for M, N in sizes]


def shapes(cpu, quick, full):
    """A row-wise case's SHAPES: ``tiny`` (odd widths) and ``headline`` common to all, the rest its own."""
    return {"tiny": rows((8, 100), (17, 257)), "cpu": cpu, "quick": quick, "full": full,
            "headline": ROWWISE_HEADLINE_SHAPES}


NORM_SHAPES = shapes(cpu=rows((256, 1024), (2048, 4096)), quick=rows((64, 1024), (8192, 4096)),
                     full=rows((64, 1024), (4096, 4096), (16384, 8192), (32768, 2048)))


def bytes_moved(pass_, fwd, bwd):
    """The bytes of ``pass_`` given the forward's and the backward's: fwd+bwd moves both."""
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def providers(fused, eager, device):
    """fusedformer's backends through the public call ``fused(*inputs, backend=b)``, then
    ``eager`` (torch) as it is and torch.compile'd."""
    out = fusedformer_providers(fused, device)
    out["torch-eager"] = eager
    out["torch-compile"] = compiled(eager, device)
    return out


def norm_bytes(shape, pass_, dtype, params, row_stats):
    """The bytes a norm moves, element size e: fwd reads x, writes y (2 M N e) and reads its
    ``params`` (N,) vectors; bwd reads x, dy, writes dx (3 M N e), reads the params and writes their
    grads; each way ``row_stats`` fp32 (M,) vectors (mean, rstd)."""
    M, N, e = shape["M"], shape["N"], dtype.itemsize
    fwd = 2 * M * N * e + params * N * e + 4 * row_stats * M
    bwd = 3 * M * N * e + 2 * params * N * e + 4 * row_stats * M
    return bytes_moved(pass_, fwd, bwd)


def norm_inputs(shape, dtype, device, bias):
    """make() of a norm: x (M, N), a weight near 1 and, with ``bias``, a small bias (N,), all differentiated."""
    M, N = shape["M"], shape["N"]
    inputs = [torch.randn(M, N, device=device, dtype=dtype), 1 + 0.1 * torch.randn(N, device=device, dtype=dtype)]
    if bias:
        inputs.append(0.1 * torch.randn(N, device=device, dtype=dtype))
    return inputs, {}, list(range(len(inputs)))
