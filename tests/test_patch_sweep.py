"""ff.patch(verify=True) swept over transformers model classes built from tiny configs (nothing
downloaded): encoders, decoders, encoder-decoders and vision models with their causal LM, masked
LM, classification and multiple-choice heads, loaded in float32, bfloat16 and float16, patched
for the reference backend and for ``auto`` (the torch backend on a CPU). Each one is patched with
outputs equal to the unpatched model's (low precision: within 2x of the unpatched model's own
error against its float32 twin) and, in float32, an identical greedy ``generate`` (in low
precision the fused ops' float32 math may round a near tie the other way: GPT-J in bfloat16 picks
another third token), or refused with a clear ValueError naming ``example_inputs``; never a crash
from inside the library. Unpatch restores every module's class and attributes.

By default one head per family in float32 on the reference backend, a few bfloat16 and float16
loads and a few ``auto`` patches run (about 30 s); ``FUSEDFORMER_FULL_SWEEP=1`` runs every case."""

import contextlib
import copy
import os

import fusedformer as ff
import pytest
import torch
from fusedformer.patch.hf_inputs import synthetic_batches

tf = pytest.importorskip("transformers")

SMALL = {"vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 37, "max_position_embeddings": 64, "head_dim": 8,
         "d_model": 32, "d_ff": 37, "d_kv": 8, "num_layers": 2, "num_heads": 4, "encoder_layers": 2,
         "decoder_layers": 2, "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 37,
         "decoder_ffn_dim": 37, "relative_attention_num_buckets": 8, "image_size": 32, "patch_size": 8,
         "num_channels": 3, "embedding_size": 16, "dim": 32, "hidden_dim": 37, "n_layers": 2, "n_heads": 4}
