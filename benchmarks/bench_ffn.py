"""Feed-forward benchmark (pytest-benchmark, GPU only): ff.linear_act and ff.feed_forward on the
triton backend against torch eager (cuBLAS GEMM + a separate activation kernel), torch.compile of
the same code, and the bare cuBLAS matmul(s) with no bias and no activation (the ceiling a fused
epilogue aims at: fusion wins only what the separate elementwise passes cost).

    pytest benchmarks/bench_ffn.py --benchmark-only [-k "linear_act and 4096"]

Shapes: d_model 768 / 1024 / 4096, d_ff = 4 * d_model (gated: w1 stacks [gate; up], 2 * d_ff
rows), 4k / 16k / 32k tokens, plus a small 256-token case. FLOPs counted, T tokens, D = d_model,
N1 = w1's rows, F = d_ff: linear_act fwd 2*T*D*N1, feed_forward fwd 2*T*D*N1 + 2*T*F*D; bwd is
2x fwd (dX and dW GEMMs). feed_forward(recompute=True) is charged the same model FLOPs: its extra
x @ w1^T GEMM in the backward is the price of not storing the T x N1 preact and T x F hidden.
Times are CUDA-event medians (triton.testing.do_bench); "bwd" times the backward alone on a
retained graph, "fwd+bwd" a whole training step of the op. Every row is written in the results
format (docs/results-format.md) to benchmarks/results/ffn-<gpu>-<date>.json (+ .md) when the session ends.
Targets on H100 bf16: fused forward >= 1.1x torch eager and >= 0.95x the bare matmul.
"""

import pathlib
import time

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("pytest_benchmark")
if not torch.cuda.is_available():
    pytest.skip("the feed-forward benchmarks need a CUDA GPU", allow_module_level=True)

import fusedformer as ff  # noqa: E402
import triton  # noqa: E402
from fusedformer.bench.report import save_suite  # noqa: E402

pytestmark = pytest.mark.gpu

D_MODELS = [768, 1024, 4096]
TOKENS = [256, 4096, 16384, 32768]
ACTS = ["gelu", "swiglu"]
PASSES = ["fwd", "bwd", "fwd+bwd"]
PROVIDERS = ["fusedformer-triton", "torch-eager", "torch-compile", "torch-matmul"]
DTYPE = torch.bfloat16
DEVICE = "cuda"
ROWS = []


def torch_act(h, activation):
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


def eager_linear_act(x, w, b, activation):
    return torch_act(F.linear(x, w, b), activation)


def eager_ffn(x, w1, b1, w2, b2, activation):
    return F.linear(torch_act(F.linear(x, w1, b1), activation), w2, b2)


def bare_linear(x, w, b, activation):
    return x @ w.t()


def bare_ffn(x, w1, b1, w2, b2, activation):
    # the same two GEMMs with nothing between them (the hidden is the first GEMM's left half
    # when gated, so the second GEMM has the real shape)
    h = x @ w1.t()
    return (h[:, : w2.shape[1]] if activation == "swiglu" else h) @ w2.t()


_compiled = {}


def _fn(op, provider, activation, recompute):
    if provider == "fusedformer-triton":
        if op == "linear_act":
            return lambda x, w, b: ff.linear_act(x, w, b, activation, backend="triton")
        return lambda x, w1, b1, w2, b2: ff.feed_forward(x, w1, b1, w2, b2, activation, backend="triton",
                                                          recompute=recompute)
    eager, bare = (eager_linear_act, bare_linear) if op == "linear_act" else (eager_ffn, bare_ffn)
    if provider == "torch-eager":
        return lambda *a: eager(*a, activation)
    if provider == "torch-matmul":
        return lambda *a: bare(*a, activation)
    key = (op, activation)
    if key not in _compiled:
        _compiled[key] = torch.compile(lambda *a: eager(*a, activation), dynamic=False)
    return _compiled[key]


def _inputs(op, T, D, activation, grad):
    Fh = 4 * D
    n1 = 2 * Fh if activation == "swiglu" else Fh
    mk = lambda *s, scale=1.0: (torch.randn(*s, device=DEVICE, dtype=DTYPE) * scale).requires_grad_(grad)  # noqa: E731
    args = [mk(T, D), mk(n1, D, scale=D**-0.5), mk(n1, scale=0.1)]
    if op == "feed_forward":
        args += [mk(D, Fh, scale=Fh**-0.5), mk(D, scale=0.1)]
    return args


def flops(op, T, D, activation, pass_):
    Fh = 4 * D
    n1 = 2 * Fh if activation == "swiglu" else Fh
    f = 2.0 * T * D * n1 + (2.0 * T * Fh * D if op == "feed_forward" else 0.0)
    return f * {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}[pass_]


def _make(op, provider, T, D, activation, pass_, recompute):
    grad = pass_ != "fwd"
    args = _inputs(op, T, D, activation, grad)
    fn = _fn(op, provider, activation, recompute)
    try:
        out = fn(*args)
        if not grad:
            torch.cuda.synchronize()
            return lambda: fn(*args)
        dy = torch.randn_like(out)
        torch.autograd.grad(out, args, dy, retain_graph=True, allow_unused=True)
        torch.cuda.synchronize()
    except (RuntimeError, NotImplementedError, ValueError) as exc:  # OOM, or the provider cannot run it
        return pytest.skip(f"{provider}: {str(exc).splitlines()[0][:200]}")
    if pass_ == "bwd":
        return lambda: torch.autograd.grad(out, args, dy, retain_graph=True, allow_unused=True)

    def fwd_bwd():
        torch.autograd.grad(fn(*args), args, dy, allow_unused=True)

    return fwd_bwd


