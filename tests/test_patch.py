"""ff.patch on plain torch.nn models: class swaps at any nesting, shared modules, parameters kept,
hooks, optimizers, verification, the report, unpatch restoring everything exactly."""

import copy
import importlib

import fusedformer as ff
import fusedformer.nn as ffnn
import pytest
import torch
import torch.nn.functional as F
from _testing import triton_ops
from fusedformer.patch import PatchVerificationError


def _snapshot(model):
    """(module, class, __dict__ keys, instance forward?) for every module: what unpatch must restore."""
    return [(m, type(m), set(m.__dict__), "forward" in m.__dict__) for m in model.modules()]


def _assert_restored(model, snap):
    for m, cls, keys, inst_fwd in snap:
        assert type(m) is cls
        assert set(m.__dict__) == keys
        assert ("forward" in m.__dict__) == inst_fwd


def _grads(model):
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def _assert_same_grads(a, b, atol=1e-5, rtol=1e-4):
    assert a.keys() == b.keys()
    for n in a:
        assert (a[n] is None) == (b[n] is None), n
        if a[n] is not None:
            torch.testing.assert_close(a[n], b[n], atol=atol, rtol=rtol, msg=n)


class Block(torch.nn.Module):
    """A pre-norm block of torch.nn parts; ``norm`` can be shared with another block."""

    def __init__(self, d, heads, norm):
        super().__init__()
        self.norm = norm
        self.attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
        self.rms = torch.nn.RMSNorm(d, eps=1e-6)
        self.fc = torch.nn.Linear(d, d)

    def forward(self, x, pad=None):
        h = self.norm(x)
        x = x + self.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        return x + self.fc(self.rms(x))


class Net(torch.nn.Module):
    def __init__(self, d=16, heads=2):
        super().__init__()
        shared = torch.nn.LayerNorm(d)
        self.blocks = torch.nn.ModuleList([Block(d, heads, shared), Block(d, heads, shared)])
        self.inner = torch.nn.Sequential(torch.nn.Sequential(torch.nn.LayerNorm(d)))  # nested two deep
        self.encoder = torch.nn.TransformerEncoder(
            torch.nn.TransformerEncoderLayer(d, heads, 24, dropout=0.0, batch_first=True), 2,
            enable_nested_tensor=False)
        self.decoder_layer = torch.nn.TransformerDecoderLayer(d, heads, 24, dropout=0.0, batch_first=True,
                                                              norm_first=True, activation="gelu")

    def forward(self, x, pad=None):
        for b in self.blocks:
            x = b(x, pad)
        mem = self.encoder(self.inner(x), src_key_padding_mask=pad)
        causal = torch.nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.decoder_layer(x, mem, tgt_mask=causal, memory_key_padding_mask=pad, tgt_is_causal=True)


def _inputs(seed=0, n=2, L=7, d=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, L, d, generator=g)
    pad = torch.zeros(n, L, dtype=torch.bool)
    pad[1, -2:] = True  # True = padding (torch.nn convention)
    return x, pad


