"""Every op against PyTorch's own OpInfo test data (``torch.testing._internal``'s ``op_db``),
test data nobody here wrote.

Each sample input torch accepts is accepted and matches torch (values, NaN pattern and the
gradients of every input that requires grad, by the parity rule of ``_fidelity_testing``), or is
refused with a ValueError/TypeError the README lists under "torch inputs fusedformer refuses".
Each error input torch rejects is rejected with a ValueError/TypeError. On the reference and
torch backends in float64, float32 and bfloat16 (float64 also through strided copies of the
samples); on the interpreted triton backend in float32 for a few samples of each op.

The ff functions reach torch's signatures through the small adapters of ``CASES``: the
activations run through ``ff.linear_act``'s epilogue (an exact 1x1 identity GEMM), and every
activation is also composed with ``nn.functional.linear``'s samples, as ``ff.linear_act`` fuses
them. ``nn.functional.softmax`` and ``special.softmax`` are aliases of ``softmax`` in op_db, with
the same samples. Attention dropout is compared through torch's math kernel given fusedformer's
Philox keep-mask (torch's own dropout stream is another one).
"""

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import fusedformer as ff
import pytest
import torch
import torch.nn.functional as F
from _fidelity_testing import REFUSALS, assert_listed_refusal, compare, readme_unsupported
from fusedformer import backends
from fusedformer.backends import BackendUnavailableError
from fusedformer.vocabulary import ACTIVATIONS, attention_dropout_keep

pytest.importorskip("expecttest")  # torch.testing._internal needs it
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402

OPINFO = {(o.name, o.variant_test_name): o for o in op_db}
DROPOUT_SEED = 1234


def _sdpa_ours(q, k, v, **kwargs):
    torch.manual_seed(DROPOUT_SEED)
    return ff.scaled_dot_product_attention(q, k, v, **kwargs)


def _sdpa_torch(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if dropout_p == 0.0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    # the keep-mask ff draws (its seed is the first draw after torch.manual_seed), applied by torch's math kernel
    torch.manual_seed(DROPOUT_SEED)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    Lq, Lk = q.shape[-2], k.shape[-2]
    keep = attention_dropout_keep(seed, math.prod(batch[:-1]), batch[-1], Lq, Lk, dropout_p).view(*batch, Lq, Lk)
    return torch.ops.aten._scaled_dot_product_attention_math(
        q, k, v, attn_mask, dropout_p, is_causal, keep, scale=scale, enable_gqa=enable_gqa)[0]


def _activation_name(op_name, approximate="none"):
    if op_name == "gelu":
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate, approximate)
    return op_name


def _through_epilogue(op_name):
    """The activation's samples x through ff.linear_act: act(x @ [[1]]), exactly act(x)."""
    def ours(x, **kwargs):
        one = torch.ones(1, 1, dtype=x.dtype)
        return ff.linear_act(x.unsqueeze(-1), one, None, _activation_name(op_name, **kwargs))[..., 0]
    return ours


def _linear_then(activation):
    def ours(x, weight, bias=None):
        return ff.linear_act(x, weight, bias, activation)

    def theirs(x, weight, bias=None):
        return ACTIVATIONS[activation].torch_forward(F.linear(x, weight, bias))
    return ours, theirs


@dataclass(frozen=True)
class Case:
    opinfo: tuple  # (op_db name, variant)
    ours: Callable
    theirs: Callable
    family: str  # the op family the triton run needs


CASES = {
    "sdpa": Case(("nn.functional.scaled_dot_product_attention", ""), _sdpa_ours, _sdpa_torch, "attention"),
    "softmax": Case(("softmax", ""), ff.softmax, torch.softmax, "softmax"),
    "softmax_with_dtype": Case(("softmax", "with_dtype"), ff.softmax, torch.softmax, "softmax"),
    "layer_norm": Case(("nn.functional.layer_norm", ""), ff.layer_norm, F.layer_norm, "layer_norm"),
    "rms_norm": Case(("nn.functional.rms_norm", ""), ff.rms_norm, F.rms_norm, "rms_norm"),
    "linear": Case(("nn.functional.linear", ""), *_linear_then("identity"), "linear_act"),
    **{f"linear_{a}": Case(("nn.functional.linear", ""), *_linear_then(a), "linear_act")
       for a in ("relu", "gelu", "gelu_tanh", "silu")},
    **{a: Case((f"nn.functional.{a}", ""), _through_epilogue(a), OPINFO[(f"nn.functional.{a}", "")].op, "linear_act")
       for a in ("relu", "gelu", "silu")},
}

