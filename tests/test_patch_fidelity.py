"""ff.patch leaves what it cannot fuse exactly as it was: mixed-dtype MLPs (T5 loaded in float16
keeps ``wo`` in float32), heads the synthetic probe must shape for (multiple choice, T5's eos
pooling) or cannot (a clear error naming example_inputs), and instance state the undo log must
restore exactly (an instance-level forward wrapper, an existing ``backend`` attribute)."""

import copy

import fusedformer as ff
import fusedformer.nn as ffnn
import pytest
import torch
from fusedformer.patch import PatchVerificationError
from test_patch import MLP, RMSLike  # a user-written MLP and RMSNorm the patch must recognize

tf = pytest.importorskip("transformers")


def t5_config(**kwargs):
    return tf.T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0,
                       relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                       **kwargs)


def test_t5_loaded_in_float16_keeps_wo_in_float32_and_its_mlp_unfused(tmp_path):
    torch.manual_seed(0)
    tf.T5ForConditionalGeneration(t5_config()).save_pretrained(tmp_path)
    model = tf.T5ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float16).eval()
    assert model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32  # _keep_in_fp32_modules
    ref = copy.deepcopy(model)
    _, report = ff.patch(model, backend="reference", return_report=True)
    left = {name: why for name, _, why in report.left}
    assert len(left) == 4 and all("different dtypes (float16, float32)" in why for why in left.values()), report
    assert all("DenseReluDense" in name for name in left)
    assert {new for _, orig, new in report.replaced if orig == "T5LayerNorm"} == {"ff.rms_norm"}
    assert "forward" not in model.encoder.block[0].layer[1].DenseReluDense.__dict__
    ids = torch.randint(2, 97, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=ids).logits,
                                   ref(input_ids=ids, decoder_input_ids=ids).logits, atol=3e-2, rtol=3e-2)
    assert torch.equal(model.generate(ids, max_new_tokens=3), ref.generate(ids, max_new_tokens=3))


@pytest.mark.parametrize("head", ["BertForMultipleChoice", "T5ForSequenceClassification"])
def test_verify_builds_a_batch_the_head_accepts(head):
    torch.manual_seed(0)
    config = t5_config() if head.startswith("T5") else tf.BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32)
    model = getattr(tf, head)(config).eval()
    ref = copy.deepcopy(model)
    _, report = ff.patch(model, backend="reference", return_report=True)
    assert report.verified is not None and report.verified["max_abs_diff"] <= report.verified["tolerance"]
    g = torch.Generator().manual_seed(2)
    if head == "BertForMultipleChoice":
        inputs = {"input_ids": torch.randint(2, 97, (2, 3, 7), generator=g)}
    else:  # one eos ending every row
        ids = torch.randint(2, 97, (2, 7), generator=g)
        ids[:, -1] = 1
        inputs = {"input_ids": ids}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, ref(**inputs).logits, atol=2e-5, rtol=1e-4)


class NeedsTwoInputs(tf.PreTrainedModel):
    """A Hugging Face model whose forward needs an argument no config describes."""

    config_class = tf.PretrainedConfig

    def __init__(self, config):
        super().__init__(config)
        self.norm = torch.nn.LayerNorm(8)
        self.post_init()

    def forward(self, input_ids, side):
        return self.norm(side + input_ids.float()[..., None])


def test_verify_without_a_usable_synthetic_batch_asks_for_example_inputs():
    model = NeedsTwoInputs(tf.PretrainedConfig(vocab_size=10))
    snap = [(m, type(m), dict(m.__dict__)) for m in model.modules()]
    with pytest.raises(ValueError, match="NeedsTwoInputs accepts .*pass example_inputs="):
        ff.patch(model, backend="reference")
    assert all(type(m) is cls and m.__dict__ == d for m, cls, d in snap)
    _, report = ff.patch(model, backend="reference", return_report=True,
                         example_inputs={"input_ids": torch.ones(2, 3, dtype=torch.long), "side": torch.randn(2, 3, 8)})
    assert report.verified is not None and type(model.norm) is ffnn.LayerNorm


class Wrapped(torch.nn.Module):
    """An instance-level forward wrapper, as accelerate's hooks install: it must survive."""

    def __init__(self, module):
        super().__init__()
        self.inner = module
        original = module.forward
        self.calls = 0

        def wrapper(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        module.forward = wrapper

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("inner", ["LayerNorm", "RMSLike", "MLP", "EncoderLayer"])
def test_instance_forward_wrapper_is_left_and_survives(inner):
    d = 8
    module = {"LayerNorm": lambda: torch.nn.LayerNorm(d), "RMSLike": lambda: RMSLike(d),
              "MLP": lambda: MLP(d, hidden_dropout=False).eval(),
              "EncoderLayer": lambda: torch.nn.TransformerEncoderLayer(d, 2, 12, dropout=0.0, batch_first=True),
              }[inner]()
    model, cls = Wrapped(module), type(module)
    wrapper = module.forward
    _, report = ff.patch(model, backend="reference", return_report=True)
    assert module.forward is wrapper and type(module) is cls
    assert any("instance attribute (a wrapper)" in why for _, _, why in report.left), report
    model.calls = 0
    model(torch.randn(2, 3, d))
    assert model.calls == 1
    ff.unpatch(model)
    assert module.forward is wrapper


def test_wrapped_submodule_of_a_layer_leaves_the_layer_whole():
    layer = torch.nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True)
    Wrapped(layer.norm1)
    _, report = ff.patch(torch.nn.Sequential(layer), backend="reference", return_report=True)
    assert type(layer) is torch.nn.TransformerEncoderLayer
    assert any("fused layer would skip" in why for _, _, why in report.left), report


def test_rollback_and_unpatch_restore_overwritten_attributes_exactly(monkeypatch):
    import fusedformer.nn.layer_norm as ln_mod

    norm, absent = torch.nn.LayerNorm(8), torch.nn.LayerNorm(8)
    norm.backend = "mine"  # an attribute ff.patch overwrites
    model = torch.nn.Sequential(norm, absent, RMSLike(8))
    snap = [(m, type(m), dict(m.__dict__)) for m in model.modules()]

    def assert_exact():
        for m, cls, attributes in snap:
            assert type(m) is cls and m.__dict__.keys() == attributes.keys()
            assert all(m.__dict__[k] is v for k, v in attributes.items())

    ff.patch(model, backend="reference")
    assert norm.backend == "reference" and absent.backend == "reference"
    model.eval()  # a change made while patched is the user's: it stays
    ff.unpatch(model)
    assert norm.backend == "mine" and "backend" not in absent.__dict__ and not model.training
    model.train()
    assert_exact()
    real = ln_mod.layer_norm
    monkeypatch.setattr(ln_mod, "layer_norm", lambda x, *a, **k: real(x, *a, **k) * 1.5)
    with pytest.raises(PatchVerificationError):  # the swap probe fails: rolled back
        ff.patch(model, backend="reference")
    assert norm.backend == "mine"
    assert_exact()