VISION = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "intermediate_size": 37}
# family -> (config overrides, head classes; the first is the one CI runs)
FAMILIES = {
    "Bert": ({}, ["BertForMaskedLM", "BertForSequenceClassification", "BertForMultipleChoice",
                  "BertForTokenClassification", "BertForQuestionAnswering", "BertModel"]),
    "Roberta": ({}, ["RobertaForMaskedLM", "RobertaForCausalLM", "RobertaForMultipleChoice"]),
    "DistilBert": ({}, ["DistilBertForMaskedLM", "DistilBertForSequenceClassification",
                        "DistilBertForMultipleChoice"]),
    "Albert": ({}, ["AlbertForMaskedLM", "AlbertForMultipleChoice"]),
    "Electra": ({}, ["ElectraForMaskedLM", "ElectraForSequenceClassification"]),
    "GPT2": ({}, ["GPT2LMHeadModel", "GPT2ForSequenceClassification", "GPT2DoubleHeadsModel",
                  "GPT2ForTokenClassification"]),
    "GPTNeo": ({"num_layers": 2, "attention_types": [[["global", "local"], 1]], "window_size": 4},
               ["GPTNeoForCausalLM"]),
    "GPTJ": ({"rotary_dim": 4}, ["GPTJForCausalLM"]),
    "OPT": ({"ffn_dim": 37, "word_embed_proj_dim": 32}, ["OPTForCausalLM", "OPTForSequenceClassification"]),
    "Bloom": ({}, ["BloomForCausalLM"]),
    "Llama": ({}, ["LlamaForCausalLM", "LlamaForSequenceClassification", "LlamaForQuestionAnswering"]),
    "Mistral": ({"sliding_window": 4}, ["MistralForCausalLM"]),
    "Qwen2": ({}, ["Qwen2ForCausalLM"]),
    "Phi": ({}, ["PhiForCausalLM"]),
    "Gemma": ({}, ["GemmaForCausalLM"]),
    "Gemma2": ({}, ["Gemma2ForCausalLM"]),  # attention softcapping: its attention is left, the rest fused
    "Qwen3": ({}, ["Qwen3ForCausalLM"]),
    "Phi3": ({}, ["Phi3ForCausalLM"]),
    "Falcon": ({}, ["FalconForCausalLM"]),
    "GPTNeoX": ({}, ["GPTNeoXForCausalLM"]),
    "GPTBigCode": ({}, ["GPTBigCodeForCausalLM"]),
    "StableLm": ({}, ["StableLmForCausalLM"]),
    "Mixtral": ({"intermediate_size": 32, "num_local_experts": 2, "num_experts_per_tok": 1}, ["MixtralForCausalLM"]),
    "XLMRoberta": ({}, ["XLMRobertaForMaskedLM"]),
    "DebertaV2": ({}, ["DebertaV2ForMaskedLM"]),
    "MobileBert": ({"embedding_size": 32, "intra_bottleneck_size": 32, "true_hidden_size": 32},
                   ["MobileBertForMaskedLM"]),
    "T5": ({"num_decoder_layers": 2, "decoder_start_token_id": 0},
           ["T5ForConditionalGeneration", "T5ForSequenceClassification", "T5ForQuestionAnswering",
            "T5EncoderModel"]),
    "MT5": ({"num_decoder_layers": 2, "decoder_start_token_id": 0}, ["MT5ForConditionalGeneration"]),
    "Bart": ({}, ["BartForConditionalGeneration", "BartForSequenceClassification", "BartForCausalLM",
                  "BartForQuestionAnswering"]),
    "MBart": ({}, ["MBartForConditionalGeneration"]),
    "Pegasus": ({}, ["PegasusForConditionalGeneration"]),
    "Whisper": ({}, ["WhisperForConditionalGeneration"]),  # audio features: refused, asks for example_inputs
    "ViT": ({}, ["ViTForImageClassification", "ViTModel"]),
    "DeiT": ({}, ["DeiTForImageClassification"]),
    "Dinov2": ({}, ["Dinov2ForImageClassification"]),
    "Swin": ({"embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2], "window_size": 2, "patch_size": 4},
             ["SwinForImageClassification"]),
    "CLIP": ({"text_config": {"vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                              "intermediate_size": 37, "max_position_embeddings": 16, "eos_token_id": 2},
              "vision_config": VISION, "projection_dim": 16}, ["CLIPModel"]),
}
# the families whose first head CI runs beyond float32 on the reference backend
IN_CI = {(torch.bfloat16, "reference"): ("Llama", "T5", "Bert", "ViT"),
         (torch.float16, "reference"): ("GPT2", "Bart", "Qwen2"),
         (torch.float32, "auto"): ("Llama", "T5", "Bert", "ViT", "Gemma2")}
FULL = os.environ.get("FUSEDFORMER_FULL_SWEEP") == "1"


def _in_ci(family, first_head, dtype, backend):
    in_default_run = dtype == torch.float32 and backend == "reference"
    return first_head and (in_default_run or family in IN_CI.get((dtype, backend), ()))


CASES = [pytest.param(family, head, dtype, backend, id=f"{head}-{str(dtype)[6:]}-{backend}",
                      marks=() if FULL or _in_ci(family, i == 0, dtype, backend) else
                      pytest.mark.skip(reason="the full sweep: FUSEDFORMER_FULL_SWEEP=1"))
         for family, (_, heads) in FAMILIES.items() for i, head in enumerate(heads)
         for dtype in (torch.float32, torch.bfloat16, torch.float16) for backend in ("reference", "auto")]


def tiny_config(family, head=""):
    overrides, _ = FAMILIES[family]
    cfg = getattr(tf, family + "Config")()
    for key, value in {**SMALL, **overrides}.items():
        if key in overrides or (hasattr(cfg, key) and not isinstance(getattr(cfg, key), (dict, list))):
            with contextlib.suppress(AttributeError):  # a derived, read-only field (Falcon's head_dim)
                setattr(cfg, key, value)
    if "text_config" in overrides:  # a composite config: rebuilt from its parts
        cfg = type(cfg)(text_config=overrides["text_config"], vision_config=overrides["vision_config"],
                        projection_dim=overrides["projection_dim"])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value >= cfg.vocab_size:  # GPT-2's 50256 in a 99-token vocabulary
            setattr(cfg, key, 2)
    cfg.num_labels = 2 if head.endswith("QuestionAnswering") else 3  # span heads: a start and an end
    return cfg


def _main_output(out):
    for key in ("logits", "logits_per_image", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    return out[0]


def _accepted_batch(model):
    for inputs in synthetic_batches(model, seed=1):
        try:
            with torch.no_grad():
                model(**inputs)
            return inputs
        except Exception:
            continue
    return None


@pytest.mark.parametrize("family,head,dtype,backend", CASES)
def test_patch_sweep(family, head, dtype, backend):
    torch.manual_seed(0)
    twin32 = getattr(tf, head)(tiny_config(family, head)).eval()
    model = copy.deepcopy(twin32).to(dtype)
    ref = copy.deepcopy(model)
    snap = [(m, type(m), dict(m.__dict__)) for m in model.modules()]
    try:
        _, report = ff.patch(model, backend=None if backend == "auto" else backend, return_report=True)
    except ValueError as e:  # a clean refusal: it says what to pass
        assert "example_inputs" in str(e), e
        return
    assert report.replaced or report.attention, str(report)
    inputs = _accepted_batch(ref)
    assert inputs is not None
    with torch.no_grad():
        y, y_ref = _main_output(model(**inputs)), _main_output(ref(**inputs))
        if dtype == torch.float32:
            torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-4)
        else:  # the project's rule for low precision: within 2x of the original's own error
            exact = _main_output(twin32(**_cast(inputs, torch.float32)))
            own, ours = (y_ref.float() - exact).abs().max(), (y.float() - exact).abs().max()
            assert ours <= 2 * own + 2**-8 * exact.abs().max(), (ours, own)
    if model.can_generate() and dtype == torch.float32:
        ids = inputs["input_ids"][:1, :5]
        kwargs = {"max_new_tokens": 3, "do_sample": False, "attention_mask": torch.ones_like(ids)}
        assert torch.equal(model.generate(ids, **kwargs), ref.generate(ids, **kwargs))
    ff.unpatch(model)
    for m, cls, attributes in snap:
        assert type(m) is cls and m.__dict__.keys() == attributes.keys()
        assert all(m.__dict__[k] is v for k, v in attributes.items()), type(m).__name__


def _cast(inputs, dtype):
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