def test_nested_shared_swap_forward_backward_state_dict_unpatch():
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    params = {n: p for n, p in model.named_parameters()}
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    snap = _snapshot(model)
    forwards = {id(m): type(m).forward for m in model.modules()}

    out, report = ff.patch(model, backend="reference", return_report=True)
    assert out is model and ff.patch_report(model) is report and model._fusedformer_report is report
    shared = model.blocks[0].norm
    assert shared is model.blocks[1].norm and type(shared) is ffnn.LayerNorm
    assert type(model.blocks[0].attn) is ffnn.MultiheadAttention and type(model.blocks[1].rms) is ffnn.RMSNorm
    assert type(model.inner[0][0]) is ffnn.LayerNorm
    assert type(model.encoder) is ffnn.TransformerEncoder
    assert all(type(layer) is ffnn.TransformerEncoderLayer for layer in model.encoder.layers)
    assert type(model.encoder.layers[0].self_attn) is ffnn.MultiheadAttention
    assert type(model.decoder_layer) is ffnn.TransformerDecoderLayer
    assert type(model.decoder_layer.multihead_attn) is ffnn.MultiheadAttention
    assert type(model.blocks[0].fc) is torch.nn.Linear  # not in any rule: untouched
    # the shared norm is reported once, under both of its names
    names = [r[0] for r in report.replaced]
    assert "blocks.0.norm = blocks.1.norm" in names
    assert report.verified is None  # no example inputs for a plain torch model: per-module probes only

    # same parameter objects, same state_dict
    assert {n: p for n, p in model.named_parameters()} == params
    assert all(params[n] is p for n, p in model.named_parameters())
    sd2 = model.state_dict()
    assert list(sd2) == list(sd)
    for k in sd:
        assert torch.equal(sd2[k], sd[k]), k

    x, pad = _inputs()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = ref(x1, pad), model(x2, pad)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    y_ref.backward(g)
    y.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-5, rtol=1e-4)
    _assert_same_grads(_grads(model), _grads(ref))

    assert ff.unpatch(model) is model
    _assert_restored(model, snap)
    assert all(type(m).forward is forwards[id(m)] for m in model.modules())
    assert not hasattr(model, "_fusedformer_report") and ff.patch_report(model) is None
    torch.testing.assert_close(model(x, pad), ref(x, pad), atol=0, rtol=0)  # the original code path again


def test_transformer_whole_and_eval_padding():
    torch.manual_seed(1)
    model = torch.nn.Transformer(d_model=16, nhead=4, num_encoder_layers=2, num_decoder_layers=1,
                                 dim_feedforward=20, dropout=0.0)  # sequence-first
    ref = copy.deepcopy(model)
    ff.patch(model, backend="reference")
    assert type(model.encoder) is ffnn.TransformerEncoder and type(model.decoder) is ffnn.TransformerDecoder
    assert type(model.encoder.norm) is ffnn.LayerNorm and type(model.decoder.layers[0].norm3) is ffnn.LayerNorm
    g = torch.Generator().manual_seed(0)
    src, tgt = torch.randn(6, 2, 16, generator=g), torch.randn(5, 2, 16, generator=g)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, -3:] = True
    mask = torch.nn.Transformer.generate_square_subsequent_mask(5)
    model.eval(), ref.eval()
    with torch.no_grad():  # torch's eval fast path (nested tensors) must not reach the fused layers
        y_ref = ref(src, tgt, tgt_mask=mask, src_key_padding_mask=pad, memory_key_padding_mask=pad)
        y = model(src, tgt, tgt_mask=mask, src_key_padding_mask=pad, memory_key_padding_mask=pad)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)


def test_hooks_keep_firing_and_optimizer_created_before_patch():
    torch.manual_seed(2)
    model = Net()
    ref = copy.deepcopy(model)
    calls = []
    model.blocks[0].norm.register_forward_hook(lambda m, a, o: calls.append("norm"))
    model.blocks[0].attn.register_forward_pre_hook(lambda m, a: calls.append("attn"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    ff.patch(model, backend="reference")
    x, pad = _inputs(seed=5)
    for m, o in ((model, opt), (ref, opt_ref)):
        o.zero_grad()
        m(x, pad).square().mean().backward()
        o.step()
    assert calls.count("norm") == 2 and calls.count("attn") == 1  # shared norm runs in both blocks
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert not torch.equal(p.detach(), before[n]) or p.grad is None or not p.grad.any(), n
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-5, rtol=1e-4, msg=n)
    ff.unpatch(model)
    calls.clear()
    model(x, pad)
    assert calls.count("norm") == 2 and calls.count("attn") == 1


def test_patched_context_restores_on_exception():
    model = Net()
    snap = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with ff.patched(model, backend="reference") as m:
            assert m is model and type(model.blocks[0].attn) is ffnn.MultiheadAttention
            raise RuntimeError("boom")
    _assert_restored(model, snap)


def test_ops_subset_and_repatch():
    model = Net()
    snap = _snapshot(model)
    _, report = ff.patch(model, ops=("norm",), backend="reference", return_report=True)
    assert type(model.blocks[0].norm) is ffnn.LayerNorm and type(model.blocks[0].attn) is torch.nn.MultiheadAttention
    assert type(model.encoder.layers[0]) is torch.nn.TransformerEncoderLayer  # a layer swap needs every op
    assert any("whole-layer swap" in why for _, _, why in report.left)
    ff.patch(model, ops="attention", backend="reference")  # re-patch: the first patch is undone first
    assert type(model.blocks[0].norm) is torch.nn.LayerNorm and type(model.blocks[0].attn) is ffnn.MultiheadAttention
    assert model.blocks[0].attn.backend == "reference"
    ff.unpatch(model)
    ff.unpatch(model)  # a second unpatch is a no-op
    _assert_restored(model, snap)


class NotANorm(torch.nn.Module):
    """weight + eps, but the forward is no norm: the rule must probe, not trust the attributes."""

    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))
        self.eps = 1e-6

    def forward(self, x):
        return x * self.weight + self.eps


