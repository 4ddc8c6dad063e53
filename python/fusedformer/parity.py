"""The parity harness: how far a backend is from the float64 oracle, next to how far PyTorch's
own computation in the same dtype is. The tests and ``fusedformer parity`` both use it.

Rule (DESIGN.md): a backend passes when, for the output and every gradient,
    err <= 2 * torch_err + floor[dtype] * max(1, max|oracle|)
where err and torch_err are max-abs errors against the oracle: the reference backend run in
float64 on the same inputs.
"""

import dataclasses
import datetime
import json
import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fusedformer as ff

# Absolute error floor per dtype, relative to the oracle's magnitude: summation order alone
# moves results by about this much.
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclasses.dataclass
class Case:
    """One op on one shape. ``make(gen)`` returns (args, kwargs, diff): float64 CPU inputs and
    the positions of the args to differentiate. ``ours(*args, backend=..., **kwargs)`` is the
    fusedformer call, ``theirs(*args, **kwargs)`` PyTorch's own."""

    op: str
    shape: dict
    make: Callable
    ours: Callable
    theirs: Callable


def max_error(got, want):
    """Max |got - want| in float64; NaN where exactly one of them is NaN counts as inf."""
    got, want = got.detach().to(torch.float64).cpu(), want.detach().to(torch.float64).cpu()
    if got.shape != want.shape:
        return float("inf")
    if got.numel() == 0:
        return 0.0
    nan_mismatch = torch.isnan(got) != torch.isnan(want)
    if nan_mismatch.any():
        return float("inf")
    both = torch.isnan(got) | (got == want)  # equal infinities and shared NaN are exact
    diff = torch.where(both, 0.0, (got - want).abs())
    return float(diff.max())


def _evaluate(fn, args, kwargs, diff, dtype, device, grad_out_seed):
    cast = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = a.detach().to(device=device, dtype=dtype).requires_grad_(i in diff)
        elif isinstance(a, torch.Tensor):
            a = a.to(device)
        cast.append(a)
    out = fn(*cast, **kwargs)
    results = {"out": out}
    if diff:
        gen = torch.Generator().manual_seed(grad_out_seed)
        grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        grads = torch.autograd.grad(out, [cast[i] for i in diff], grad_out, allow_unused=True)
        for i, g in zip(diff, grads):
            results[f"d{i}"] = g if g is not None else torch.zeros_like(cast[i])
    return results


def run_case(case, backend, dtype, device="cpu", seed=0):
    """Rows {op, backend, dtype, shape, output, err, torch_err, ratio, ok} for the output and each
    gradient of ``case`` on ``backend``."""
    gen = torch.Generator().manual_seed(seed)
    args, kwargs, diff = case.make(gen)
    oracle = _evaluate(lambda *a, **k: case.ours(*a, backend="reference", **k), args, kwargs, diff,
                       torch.float64, device, seed + 1)
    ours = _evaluate(lambda *a, **k: case.ours(*a, backend=backend, **k), args, kwargs, diff, dtype, device,
                     seed + 1)
    theirs = _evaluate(case.theirs, args, kwargs, diff, dtype, device, seed + 1)
    rows = []
    for name, want in oracle.items():
        err = max_error(ours[name], want)
        torch_err = max_error(theirs[name], want)
        scale = float(want.detach().abs().nan_to_num(0.0, 0.0, 0.0).max()) if want.numel() else 0.0
        bound = 2.0 * torch_err + FLOOR[dtype] * max(1.0, scale)
        rows.append({
            "op": case.op, "backend": backend, "dtype": str(dtype).replace("torch.", ""),
            "shape": case.shape, "output": name, "err": err, "torch_err": torch_err,
            "ratio": err / torch_err if torch_err > 0 else (0.0 if err == 0 else float("inf")),
            "ok": err <= bound,
        })
    return rows


