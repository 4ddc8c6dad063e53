"""The parity harness: how far a backend is from the float64 oracle, next to how far PyTorch's
own computation in the same dtype is. The tests and ``fusedformer parity`` both use it.

Rule (``fusedformer.vocabulary.parity_bound``): a backend passes when, for the output and every
gradient, err <= 2 * torch_err + floor[dtype] * max(1, max|oracle|), where err and torch_err are
max-abs errors against the oracle: the reference backend run in float64 on the same inputs.

``run_full`` also reports cross-backend agreement (the max difference between every pair of
backends on the same inputs, outputs and gradients), and turns a backend that cannot run a case
into a row with ``skipped`` set to its reason (``ok`` None: neither a pass nor a failure).
"""

import dataclasses
import datetime
import json
import math
import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fusedformer as ff
from fusedformer._files import write_atomic
from fusedformer.vocabulary import ACTIVATIONS, FUSED_ACTIVATIONS, parity_bound

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


def _cast(a, dtype, device):
    """``a`` in ``dtype`` on ``device`` with the same strides: a strided (non-contiguous) case
    input stays strided, so the backends see the layout the case asked for."""
    a = a.detach()
    if a.is_contiguous() or 0 in a.stride():
        return a.to(device=device, dtype=dtype)
    out = torch.empty_strided(a.shape, a.stride(), dtype=dtype, device=device)
    return out.copy_(a)


def _evaluate(fn, args, kwargs, diff, dtype, device, grad_out_seed):
    cast = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = _cast(a, dtype, device).requires_grad_(i in diff)
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
    return _run_case(case, backend, dtype, device, seed)[0]


def _run_case(case, backend, dtype, device, seed):
    """run_case's rows, and the backend's outputs {name: tensor} for the cross-backend check."""
    gen = torch.Generator().manual_seed(seed)
    args, kwargs, diff = case.make(gen)
    oracle = _evaluate(lambda *a, **k: case.ours(*a, backend="reference", **k), args, kwargs, diff,
                       torch.float64, device, seed + 1)
    ours = _evaluate(lambda *a, **k: case.ours(*a, backend=backend, **k), args, kwargs, diff, dtype, device,
                     seed + 1)
    theirs = _evaluate(case.theirs, args, kwargs, diff, dtype, device, seed + 1)
    return _compare(case, backend, dtype, oracle, ours, theirs), ours


def _compare(case, backend, dtype, oracle, ours, theirs):
    rows = []
    for name, want in oracle.items():
        err = max_error(ours[name], want)
        torch_err = max_error(theirs[name], want)
        scale = float(want.detach().abs().nan_to_num(0.0, 0.0, 0.0).max()) if want.numel() else 0.0
        bound = parity_bound(torch_err, dtype, scale)
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
    return ACTIVATIONS[activation].torch_forward(F.linear(x, w, b))


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
    for act in (a for a in FUSED_ACTIVATIONS if a != "identity"):
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
    cases += _attention_mask_cases()
    return cases


def _attention_mask_cases():
    """Attention under masks and layouts the plain cases miss: a random bool mask, key padding,
    rows with every key masked (fusedformer gives zeros there; torch's reference value is its
    output with those rows zeroed), and q/k/v that are strided views of a (B, L, H, D) buffer."""
    cases = []

    def masked(kind, B=2, H=3, Lq=19, Lk=37, D=24):
        def make(g):
            q, k, v = _randn(g, B, H, Lq, D), _randn(g, B, H, Lk, D), _randn(g, B, H, Lk, D)
            if kind == "bool":
                mask = torch.rand(B, 1, Lq, Lk, generator=g) < 0.7
                mask[..., 0] = True  # every row keeps a key: torch's value is finite everywhere
            elif kind == "key_padding":
                mask = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
                mask[-1, ..., Lk - 11:] = False  # the last batch's final 11 keys are padding
            else:  # fully masked rows
                mask = torch.rand(B, 1, Lq, Lk, generator=g) < 0.5
                mask[0, 0, 3] = False
                mask[-1, 0, Lq - 1] = False
            return [q, k, v, mask], {}, [0, 1, 2]

        def theirs(q, k, v, m):
            live = m.any(-1, keepdim=True)  # rows with a key: torch's NaN rows are zeros by contract
            return F.scaled_dot_product_attention(q, k, v, m | ~live) * live

        shape = {"B": B, "H": H, "Lq": Lq, "Lk": Lk, "D": D, "mask": kind}
        return Case("attention", shape, make,
                    lambda q, k, v, m, backend: ff.scaled_dot_product_attention(q, k, v, m, backend=backend), theirs)

    cases += [masked("bool"), masked("key_padding"), masked("fully_masked_rows")]

    def make_strided(g, B=2, H=3, Lq=23, Lk=31, D=40):
        # (B, L, H, D) buffers seen as (B, H, L, D); v also drops the last 8 of D+8 columns
        q = _randn(g, B, Lq, H, D).transpose(1, 2)
        k = _randn(g, B, Lk, H, D).transpose(1, 2)
        v = _randn(g, B, Lk, H, D + 8).transpose(1, 2)[..., :D]
        return [q, k, v], {}, [0, 1, 2]

    cases.append(Case("attention", {"B": 2, "H": 3, "Lq": 23, "Lk": 31, "D": 40, "causal": True, "layout": "strided"},
                      make_strided,
                      lambda q, k, v, backend: ff.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                               backend=backend),
                      lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)))
    return cases