class RMSLike(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(d) + 0.5)
        self.variance_epsilon = 1e-5

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


class MyAttention(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv = torch.nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v


class MLP(torch.nn.Module):
    def __init__(self, d, hidden_dropout):
        super().__init__()
        self.fc1, self.fc2, self.act = torch.nn.Linear(d, 20), torch.nn.Linear(20, d), torch.nn.GELU("tanh")
        self.drop = torch.nn.Dropout(0.5)
        self.hidden_dropout = hidden_dropout

    def forward(self, x):
        h = self.act(self.fc1(x))
        if self.hidden_dropout:
            return self.fc2(self.drop(h))
        return self.drop(self.fc2(h))


class Mixed(torch.nn.Module):
    def __init__(self, mlp, d=12):
        super().__init__()
        self.not_norm, self.rms, self.attn, self.mlp = NotANorm(d), RMSLike(d), MyAttention(d), mlp

    def forward(self, x):
        return self.mlp(self.attn(self.rms(self.not_norm(x))))


@pytest.mark.parametrize("hidden_dropout", [False, True])
def test_rules_probe_and_report_left(hidden_dropout):
    torch.manual_seed(3)
    model = Mixed(MLP(12, hidden_dropout))
    ref = copy.deepcopy(model)
    _, report = ff.patch(model, backend="reference", return_report=True)
    replaced = {r[0]: r[2] for r in report.replaced}
    left = {r[0]: r[2] for r in report.left}
    assert replaced["rms"] == "ff.rms_norm" and "forward" in model.rms.__dict__
    assert replaced["mlp"] == "ff.feed_forward('gelu_tanh')"
    assert "not_norm" in left and "neither an RMS norm nor a layer norm" in left["not_norm"]
    assert "forward" not in model.not_norm.__dict__
    assert "attn" in left and "unrecognised custom attention" in left["attn"]
    assert "rms_norm" in str(report) and "not_norm" in str(report)
    x = torch.randn(2, 5, 12)
    model.eval(), ref.eval()
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-4)
    # training: the dropout keeps its place (same RNG draws as the original, so same output)
    model.train(), ref.train()
    torch.manual_seed(7)
    y = model(x)
    torch.manual_seed(7)
    torch.testing.assert_close(y, ref(x), atol=1e-5, rtol=1e-4)