def _bench(benchmark, op, provider, T, D, activation, pass_, recompute=False):
    torch.manual_seed(0)
    fn = _make(op, provider, T, D, activation, pass_, recompute)
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    shape = {"T": T, "d_model": D, "d_ff": 4 * D, "activation": activation}
    if op == "feed_forward" and provider == "fusedformer-triton":
        shape["recompute"] = recompute
    row = {"op": op, "provider": provider, "dtype": str(DTYPE).replace("torch.", ""), "pass": pass_, "shape": shape,
           "ms": ms, "tflops": flops(op, T, D, activation, pass_) / (ms * 1e-3) / 1e12, "gbps": None,
           "frac_of_ceiling": None}
    ROWS.append(row)
    benchmark.extra_info.update(row)
    benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=5, warmup_rounds=1)


def _over_the_grid(test):
    """``test`` parametrized over every provider, d_model, token count, activation and pass (the
    marks stacked as decorators would be, so the test ids read provider-D-T-activation-pass)."""
    for name, values in (("provider", PROVIDERS), ("D", D_MODELS), ("T", TOKENS), ("activation", ACTS),
                         ("pass_", PASSES)):
        test = pytest.mark.parametrize(name, values)(test)
    return test


@_over_the_grid
def test_linear_act(benchmark, provider, D, T, activation, pass_):
    _bench(benchmark, "linear_act", provider, T, D, activation, pass_)


@_over_the_grid
def test_feed_forward(benchmark, provider, D, T, activation, pass_):
    _bench(benchmark, "feed_forward", provider, T, D, activation, pass_)


@pytest.mark.parametrize("pass_", ["fwd+bwd"])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("T", [4096, 32768])
@pytest.mark.parametrize("D", D_MODELS)
@pytest.mark.parametrize("recompute", [False, True])
def test_feed_forward_recompute(benchmark, recompute, D, T, activation, pass_):
    """What recompute=True costs in time (its memory saving is T x (N1 + F) elements per block)."""
    _bench(benchmark, "feed_forward", "fusedformer-triton", T, D, activation, pass_, recompute)


@pytest.mark.parametrize("provider", ["fusedformer-triton", "torch-eager"])
def test_dispatch_overhead(benchmark, provider):
    """Host time per call on a tiny shape (GPU time negligible): the Python + custom-op dispatch cost."""
    fn = _fn("linear_act", provider, "gelu", False)
    args = _inputs("linear_act", 8, 64, "gelu", False)
    for _ in range(20):
        fn(*args)
    torch.cuda.synchronize()
    n = 1000
    start = time.perf_counter()
    for _ in range(n):
        fn(*args)
    host_ms = (time.perf_counter() - start) * 1e3 / n
    torch.cuda.synchronize()
    row = {"op": "linear_act-dispatch", "provider": provider, "dtype": "bfloat16", "pass": "fwd",
           "shape": {"T": 8, "d_model": 64, "d_ff": 64, "activation": "gelu"}, "ms": host_ms, "tflops": None,
           "gbps": None, "frac_of_ceiling": None}
    ROWS.append(row)
    benchmark.extra_info.update(row)
    benchmark.pedantic(lambda: fn(*args), rounds=100, warmup_rounds=5)


def _ceilings():
    """A large device-to-device copy (GB/s) and a large bf16 matmul (TFLOP/s), measured now."""
    x = torch.empty(1 << 28, device=DEVICE, dtype=torch.uint8)
    y = torch.empty_like(x)
    copy_ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    mm_ms = triton.testing.do_bench(lambda: a @ a, return_mode="median")
    return {"copy_gbps": 2 * x.numel() / (copy_ms * 1e-3) / 1e9,
            "matmul_bf16_tflops": 2 * 8192**3 / (mm_ms * 1e-3) / 1e12}


def _markdown(doc):
    """One table per (op, pass): each shape's TFLOP/s per provider, and fused / eager, fused / matmul."""
    lines = [f"# Feed-forward benchmark, {doc['device']}, {doc['date']}", "",
             f"versions: {doc['versions']}; ceilings: {doc['ceilings']}", ""]
    timed = [r for r in doc["rows"] if r["tflops"] is not None]
    for op in ("linear_act", "feed_forward"):
        for pass_ in PASSES:
            rows = [r for r in timed if r["op"] == op and r["pass"] == pass_]
            if not rows:
                continue
            head = "| shape | " + " | ".join(PROVIDERS) + " | vs eager | vs matmul |"
            lines += [f"## {op} {pass_} (TFLOP/s)", "", head, "|" + "---|" * (len(PROVIDERS) + 3)]
            shapes = []
            for r in rows:
                if r["shape"] not in shapes:
                    shapes.append(r["shape"])
            for shape in shapes:
                got = {r["provider"]: r["tflops"] for r in rows if r["shape"] == shape}
                cells = [f"{got[p]:.1f}" if p in got else "-" for p in PROVIDERS]
                ours = got.get("fusedformer-triton")
                ratio = lambda other: f"{ours / got[other]:.2f}x" if ours and got.get(other) else "-"  # noqa: E731
                name = ",".join(f"{k}={v}" for k, v in shape.items())
                vs = f" | {ratio('torch-eager')} | {ratio('torch-matmul')} |"
                lines.append(f"| {name} | " + " | ".join(cells) + vs)
            lines.append("")
    return "\n".join(lines)


@pytest.fixture(scope="session", autouse=True)
def _write_results():
    yield
    if ROWS:
        save_suite("ffn", ROWS, _ceilings(), pathlib.Path(__file__).parent / "results", _markdown)
