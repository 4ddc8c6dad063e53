"""Every op is one torch.library custom op: opcheck passes on each forward and backward op, and
torch.compile(fullgraph=True) forward and backward match eager."""

import fusedformer as ff
import pytest
import torch
from torch.library import opcheck

OPS = torch.ops.fusedformer


def r(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def opcheck_cases():
    x, w, b = r(5, 7, grad=True), r(7, grad=True), r(7, grad=True)
    mean, rstd = torch.randn(5), torch.rand(5) + 0.5
    q, k, v = r(1, 4, 5, 8, grad=True), r(1, 2, 6, 8, grad=True), r(1, 2, 6, 8, grad=True)
    bias = r(1, 4, 5, 6, grad=True)
    out, lse = r(1, 4, 5, 8), torch.randn(1, 4, 5)
    seed = torch.tensor(42)
    xl, wl, bl = r(6, 8, grad=True), r(10, 8, grad=True), r(10, grad=True)
    return [
        ("softmax_fwd", OPS.softmax_fwd.default, (x, 1, "reference")),
        ("softmax_bwd", OPS.softmax_bwd.default, (r(5, 7), r(5, 7), 0, "reference")),
        ("layer_norm_fwd", OPS.layer_norm_fwd.default, (x, w, b, 1e-5, None, "reference")),
        ("layer_norm_fwd residual", OPS.layer_norm_fwd.default, (x, w, None, 1e-5, r(5, 7, grad=True), "reference")),
        ("layer_norm_bwd", OPS.layer_norm_bwd.default, (r(5, 7), r(5, 7), w, b, mean, rstd, None, "reference")),
        ("rms_norm_fwd", OPS.rms_norm_fwd.default, (x, w, 1e-6, None, "reference")),
        ("rms_norm_fwd residual", OPS.rms_norm_fwd.default, (x, None, 1e-6, r(5, 7, grad=True), "reference")),
        ("rms_norm_bwd", OPS.rms_norm_bwd.default, (r(5, 7), r(5, 7), w, rstd, r(5, 7), "reference")),
        ("linear_act_fwd", OPS.linear_act_fwd.default, (xl, wl, bl, "swiglu", "reference")),
        ("linear_act_fwd identity", OPS.linear_act_fwd.default, (xl, wl, None, "identity", "reference")),
        ("linear_act_bwd", OPS.linear_act_bwd.default, (r(6, 10), xl, wl, bl, r(6, 10), "gelu", "reference")),
        ("attention_fwd", OPS.attention_fwd.default, (q, k, v, bias, True, 0.3, 0.0, None, -1, -1, None, "reference")),
        ("attention_fwd dropout window alibi", OPS.attention_fwd.default,
         (q, k, v, None, False, 0.3, 0.2, seed, 2, 1, torch.rand(4), "reference")),
        ("attention_bwd", OPS.attention_bwd.default,
         (r(1, 4, 5, 8), q, k, v, bias, out, lse, False, 0.3, 0.0, None, -1, -1, None, True, "reference")),
    ]


def _detach_backward_args(cases):
    """The _bwd ops run inside backward, where nothing requires grad (no double backward)."""
    return [(name, op, tuple(a.detach() if isinstance(a, torch.Tensor) and name.split()[0].endswith("_bwd") else a
                             for a in args)) for name, op, args in cases]


CASES = _detach_backward_args(opcheck_cases())


@pytest.mark.parametrize("name,op,args", CASES, ids=[c[0] for c in CASES])
def test_opcheck(name, op, args):
    opcheck(op, args)


def _grads(fn, inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [o.detach() for o in outs], grads


COMPILE_CASES = [
    ("softmax", lambda x: ff.softmax(x, 0), [r(6, 9)]),
    ("layer_norm", lambda x, w, b: ff.layer_norm(x, (9,), w, b), [r(2, 3, 9), r(9), r(9)]),
    ("layer_norm residual", lambda x, res, w: ff.layer_norm(x, (9,), w, residual=res), [r(4, 9), r(4, 9), r(9)]),
    ("rms_norm", lambda x, w: ff.rms_norm(x, (9,), w), [r(4, 9), r(9)]),
    ("rms_norm residual", lambda x, res: ff.rms_norm(x, (9,), residual=res), [r(4, 9), r(4, 9)]),
    ("linear_act", lambda x, w, b: ff.linear_act(x, w, b, "geglu"), [r(2, 3, 8), r(12, 8), r(12)]),
    ("feed_forward", lambda x, w1, b1, w2, b2: ff.feed_forward(x, w1, b1, w2, b2, "gelu"),
     [r(5, 8), r(16, 8), r(16), r(8, 16), r(8)]),
    ("sdpa", lambda q, k, v, m: ff.scaled_dot_product_attention(q, k, v, m, enable_gqa=True),
     [r(1, 4, 5, 8), r(1, 2, 7, 8), r(1, 2, 7, 8), r(1, 1, 5, 7)]),
    ("sdpa causal window alibi", lambda q, k, v: ff.scaled_dot_product_attention(
        q, k, v, is_causal=True, window_size=(2, 0), alibi_slopes=torch.tensor([0.5, 0.25])),
     [r(1, 2, 6, 8), r(1, 2, 6, 8), r(1, 2, 6, 8)]),
]


@pytest.mark.parametrize("name,fn,inputs", COMPILE_CASES, ids=[c[0] for c in COMPILE_CASES])
def test_compile_fullgraph_matches_eager(name, fn, inputs):
    torch._dynamo.reset()
    eager_out, eager_grads = _grads(fn, inputs)
    compiled_out, compiled_grads = _grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), inputs)
    for a, b in zip(eager_out, compiled_out):
        torch.testing.assert_close(a, b)
    for a, b in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(a, b)