def test_verification_failure_leaves_model_unpatched(monkeypatch):
    import fusedformer.nn.layer_norm as ln_mod

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    snap = _snapshot(model)
    real = ln_mod.layer_norm
    monkeypatch.setattr(ln_mod, "layer_norm", lambda x, *a, **k: real(x, *a, **k) * 1.5)
    with pytest.raises(PatchVerificationError, match="differs"):
        ff.patch(model, backend="reference")
    _assert_restored(model, snap)
    monkeypatch.undo()
    # a wrong fused op behind a rule-based norm: its probe rejects it, so it is left, not swapped
    norm_rule = importlib.import_module("fusedformer.patch.norm")

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), RMSLike(8))
    snap = _snapshot(model)
    real_rms = norm_rule.rms_norm
    monkeypatch.setattr(norm_rule, "rms_norm", lambda x, *a, **k: real_rms(x, *a, **k) + 1e-2)
    _, report = ff.patch(model, backend="reference", return_report=True)
    assert [r[0] for r in report.left] == ["1"] and not report.replaced
    ff.unpatch(model)
    _assert_restored(model, snap)
    # whole-model check through example_inputs: a fused op gone wrong after the probes ran
    calls = []

    def late_wrong(x, *a, **k):
        calls.append(1)
        return real_rms(x, *a, **k) + (1e-2 if len(calls) > 1 else 0.0)

    monkeypatch.setattr(norm_rule, "rms_norm", late_wrong)
    with pytest.raises(PatchVerificationError, match="left unpatched") as info:
        ff.patch(model, backend="reference", example_inputs=torch.randn(3, 8))
    assert info.value.report.verified["max_abs_diff"] > info.value.report.verified["tolerance"]
    _assert_restored(model, snap)
    monkeypatch.undo()
    _, report = ff.patch(model, backend="reference", example_inputs=(torch.randn(3, 8),), return_report=True)
    assert report.verified["max_abs_diff"] <= report.verified["tolerance"] and len(report.replaced) == 1
    ff.unpatch(model)


def test_bad_arguments():
    model = torch.nn.LayerNorm(4)
    with pytest.raises(TypeError, match="model"):
        ff.patch("not a model")
    with pytest.raises(ValueError, match="ops"):
        ff.patch(model, ops=("attention", "softmax"))
    with pytest.raises(ValueError, match="ops"):
        ff.patch(model, ops=())
    with pytest.raises(ValueError, match="backend"):
        ff.patch(model, backend="tpu")
    with pytest.raises(TypeError, match="example_inputs"):
        ff.patch(model, example_inputs=[1, 2])
    with pytest.raises(TypeError, match="model"):
        ff.unpatch(3)
    assert type(model) is torch.nn.LayerNorm


def test_parameterless_norms():
    model = torch.nn.Sequential(torch.nn.LayerNorm(8, elementwise_affine=False), torch.nn.RMSNorm(8, eps=None,
                                                                                                   elementwise_affine=False))
    ref = copy.deepcopy(model)
    ff.patch(model, backend="reference")
    assert type(model[0]) is ffnn.LayerNorm and type(model[1]) is ffnn.RMSNorm
    x = torch.randn(3, 8)
    torch.testing.assert_close(model(x), ref(x))
    ff.unpatch(model)
    assert type(model[0]) is torch.nn.LayerNorm


def test_deepcopy_of_patched_model_is_patched_independently():
    model = torch.nn.Sequential(RMSLike(6), torch.nn.LayerNorm(6))
    ff.patch(model, backend="reference")
    clone = copy.deepcopy(model)
    x = torch.randn(2, 6)
    torch.testing.assert_close(clone(x), model(x))
    assert clone[0].forward.__self__ is clone[0]


@pytest.mark.skipif(not triton_ops()[0], reason=f"triton backend cannot run any patch op on cpu ({triton_ops()[1]})")
def test_nested_modules_on_interpreted_triton():
    """Whatever the triton backend supports at test time (whole encoder layers once it runs all
    three groups), interpreted on CPU: outputs and gradients equal to torch.nn."""
    ops, _ = triton_ops()
    torch.manual_seed(4)
    model = torch.nn.Sequential(
        torch.nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True, activation=F.gelu),
        torch.nn.LayerNorm(8), torch.nn.RMSNorm(8))
    ref = copy.deepcopy(model)
    _, report = ff.patch(model, ops=ops, backend="triton", return_report=True)
    assert report.replaced
    x = torch.randn(1, 5, 8)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = ref(x1), model(x2)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-3)
    y_ref.sum().backward()
    y.sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-4, rtol=1e-3)
    _assert_same_grads(_grads(model), _grads(ref), atol=1e-4, rtol=1e-3)
