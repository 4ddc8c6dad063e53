"""ff.patch / ff.unpatch / ff.patched: walk a model, apply the rules (torch.nn class swaps, norms,
MLPs, Hugging Face attention), verify the whole model, and undo everything on failure."""

import contextlib

import torch

from fusedformer import backends
from fusedformer.patch import hf
from fusedformer.patch.hf_inputs import synthetic_batches
from fusedformer.patch.mlp import try_mlp
from fusedformer.patch.norm import try_norm
from fusedformer.patch.report import PatchReport, PatchVerificationError
from fusedformer.patch.swap import CLASS_SWAPS, probe_inputs, swap, swapped_submodules, why_not_swap
from fusedformer.patch.undo import UndoLog
from fusedformer.patch.verify import compare, dtype_device, float_param, run, run_module

OPS = ("attention", "norm", "mlp")
_STATE = "_fusedformer_patch"
_REPORT = "_fusedformer_report"


def patch(model, ops=OPS, backend=None, verify=True, *, example_inputs=None, return_report=False):
    """Route ``model`` through fusedformer in place and return it (``(model, report)`` with
    ``return_report=True``). ``ops``: any of 'attention', 'norm', 'mlp' (torch.nn encoder/decoder
    layers are swapped whole when all three are asked for). ``backend``: 'reference', 'triton',
    'cuda' or None (the usual selection). ``verify``: run a forward on a small synthetic batch
    before and after (Hugging Face models: inputs from the config; else ``example_inputs``, a
    tuple of args or a dict of kwargs) and probe every swapped torch.nn module on random inputs;
    on a mismatch raise PatchVerificationError and leave the model unpatched. Patching a model
    that is already patched re-patches it with the new arguments."""
    ops = _check_arguments(model, ops, backend, example_inputs)
    if _STATE in model.__dict__:
        unpatch(model)
    is_hf = hf.is_hf_model(model)
    inputs, before = _verification_batch(model, example_inputs, is_hf) if verify else (None, None)

    report, log = PatchReport(backend=backend), UndoLog()
    try:
        _patch_modules(model, ops, backend, verify, report, log, is_hf)
        if is_hf and "attention" in ops:
            reason = hf.switch_attention(model, backend, log)
            report.attention = (f"left as {hf.attention_implementation(model)!r}: {reason}" if reason else
                                f"Hugging Face attention implementation -> '{hf.NAME}'")
        if inputs is not None:
            p = float_param(model)
            diff, tol, ok = compare(before, run(model, inputs), p.dtype if p is not None else torch.float32)
            report.verified = {"max_abs_diff": diff, "tolerance": tol}
            if not ok:
                raise PatchVerificationError(
                    f"patch: the patched model's outputs differ from the original's (max abs diff {diff:.3g} > "
                    f"tolerance {tol:.3g}); the model was left unpatched.\n{report}", report)
    except BaseException:
        log.undo()
        raise
    model.__dict__[_STATE] = log
    model.__dict__[_REPORT] = report
    return (model, report) if return_report else model


def _check_arguments(model, ops, backend, example_inputs):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, got {type(model).__name__}")
    ops = (ops,) if isinstance(ops, str) else tuple(ops)
    if not ops or any(o not in OPS for o in ops):
        raise ValueError(f"patch: ops must be a non-empty subset of {OPS}, got {ops!r}")
    if backend is not None and backend not in backends.BACKENDS + ("auto",):
        choices = ", ".join(repr(b) for b in backends.BACKENDS + ("auto",))
        raise ValueError(f"patch: backend must be one of {choices} or None, got {backend!r}")
    if example_inputs is not None and not isinstance(example_inputs, (tuple, dict, torch.Tensor)):
        raise TypeError("patch: example_inputs must be a tensor, a tuple of args or a dict of kwargs")
    return ops


def _verification_batch(model, example_inputs, is_hf):
    """(inputs, the unpatched model's outputs on them), or (None, None) when there is nothing to
    run: a plain torch model without example_inputs is checked module by module only."""
    if example_inputs is not None:
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
        return inputs, run(model, inputs)
    if not is_hf:
        return None, None
    error = None
    for inputs in synthetic_batches(model):
        try:
            return inputs, run(model, inputs)
        except Exception as e:  # a batch this model's head does not take: try the next layout
            error = error or e
    why = f"it raised {type(error).__name__}: {error}" if error else "its main input is not token ids or pixels"
    raise ValueError(f"patch: verify=True found no synthetic batch that {type(model).__name__} accepts ({why}); "
                     "pass example_inputs= (a tuple of args or a dict of kwargs), or verify=False") from error


def _patch_modules(model, ops, backend, verify, report, log, is_hf):
    names = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
    done = set()
    gen = torch.Generator().manual_seed(0)
    for _, module in model.named_modules():
        if id(module) in done:
            continue
        label = " = ".join(names[id(module)])
        typ = type(module)
        if typ.__module__.startswith("fusedformer."):  # already fusedformer's own module
            continue
        if typ in CLASS_SWAPS:
            why = why_not_swap(module, ops)
            if why is None:
                cls = _swap_checked(module, label, backend, verify, gen, report, log)
                done.update(id(sub) for sub in swapped_submodules(module, cls))
            elif why:
                report.left.append((label, typ.__name__, why))
            continue
        if isinstance(module, (torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer,
                               torch.nn.TransformerDecoderLayer)):
            report.left.append((label, typ.__name__, f"a subclass of torch.nn.{typ.__mro__[1].__name__}: its own "
                                "code may differ, so it is left as is"))
            continue
        if "norm" in ops and try_norm(module, label, backend, report, log):
            done.add(id(module))
            continue
        if "mlp" in ops and try_mlp(module, label, backend, report, log):
            done.add(id(module))
            continue
        if "attention" in ops and not is_hf and "attention" in typ.__name__.lower() and typ.__module__.split(".")[0] \
                not in ("torch", "fusedformer"):
            report.left.append((label, typ.__name__, "unrecognised custom attention module (left as is)"))


def _swap_checked(module, label, backend, verify, gen, report, log):
    """Swap a torch.nn module to its drop-in; with ``verify``, its outputs on random inputs must
    stay what they were."""
    typ = type(module)
    probe = probe_inputs(module, gen) if verify else None
    expected = run_module(module, probe) if verify else None
    cls = swap(module, log, backend)
    if verify:
        diff, tol, ok = compare(expected, run_module(module, probe), dtype_device(module)[0])
        if not ok:
            raise PatchVerificationError(f"patch: {label} ({typ.__name__}) differs after the swap (max abs diff "
                                         f"{diff:.3g} > {tol:.3g}); the model was left unpatched", report)
    report.replaced.append((label, typ.__name__, f"fusedformer.nn.{cls.__name__}"))
    return cls


def unpatch(model):
    """Undo ff.patch exactly: original classes, forwards, attributes and attention
    implementation; no fusedformer attribute left behind. Returns the model; a model never
    patched is returned as is."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"unpatch: model must be a torch.nn.Module, got {type(model).__name__}")
    log = model.__dict__.pop(_STATE, None)
    model.__dict__.pop(_REPORT, None)
    if log is not None:
        log.undo()
    return model


def patch_report(model):
    """The PatchReport of a patched model, or None."""
    return model.__dict__.get(_REPORT)


@contextlib.contextmanager
def patched(model, ops=OPS, backend=None, verify=True, **kwargs):
    """``with ff.patched(model) as m:`` patch on entry, unpatch on exit (also on an exception)."""
    patch(model, ops, backend, verify, **kwargs)
    try:
        yield model
    finally:
        unpatch(model)