# op_db entry whose error_inputs are torch's rejections for each op (native_layer_norm takes
# F.layer_norm's arguments; F.layer_norm's own entry has none)
ERROR_CASES = {
    "layer_norm": (("native_layer_norm", ""), ff.layer_norm),
    "rms_norm": (("nn.functional.rms_norm", ""), ff.rms_norm),
    "gelu": (("nn.functional.gelu", ""), CASES["gelu"].ours),
}

# Known differences, found by these tests: strict xfails, to remove when the fix is merged.
# case -> [(is it hit by (sample index, sample, backend, dtype), why)]
KNOWN_BUGS = {}

BACKEND_DTYPES = [(b, d) for b in ("reference", "torch") for d in (torch.float64, torch.float32, torch.bfloat16)]
TRITON_SAMPLES = 3  # the first samples of each case, float32, on the interpreted triton backend


@functools.cache
def _samples(case):
    """The op's samples (float64 leaves; every comparison casts fresh copies), one seeded draw per case."""
    torch.manual_seed(0)
    return list(OPINFO[case.opinfo].sample_inputs("cpu", torch.float64, requires_grad=True))


def _params(backend_dtypes, max_index=None):
    for name, case in CASES.items():
        for i, sample in enumerate(_samples(case)[:max_index]):
            for backend, dtype in backend_dtypes:
                reasons = [why for hit, why in KNOWN_BUGS.get(name, ()) if hit(i, sample, backend, dtype)]
                marks = [pytest.mark.xfail(strict=True, reason=reasons[0])] if reasons else []
                yield pytest.param(name, i, backend, dtype, id=f"{name}-{i}-{backend}-{str(dtype)[6:]}", marks=marks)


def _check_sample(name, index, backend, dtype, noncontiguous=False):
    case = CASES[name]
    sample = _samples(case)[index]
    if noncontiguous:  # the same values through strides (float64 keeps them: cast() copies no data there)
        sample = sample.noncontiguous()
    args, kwargs = (sample.input, *sample.args), dict(sample.kwargs)
    what = f"{name} sample {index} on {backend} in {dtype}"
    try:
        with ff.use_backend(backend):
            compare(case.ours, case.theirs, args, kwargs, dtype, what)
    except BackendUnavailableError as exc:
        pytest.skip(f"{backend} does not run it ({exc}); auto takes another backend")
    except (ValueError, TypeError) as exc:
        assert_listed_refusal(exc, REFUSALS, what)


@pytest.mark.parametrize("name,index,backend,dtype", list(_params(BACKEND_DTYPES)))
def test_sample_matches_torch_or_is_a_listed_refusal(name, index, backend, dtype):
    _check_sample(name, index, backend, dtype)


@pytest.mark.parametrize("name,index,backend,dtype", list(_params([("reference", torch.float64),
                                                                   ("torch", torch.float64)])))
def test_noncontiguous_sample_matches_torch(name, index, backend, dtype):
    _check_sample(name, index, backend, dtype, noncontiguous=True)


@pytest.mark.parametrize("name,index,backend,dtype", list(_params([("triton", torch.float32)], TRITON_SAMPLES)))
def test_sample_on_interpreted_triton(name, index, backend, dtype):
    reason = backends.unsupported_reason("triton", CASES[name].family, "cpu")
    if reason:
        pytest.skip(f"triton {CASES[name].family}: {reason}")
    _check_sample(name, index, backend, dtype)


def _error_params():
    for name, (opinfo, _) in ERROR_CASES.items():
        for i, _ in enumerate(OPINFO[opinfo].error_inputs("cpu")):
            yield pytest.param(name, i, id=f"{name}-{i}")


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("name,index", list(_error_params()))
def test_error_input_torch_rejects_is_rejected(name, index, backend):
    opinfo, ours = ERROR_CASES[name]
    error = list(OPINFO[opinfo].error_inputs("cpu"))[index]
    sample = error.sample_input
    with pytest.raises(error.error_type, match=error.error_regex):  # torch rejects it (the data is current)
        OPINFO[opinfo].op(sample.input, *sample.args, **sample.kwargs)
    with ff.use_backend(backend), pytest.raises((ValueError, TypeError)):
        ours(sample.input, *sample.args, **sample.kwargs)


def test_readme_lists_exactly_the_refusals():
    assert sorted(readme_unsupported()) == sorted(REFUSALS)