# --------------------------------------------------------------------------------------------
# the default cases: every op, small odd shapes
# --------------------------------------------------------------------------------------------


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _torch_linear_act(x, w, b, activation):
    h = F.linear(x, w, b)
    if activation in ("swiglu", "geglu"):
        gate, up = h.chunk(2, dim=-1)
        return (F.silu(gate) if activation == "swiglu" else F.gelu(gate)) * up
    return {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "identity": lambda t: t,
            "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[activation](h)


def default_cases(quick=True):
    """The parity suite: softmax, both norms, linear_act (every activation), feed_forward and
    attention (plain, causal, float bias with its gradient, GQA) on shapes no block size divides."""
    cases = []
    rows_n = [(7, 113), (33, 1025)] if quick else [(7, 113), (33, 1025), (129, 4099)]
    for M, N in rows_n:
        cases.append(Case("softmax", {"M": M, "N": N}, lambda g, M=M, N=N: ([_randn(g, M, N) * 3], {}, [0]),
                          ff.softmax, lambda x: torch.softmax(x, -1)))
        cases.append(Case(
            "layer_norm", {"M": M, "N": N},
            lambda g, M=M, N=N: ([_randn(g, M, N), (N,), 1 + 0.1 * _randn(g, N), 0.1 * _randn(g, N)], {}, [0, 2, 3]),
            ff.layer_norm, F.layer_norm))
        cases.append(Case(
            "rms_norm", {"M": M, "N": N},
            lambda g, M=M, N=N: ([_randn(g, M, N), (N,), 1 + 0.1 * _randn(g, N)], {"eps": 1e-6}, [0, 2]),
            ff.rms_norm, F.rms_norm))
    for act in ("relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu"):
        M, K, N = 37, 72, 2 * 41
        cases.append(Case(
            "linear_act", {"M": M, "K": K, "N": N, "activation": act},
            lambda g, M=M, K=K, N=N: ([_randn(g, M, K), _randn(g, N, K) / K**0.5, 0.1 * _randn(g, N)], {}, [0, 1, 2]),
            lambda x, w, b, backend, act=act: ff.linear_act(x, w, b, act, backend=backend),
            lambda x, w, b, act=act: _torch_linear_act(x, w, b, act)))
    M, D, Fh = 21, 48, 80
    cases.append(Case(
        "feed_forward", {"M": M, "d_model": D, "d_ff": Fh, "activation": "swiglu"},
        lambda g: ([_randn(g, M, D), _randn(g, 2 * Fh, D) / D**0.5, 0.1 * _randn(g, 2 * Fh),
                    _randn(g, D, Fh) / Fh**0.5, 0.1 * _randn(g, D)], {}, [0, 1, 2, 3, 4]),
        lambda x, w1, b1, w2, b2, backend: ff.feed_forward(x, w1, b1, w2, b2, "swiglu", backend=backend),
        lambda x, w1, b1, w2, b2: F.linear(_torch_linear_act(x, w1, b1, "swiglu"), w2, b2)))
    for B, H, Hkv, Lq, Lk, D, causal, bias in [(2, 3, 3, 37, 37, 40, False, False), (1, 4, 2, 29, 45, 64, True, False),
                                               (2, 2, 2, 17, 33, 32, False, True)]:
        shape = {"B": B, "H": H, "Hkv": Hkv, "Lq": Lq, "Lk": Lk, "D": D, "causal": causal, "bias": bias}

        def make(g, B=B, H=H, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, bias=bias):
            args = [_randn(g, B, H, Lq, D), _randn(g, B, Hkv, Lk, D), _randn(g, B, Hkv, Lk, D)]
            args.append(_randn(g, 1, H, Lq, Lk) if bias else None)
            return args, {}, [0, 1, 2, 3] if bias else [0, 1, 2]

        cases.append(Case(
            "attention", shape, make,
            lambda q, k, v, m, backend, c=causal: ff.scaled_dot_product_attention(
                q, k, v, m, is_causal=c, enable_gqa=True, backend=backend),
            lambda q, k, v, m, c=causal: F.scaled_dot_product_attention(q, k, v, m, is_causal=c, enable_gqa=True)))
    return cases


def run(backends=None, dtypes=("float32", "float16", "bfloat16"), device=None, quick=True, ops=None):
    """Run the default cases on each available backend and dtype: a list of rows."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backends = backends or ff.available_backends(device)
    rows = []
    for case in default_cases(quick):
        if ops and case.op not in ops:
            continue
        for backend in backends:
            for dtype in dtypes:
                rows.extend(run_case(case, backend, DTYPES[dtype], device))
    return rows


def envelope(rows, device):
    """The results file of DESIGN.md, kind 'parity'."""
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {"kind": "parity", "device": name, "date": datetime.date.today().isoformat(),
            "versions": {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
                         "fusedformer": ff.__version__},
            "rows": rows}


def format_table(rows):
    head = f"{'op':<12} {'backend':<10} {'dtype':<9} {'output':<6} {'err':>10} {'torch_err':>10} {'ratio':>7}  ok  shape"
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = ",".join(f"{k}={v}" for k, v in r["shape"].items())
        lines.append(f"{r['op']:<12} {r['backend']:<10} {r['dtype']:<9} {r['output']:<6} {r['err']:>10.2e} "
                     f"{r['torch_err']:>10.2e} {r['ratio']:>7.2f}  {'yes' if r['ok'] else 'NO '} {shape}")
    failed = sum(not r["ok"] for r in rows)
    lines.append(f"{len(rows) - failed} passed, {failed} failed")
    return "\n".join(lines)


def write_json(rows, device, path):
    with open(path, "w") as f:
        json.dump(envelope(rows, device), f, indent=1)