def _skipped_rows(case, backend, dtype, reason):
    return [{"op": case.op, "backend": backend, "dtype": str(dtype).replace("torch.", ""), "shape": case.shape,
             "output": "-", "err": None, "torch_err": None, "ratio": None, "ok": None, "skipped": reason}]


def _reason(exc, backend):
    """The line of a BackendUnavailableError that explains ``backend``, else its first line."""
    lines = str(exc).splitlines()
    mine = [ln.strip() for ln in lines[1:] if ln.strip().startswith(backend + " ")]
    return mine[0] if mine else (lines[0] if lines else exc.__class__.__name__)


def agreement(outputs, case, dtype):
    """Cross-backend agreement on one case and dtype: for every pair of backends that ran, the max
    difference between their outputs (and gradients) on the same inputs. ``outputs`` is
    {backend: {name: tensor}}."""
    rows = []
    names = sorted(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for out in outputs[a]:
                rows.append({"op": case.op, "dtype": str(dtype).replace("torch.", ""), "shape": case.shape,
                             "output": out, "backends": [a, b], "max_diff": max_error(outputs[a][out],
                                                                                   outputs[b][out])})
    return rows


def run_full(backends=None, dtypes=("float32", "float16", "bfloat16"), device=None, quick=True, ops=None,
             cases=None):
    """Every case on each backend and dtype: {"rows": parity rows, "agreement": cross-backend
    rows}. A backend that cannot run a case gives one row with ``skipped`` set to the reason
    (``ok`` None) instead of failing the run."""
    from fusedformer.backends import BackendUnavailableError

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backends = backends or ff.available_backends(device)
    cases = cases if cases is not None else default_cases(quick)
    rows, agree = [], []
    for case in cases:
        if ops and case.op not in ops:
            continue
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            outputs = {}
            for backend in backends:
                try:
                    case_rows, outs = _run_case(case, backend, dtype, device, 0)
                except BackendUnavailableError as exc:
                    rows.extend(_skipped_rows(case, backend, dtype, _reason(exc, backend)))
                    continue
                rows.extend(case_rows)
                outputs[backend] = outs
            agree.extend(agreement(outputs, case, dtype))
    return {"rows": rows, "agreement": agree}


def run(backends=None, dtypes=("float32", "float16", "bfloat16"), device=None, quick=True, ops=None):
    """Run the default cases on each available backend and dtype: a list of rows."""
    return run_full(backends, dtypes, device, quick, ops)["rows"]


def _finite(x):
    """JSON has no inf/NaN: those numbers are written as null (the row's ok says what happened)."""
    return x if not isinstance(x, float) or math.isfinite(x) else None


def envelope(rows, device, agreement=None):
    """The results file, kind 'parity' (the envelope fusedformer.bench.validate_results checks)."""
    dev = torch.device(device)
    cpu = f"cpu ({platform.processor() or platform.machine()})"
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    clean = [{k: _finite(v) for k, v in r.items()} for r in rows]
    doc = {"kind": "parity", "device": name, "date": datetime.date.today().isoformat(),
           "versions": {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
                        "fusedformer": ff.__version__},
           "rows": clean}
    if agreement is not None:
        doc["agreement"] = [{k: _finite(v) for k, v in r.items()} for r in agreement]
    return doc


def _shape_text(shape):
    return ",".join(f"{k}={v}" for k, v in shape.items())


def format_table(rows, agreement=None):
    head = (f"{'op':<12} {'backend':<10} {'dtype':<9} {'output':<6} {'err':>10} {'torch_err':>10} {'ratio':>7}"
            "  ok  shape")
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = _shape_text(r["shape"])
        if r.get("skipped"):
            lines.append(f"{r['op']:<12} {r['backend']:<10} {r['dtype']:<9} skipped: {r['skipped']}  [{shape}]")
            continue
        lines.append(f"{r['op']:<12} {r['backend']:<10} {r['dtype']:<9} {r['output']:<6} {r['err']:>10.2e} "
                     f"{r['torch_err']:>10.2e} {r['ratio']:>7.2f}  {'yes' if r['ok'] else 'NO '} {shape}")
    failed = sum(r["ok"] is False for r in rows)
    skipped = sum(r["ok"] is None for r in rows)
    passed = len(rows) - failed - skipped
    lines.append(f"{passed} passed, {failed} failed, {skipped} skipped")
    if agreement:
        lines.append("")
        lines.append("cross-backend agreement (max |a - b| on the same inputs, per case and dtype):")
        worst = {}
        for r in agreement:
            key = (r["op"], r["dtype"], tuple(r["backends"]))
            if key not in worst or r["max_diff"] > worst[key]["max_diff"]:
                worst[key] = r
        for (op, dtype, pair), r in worst.items():
            lines.append(f"  {op:<12} {dtype:<9} {pair[0]} vs {pair[1]}: max diff {r['max_diff']:.2e} "
                         f"(worst: {r['output']} at {_shape_text(r['shape'])})")
    return "\n".join(lines)


def failures(rows):
    """The rows that fail the 2x rule (skipped rows do not fail)."""
    return [r for r in rows if r["ok"] is False]


def write_json(rows, device, path, agreement=None):
    write_atomic(path, json.dumps(envelope(rows, device, agreement), indent=1))