def test_compile_inductor_once():
    """One op through the default inductor backend too (slower to compile, so just one)."""
    torch._dynamo.reset()
    fn = lambda x, w: ff.rms_norm(x, (9,), w)  # noqa: E731
    inputs = [r(4, 9), r(9)]
    eager_out, eager_grads = _grads(fn, inputs)
    out, grads = _grads(torch.compile(fn, fullgraph=True), inputs)
    torch.testing.assert_close(out[0], eager_out[0])
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_compiled_dropout_is_random_per_call_and_seeded():
    torch._dynamo.reset()
    fn = torch.compile(lambda q: ff.scaled_dot_product_attention(q, q, q, dropout_p=0.5), fullgraph=True,
                       backend="aot_eager")
    q = r(1, 1, 8, 8)
    torch.manual_seed(3)
    a = fn(q)
    b = fn(q)
    torch.manual_seed(3)
    c = fn(q)
    assert not torch.equal(a, b) and torch.equal(a, c)


def test_eager_calls_skip_the_custom_op_dispatcher():
    """Eager calls run the op's body through an autograd.Function; graphs get the custom op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x = r(4, 9, grad=True)
    with Record() as seen:
        ff.softmax(x).sum().backward()
    assert not [op for op in seen.ops if op.startswith("fusedformer.")], seen.ops
    with Record() as seen:
        OPS.softmax_fwd(x, 1, "reference")
    assert any(op.startswith("fusedformer.softmax_fwd") for op in seen.ops), seen.ops


def test_compiled_no_grad_calls_keep_the_custom_op():
    """The ops' lean path (cached backend called directly) must stay out of graphs: dynamo traces
    the custom op even with grad mode off and the lean cache warm."""
    x, w, b = r(5, 7), r(7), r(7)
    ops = {"softmax_fwd": lambda x: ff.softmax(x, -1),
           "layer_norm_fwd": lambda x: ff.layer_norm(x, (7,), w, b)}
    for name, fn in ops.items():
        graphs = []

        def capture(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        with torch.no_grad():
            fn(x)  # warms the lean path's cache
            torch.compile(fn, fullgraph=True, backend=capture)(x)
        targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
        assert any(f"fusedformer.{name}" in t for t in targets), (name, targets)
