"""The ``fusedformer.nn`` drop-ins against PyTorch's own ModuleInfo test data
(``torch.testing._internal``'s ``module_db``), test data nobody here wrote.

For each sample, the fusedformer module is built from the same constructor arguments (a torch
layer argument, as TransformerEncoder's, becomes its twin), loads the torch module's state_dict
with ``strict=True``, and runs the sample's forward: outputs and the gradients of every input and
parameter match torch by the parity rule of ``_fidelity_testing`` (parameters pass through
``torch.func.functional_call``, so they are leaves like the inputs), or the module refuses with
an error the README lists. In eval and train mode (train mode where no dropout is drawn: the
streams differ), float64 and float32, on the reference and torch backends; float32 on the
interpreted triton backend. module_db has no TransformerDecoder entry: the Transformer entry runs one.

module_db's samples are combinatorial (MultiheadAttention's 64 are every mix of batch_first, bias,
add_bias_kv, add_zero_attn and the masks) and a Transformer sample takes about a second here, so
CI runs ``RUNS``: for each module and run, that many samples spread evenly over the list, each run
from another offset. ``FUSEDFORMER_FIDELITY_FULL=1`` runs every sample in every run (about 2,300
tests, some 15 minutes on 2 cores).
"""

import functools
import os

import fusedformer as ff
import pytest
import torch
from _fidelity_testing import REFUSALS, assert_listed_refusal, compare
from fusedformer import backends
from fusedformer.backends import BackendUnavailableError
from fusedformer.nn.convert import TWINS

pytest.importorskip("expecttest")  # torch.testing._internal needs it
from torch.testing._internal.common_modules import module_db  # noqa: E402

MODULES = {m.module_cls: m for m in module_db if m.module_cls in TWINS}
FULL = os.environ.get("FUSEDFORMER_FIDELITY_FULL") == "1"
# (training, backend, dtype, samples of each module in CI)
RUNS = [
    (False, "reference", torch.float64, 8),
    (False, "reference", torch.float32, 3),
    (False, "torch", torch.float64, 3),
    (False, "torch", torch.float32, 3),
    (True, "reference", torch.float64, 3),
]
TRITON_RUN = (False, "triton", torch.float32, 1)
TRITON_MODULES = (torch.nn.LayerNorm, torch.nn.RMSNorm, torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer)


@functools.cache
def _samples(cls, training):
    torch.manual_seed(0)
    info = MODULES[cls]
    return info.module_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=True, training=training)


def _twin_arg(value):
    return ff.nn.from_torch(value) if isinstance(value, torch.nn.Module) else value


def _draws_dropout(module):
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 or isinstance(m, torch.nn.MultiheadAttention)
               and m.dropout > 0 for m in module.modules())


def _check_sample(cls, training, index, backend, dtype):
    sample = _samples(cls, training)[index]
    ctor, fwd = sample.constructor_input, sample.forward_input
    torch.manual_seed(1)
    theirs = cls(*ctor.args, **ctor.kwargs).to(torch.float64).train(training)
    if training and _draws_dropout(theirs):
        pytest.skip("draws dropout in training: torch's stream is not fusedformer's")
    ours = TWINS[cls](*map(_twin_arg, ctor.args), **ctor.kwargs).to(torch.float64).train(training)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    params = dict(theirs.named_parameters())

    def call(module):
        return lambda params, *args, **kwargs: torch.func.functional_call(module, params, args, kwargs)

    what = f"{cls.__name__} sample {index} ({sample.desc or 'no desc'}, training={training}) on {backend} in {dtype}"
    try:
        with ff.use_backend(backend):
            compare(call(ours), call(theirs), (params, *fwd.args), dict(fwd.kwargs), dtype, what)
    except BackendUnavailableError as exc:
        pytest.skip(f"{backend} does not run it ({exc}); auto takes another backend")
    except (ValueError, TypeError) as exc:
        assert_listed_refusal(exc, REFUSALS, what)


def _spread(n, count, offset):
    """``count`` of the indices 0..n-1, evenly spaced from ``offset`` (all of them when FULL)."""
    if FULL or count >= n:
        return range(n)
    return sorted({(offset + k * n // count) % n for k in range(count)})


def _params(runs, modules=tuple(MODULES)):
    for offset, (training, backend, dtype, count) in enumerate(runs):
        for cls in modules:
            samples = _samples(cls, training)
            mode = "train" if training else "eval"
            for i in _spread(len(samples), count, offset):
                yield pytest.param(cls, training, i, backend, dtype,
                                   id=f"{cls.__name__}-{mode}-{i}-{backend}-{str(dtype)[6:]}")


@pytest.mark.parametrize("cls,training,index,backend,dtype", list(_params(RUNS)))
def test_module_sample_matches_torch(cls, training, index, backend, dtype):
    _check_sample(cls, training, index, backend, dtype)


@pytest.mark.parametrize("cls,training,index,backend,dtype", list(_params([TRITON_RUN], TRITON_MODULES)))
def test_module_sample_on_interpreted_triton(cls, training, index, backend, dtype):
    reasons = [r for f in ("attention", "layer_norm", "rms_norm", "linear_act")
               if (r := backends.unsupported_reason("triton", f, "cpu"))]
    if reasons:
        pytest.skip("; ".join(reasons))
    _check_sample(cls, training, index, backend, dtype)


def test_every_drop_in_has_module_info_data():
    missing = {cls.__name__ for cls in TWINS} - {cls.__name__ for cls in MODULES}
    assert missing == {"TransformerDecoder"}, missing  # run inside nn.Transformer's samples
