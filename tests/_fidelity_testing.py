"""What the OpInfo / ModuleInfo fidelity tests share: running a function and its gradients on
one sample, comparing ours with torch's by the parity rule, and the refusals the README lists.

A comparison runs torch in float64 (the oracle) and in the sample's dtype (torch's own error),
and ours in the sample's dtype: NaN where torch has NaN, elsewhere within
``parity_bound(torch's error, dtype, scale)`` of the oracle: 1e-10 x scale in float64 (torch's
own float64 error is zero), 2x torch's error plus a floor in the other dtypes.
"""

import re
from pathlib import Path

import pytest
import torch
from fusedformer.vocabulary import parity_bound

README = Path(__file__).resolve().parents[1] / "README.md"
UNSUPPORTED_HEADING = "### torch inputs fusedformer refuses"

# README line (under UNSUPPORTED_HEADING) -> the message ff refuses those inputs with
REFUSALS = {
    "`layer_norm`, `rms_norm` (and `nn.LayerNorm`, `nn.RMSNorm`): a negative `eps`; torch computes "
    "`rsqrt(var + eps)` with it.": r"eps must be >= 0",
}


def tensors_in(value):
    """Every tensor in a (nested) tuple/list/dict, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_in(v)]
    return []


def cast(value, dtype):
    """``value`` with every floating tensor a fresh leaf in ``dtype`` (same requires_grad)."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            return value.clone()
        return value.detach().to(dtype).requires_grad_(value.requires_grad)
    if isinstance(value, (tuple, list)):
        return type(value)(cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: cast(v, dtype) for k, v in value.items()}
    return value


def outputs_and_grads(fn, leaves, cotangent_seed=1):
    """(outputs, gradients of every leaf that requires grad) of ``fn()``: the gradients of
    sum(out * g) with g fresh random cotangents, the same for every dtype (drawn in float64)."""
    outputs = [t for t in tensors_in(fn()) if t.is_floating_point()]
    wanted = [t for t in leaves if t.requires_grad]
    differentiable = [o for o in outputs if o.requires_grad]
    if not wanted or not differentiable:
        return [o.detach() for o in outputs], []
    gen = torch.Generator().manual_seed(cotangent_seed)
    cotangents = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in differentiable]
    grads = torch.autograd.grad(differentiable, wanted, cotangents, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, wanted)]
    return [o.detach() for o in outputs], list(grads)


def assert_matches(ours, theirs, oracle, dtype, what):
    """``ours`` and ``theirs`` (torch in ``dtype``) against ``oracle`` (torch in float64), tensor by tensor."""
    assert len(ours) == len(theirs) == len(oracle), f"{what}: {len(ours)} tensors, torch gives {len(theirs)}"
    for i, (o, t, ref) in enumerate(zip(ours, theirs, oracle)):
        name = f"{what}[{i}]"
        assert o.shape == t.shape, f"{name}: shape {tuple(o.shape)}, torch {tuple(t.shape)}"
        assert o.dtype == t.dtype, f"{name}: dtype {o.dtype}, torch {t.dtype}"
        nan = torch.isnan(t)
        assert torch.equal(torch.isnan(o), nan), f"{name}: NaN where torch has none, or the reverse"
        keep = ~nan & torch.isfinite(ref)
        assert torch.equal(o[~torch.isfinite(ref) & ~nan], ref[~torch.isfinite(ref) & ~nan].to(o.dtype)), \
            f"{name}: infinities differ from torch's"
        if not keep.any():
            continue
        ref = ref.double()[keep]
        err = (o.double()[keep] - ref).abs().max().item()
        torch_err = (t.double()[keep] - ref).abs().max().item()
        bound = parity_bound(torch_err if dtype != torch.float64 else 0.0, dtype, ref.abs().max().item())
        assert err <= bound, f"{name}: error {err:.3e} > {bound:.3e} (torch's own: {torch_err:.3e})"


def run(fn, args, kwargs, dtype):
    """(outputs, gradients) of ``fn(*args, **kwargs)`` on fresh leaves cast to ``dtype``."""
    args, kwargs = cast((args, kwargs), dtype)
    return outputs_and_grads(lambda: fn(*args, **kwargs), tensors_in((args, kwargs)))


def compare(ours_fn, torch_fn, args, kwargs, dtype, what):
    """Run ``torch_fn`` and ``ours_fn`` on ``(args, kwargs)`` (float64 tensors, cast here) and
    assert that outputs and gradients match by the parity rule."""
    try:
        oracle = run(torch_fn, args, kwargs, torch.float64)
        theirs = run(torch_fn, args, kwargs, dtype)
    except (RuntimeError, NotImplementedError) as exc:  # only what torch accepts must match
        pytest.skip(f"torch rejects it in {dtype}: {type(exc).__name__}: {exc}")
    ours = run(ours_fn, args, kwargs, dtype)
    assert_matches(ours[0], theirs[0], oracle[0], dtype, f"{what} output")
    assert_matches(ours[1], theirs[1], oracle[1], dtype, f"{what} gradient")


def readme_unsupported():
    """The README's list of refused torch inputs: the bullet lines under its heading."""
    text = README.read_text()
    start = text.index(UNSUPPORTED_HEADING) + len(UNSUPPORTED_HEADING)
    section = text[start:].split("\n#", 1)[0]
    return [line[2:].strip() for line in section.splitlines() if line.startswith("- ")]


def assert_listed_refusal(exc, refusals, what):
    """``exc``, raised by ours on input torch accepts, must be a ValueError/TypeError whose
    message matches one of ``refusals`` (README line -> message regex)."""
    assert isinstance(exc, (ValueError, TypeError)), f"{what}: {type(exc).__name__}: {exc}"
    listed = [line for line, pattern in refusals.items() if re.search(pattern, str(exc))]
    assert listed, f"{what}: refused with an error the README does not list: {type(exc).__name__}: {exc}"
