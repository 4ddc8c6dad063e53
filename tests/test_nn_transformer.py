"""fusedformer.nn's encoder / decoder layers, stacks and Transformer against torch.nn: checkpoints
load both ways (strict), same outputs and gradients (float64, reference backend), from_torch, and
torch.compile(fullgraph=True)."""

import fusedformer as ff
import pytest
import torch
import torch.nn.functional as F
from _nn_testing import close, compare, key_padding_mask, random_attn_mask, twin

# --------------------------------------------------------------------------------------------
# encoder / decoder layers and stacks
# --------------------------------------------------------------------------------------------


LAYER_CASES = [
    {"norm_first": False, "activation": "relu"},
    {"norm_first": True, "activation": "gelu"},
    {"norm_first": True, "activation": torch.nn.GELU(approximate="tanh")},
    {"norm_first": False, "activation": torch.tanh, "bias": False},
]


def _seeded_params(module):
    torch.manual_seed(4)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)


@pytest.mark.parametrize("kwargs", LAYER_CASES)
@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_layer_matches_torch(kwargs, batch_first):
    args = (16, 4, 24, 0.0)
    ours = ff.nn.TransformerEncoderLayer(*args, batch_first=batch_first, dtype=torch.float64, **kwargs)
    theirs = torch.nn.TransformerEncoderLayer(*args, batch_first=batch_first, dtype=torch.float64, **kwargs)
    _seeded_params(ours)
    twin(ours, theirs)
    x = torch.randn((3, 7, 16) if batch_first else (7, 3, 16), dtype=torch.float64)
    kpm = key_padding_mask(3, 7, "bool")
    mask = random_attn_mask(7, 7, "bool")

    def run(m):
        return lambda x: m(x, src_mask=mask, src_key_padding_mask=kpm)

    compare(run(ours), run(theirs), [x], modules=(ours, theirs))


@pytest.mark.parametrize("kwargs", LAYER_CASES[:3])
def test_decoder_layer_matches_torch(kwargs):
    args = (16, 4, 24, 0.0)
    ours = ff.nn.TransformerDecoderLayer(*args, batch_first=True, dtype=torch.float64, **kwargs)
    theirs = torch.nn.TransformerDecoderLayer(*args, batch_first=True, dtype=torch.float64, **kwargs)
    _seeded_params(ours)
    twin(ours, theirs)
    tgt, mem = torch.randn(2, 6, 16, dtype=torch.float64), torch.randn(2, 9, 16, dtype=torch.float64)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)

    def run(m):
        return lambda t, s: m(t, s, tgt_mask=causal, memory_key_padding_mask=key_padding_mask(2, 9, "bool"),
                              tgt_is_causal=True)

    compare(run(ours), run(theirs), [tgt, mem], modules=(ours, theirs))


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_matches_torch(norm_first):
    kwargs = dict(d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=20, dropout=0.0,
                  norm_first=norm_first, dtype=torch.float64)
    torch.manual_seed(5)
    ours = ff.nn.Transformer(**kwargs)
    torch.manual_seed(5)
    theirs = torch.nn.Transformer(**kwargs)
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name  # same seed, same initial weights as torch
    assert isinstance(ours.encoder.norm, ff.nn.LayerNorm) and isinstance(ours.decoder, ff.nn.TransformerDecoder)
    assert isinstance(ours.encoder.layers[1], ff.nn.TransformerEncoderLayer)
    assert isinstance(ours.decoder.layers[1].multihead_attn, ff.nn.MultiheadAttention)
    twin(ours, theirs)
    src, tgt = torch.randn(8, 2, 16, dtype=torch.float64), torch.randn(5, 2, 16, dtype=torch.float64)
    tgt_mask = torch.nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)

    def run(m):
        return lambda s, t: m(s, t, tgt_mask=tgt_mask, src_key_padding_mask=key_padding_mask(2, 8, "bool"),
                              memory_key_padding_mask=key_padding_mask(2, 8, "bool"))

    compare(run(ours), run(theirs), [src, tgt], modules=(ours, theirs))


def test_encoder_stack_matches_torch_and_modules_train():
    layer = ff.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True, dtype=torch.float64)
    ours = ff.nn.TransformerEncoder(layer, 3, norm=ff.nn.LayerNorm(16, dtype=torch.float64),
                                    enable_nested_tensor=False)
    theirs = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True, dtype=torch.float64), 3,
        norm=torch.nn.LayerNorm(16, dtype=torch.float64), enable_nested_tensor=False)
    twin(ours, theirs)
    ours.eval(), theirs.eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    compare(ours, theirs, [x])
    ours.train()  # dropout on: a few SGD steps lower a fitting loss
    opt = torch.optim.SGD(ours.parameters(), lr=0.05)
    target = torch.randn(2, 5, 16, dtype=torch.float64)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.mse_loss(ours(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# --------------------------------------------------------------------------------------------
# from_torch and torch.compile
# --------------------------------------------------------------------------------------------


def test_from_torch_twin_shares_parameters_and_matches():
    torch.manual_seed(6)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 16, dtype=torch.float64),
        torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 4, 24, 0.0, F.gelu, batch_first=True,
                                                                     dtype=torch.float64), 2,
                                    enable_nested_tensor=False),
        torch.nn.RMSNorm(16, dtype=torch.float64))
    twin = ff.nn.from_torch(model, backend="reference")
    assert isinstance(twin[1], ff.nn.TransformerEncoder) and isinstance(twin[2], ff.nn.RMSNorm)
    assert isinstance(twin[1].layers[0].self_attn, ff.nn.MultiheadAttention)
    assert type(model[1].layers[0].self_attn) is torch.nn.MultiheadAttention  # the original is untouched
    assert twin[1].layers[0].linear1.weight is model[1].layers[0].linear1.weight
    assert list(twin.state_dict()) == list(model.state_dict())
    compare(twin, model, [torch.randn(2, 5, 16, dtype=torch.float64)])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ff.nn.from_torch(3)


def test_encoder_layer_under_compile_fullgraph():
    torch._dynamo.reset()
    layer = ff.nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, batch_first=True, norm_first=True)
    x = torch.randn(2, 5, 16, requires_grad=True)
    kpm = key_padding_mask(2, 5, "bool")
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x, src_key_padding_mask=kpm)
    close(out, layer(x, src_key_padding_mask=kpm), torch.float32)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
