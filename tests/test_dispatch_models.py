"""A patched BERT's attention gets the mask Hugging Face's own sdpa path gets: none for an
all-ones padding mask (a float mask there would take the slower masked kernel and its gradient
path), the same bool mask with padding. Under transformers 4.x BERT's attention module calls
torch's SDPA itself (no AttentionInterface), so ff.patch leaves it: the patched model's own SDPA
call must then get the unpatched model's mask."""

import copy

import fusedformer as ff
import pytest
import torch
from packaging.version import Version

transformers = pytest.importorskip("transformers")
from fusedformer.patch import hf as _hf  # noqa: E402
from transformers.integrations import sdpa_attention  # noqa: E402

TF5 = Version(transformers.__version__).major >= 5


def _tiny_bert():
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     attn_implementation="sdpa")
    return transformers.BertModel(config).eval()


@pytest.mark.parametrize("padded", [False, True])
def test_patched_bert_attention_gets_hf_sdpa_mask(monkeypatch, padded):
    masks = {"sdpa": [], "fusedformer": []}
    real_ff = _hf.scaled_dot_product_attention
    real_sdpa = sdpa_attention.torch.nn.functional.scaled_dot_product_attention

    def spy_ff(q, k, v, attn_mask=None, **kwargs):
        masks["fusedformer"].append(attn_mask)
        return real_ff(q, k, v, attn_mask=attn_mask, **kwargs)

    def spy_sdpa(q, k, v, attn_mask=None, **kwargs):
        masks["sdpa"].append(attn_mask)
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(_hf, "scaled_dot_product_attention", spy_ff)
    monkeypatch.setattr(sdpa_attention.torch.nn.functional, "scaled_dot_product_attention", spy_sdpa)
    model = _tiny_bert()
    patched = ff.patch(copy.deepcopy(model))
    masks["sdpa"].clear()  # the patch's own verification runs both models
    masks["fusedformer"].clear()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(ids)
    if padded:
        attention_mask[1, -3:] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        got = patched(input_ids=ids, attention_mask=attention_mask).last_hidden_state
    if TF5:
        assert len(masks["sdpa"]) == len(masks["fusedformer"]) == 1
        (hf_mask,), (patched_mask,) = masks["sdpa"], masks["fusedformer"]
    else:  # 4.x: BertSdpaSelfAttention, left by ff.patch, calls torch's SDPA in both models
        assert len(masks["sdpa"]) == 2 and not masks["fusedformer"]
        hf_mask, patched_mask = masks["sdpa"]
    if not padded:
        assert patched_mask is None and hf_mask is None
    elif TF5:
        assert patched_mask.dtype == hf_mask.dtype == torch.bool and torch.equal(patched_mask, hf_mask)
    else:  # 4.x BERT adds its padding as a float mask (the dtype's minimum at padded keys)
        assert patched_mask.dtype == hf_mask.dtype == torch.float32 and torch.equal(patched_mask, hf_mask)
    torch.testing.assert_close(got, expected)


def _tiny_llama_mlp():
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_attention_heads=2, mlp_bias=True)
    torch.manual_seed(0)
    return LlamaMLP(config).eval()


def test_patched_gated_mlp_keeps_its_stacked_weight_and_follows_every_update(monkeypatch):
    """A patched gated MLP stacks [gate; up] once for no-grad calls, and its output follows the
    parameters through an in-place update (an optimizer step), load_state_dict, a replaced
    parameter and .to(); with grad the gradients reach gate and up as the unpatched module's."""
    from fusedformer.patch import mlp as mlp_rule

    model = _tiny_llama_mlp()
    patched = ff.patch(copy.deepcopy(model))
    cats = []
    real_cat = mlp_rule._cat
    monkeypatch.setattr(mlp_rule, "_cat", lambda *a: cats.append(1) or real_cat(*a))
    x = torch.randn(3, 16)

    def agree():
        with torch.no_grad():
            torch.testing.assert_close(patched(x), model(x))

    agree()
    agree()
    assert len(cats) == 1
    with torch.no_grad():
        for m in (model, patched):
            m.gate_proj.weight.add_(0.5)
            m.up_proj.bias.mul_(-2.0)
    agree()
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    patched.load_state_dict(state)
    agree()
    for m in (model, patched):
        m.up_proj.weight = torch.nn.Parameter(torch.ones_like(m.up_proj.weight))
    agree()
    model.double(), patched.double()
    x = x.double()
    agree()
    assert len(cats) == 5
    xg = x.clone().requires_grad_()
    grads = [torch.autograd.grad(m(xg).sum(), (xg, m.gate_proj.weight, m.up_proj.weight, m.up_proj.bias))
             for m in (model, patched)]
    for got, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, expected)
