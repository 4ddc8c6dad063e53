"""Every op family's backend table: the functions a backend module must define (forward and
backward, written out) and may define (with a fallback), and the module each backend implements
the family in.

An op module imports its family's table (``from fusedformer._backends.tables import SOFTMAX``)
and calls ``SOFTMAX.implementation(backend).softmax_forward(x, dim)``. Inputs reaching a backend
are already validated by ops/ (norms and linear_act see 2-D rows). Each module is checked
against its table when first loaded (fusedformer._backends.contract), and only then: importing
this file imports no backend.
"""

from fusedformer._backends.contract import Family, Function, lean, unsupported

# The reference backend implements every family in one module, the oracle of every test.
REFERENCE = "fusedformer.reference"

# The families every other backend implements, family f of backend b in the module
# fusedformer._backends.<b>.<f> (python/fusedformer/_backends/<b>/<f>.py). A new backend is one
# line here and its name in fusedformer.backends (BACKENDS, and AUTO_ORDER to be picked by ``auto``).
FAMILIES_BY_BACKEND = {
    "torch": ("attention", "varlen_attention", "softmax", "layer_norm", "rms_norm", "linear_act"),
    "triton": ("attention", "varlen_attention", "softmax", "layer_norm", "rms_norm", "linear_act"),
    "cuda": ("attention", "softmax", "layer_norm", "rms_norm", "linear_act"),
}


def _family(name, *functions):
    modules = {"reference": REFERENCE}
    modules.update({backend: f"fusedformer._backends.{backend}.{name}"
                    for backend, families in FAMILIES_BY_BACKEND.items() if name in families})
    return Family(name, functions, modules)


def _infer_from_forward(impl):
    return lambda x, weight, bias, activation: impl.linear_act_forward(x, weight, bias, activation)[0]


def _recompute_from_forward(impl):
    def recompute(grad_y, x, weight, bias, activation):
        y, preact = impl.linear_act_forward(x, weight, bias, activation)
        return (*impl.linear_act_backward(grad_y, x, weight, bias, preact, activation), y)

    return recompute


_ATTENTION_ARGS = "q, k, v, bias, causal, scale, dropout_p, seed, window, alibi_slopes"
ATTENTION = _family(
    "attention", Function("attention_forward", _ATTENTION_ARGS, "(out, lse)"),
    Function("attention_backward", "grad_out, q, k, v, bias, out, lse, causal, scale, dropout_p, seed, window, "
             "alibi_slopes, bias_requires_grad", "(dq, dk, dv, dbias or None)"),
    unsupported(_ATTENTION_ARGS),
    # no mask, dropout, window or ALiBi; q, k, v 4-D, valid and non-empty (ops/attention's _plain_call)
    lean("attention_lean", "q, k, v, causal, scale", "out"))

_VARLEN_ARGS = ("q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, dropout_p, seed, "
                "window, alibi_slopes")
VARLEN_ATTENTION = _family(
    "varlen_attention", Function("varlen_attention_forward", _VARLEN_ARGS, "(out, lse)"),
    Function("varlen_attention_backward", "grad_out, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, "
             "out, lse, causal, scale, dropout_p, seed, window, alibi_slopes", "(dq, dk, dv)"),
    unsupported(_VARLEN_ARGS))

SOFTMAX = _family("softmax", Function("softmax_forward", "x, dim", "y"),
                  Function("softmax_backward", "grad_y, y, dim", "dx"), unsupported("x, dim"),
                  # any tensor and int dim, unchecked by the op (the entry refuses what it cannot answer)
                  lean("softmax_lean", "x, dim", "y"))


def _norm_family(name, weights, stats, grads):
    """LayerNorm and RMSNorm declare one table shape: affine weights, saved statistics, a residual
    stream; they differ in which weights and statistics."""
    args = f"x, {weights}, eps, residual"
    forward = f"{name}_forward"
    return _family(
        name, Function(forward, args, f"(y, residual_out, {stats})"),
        Function(f"{name}_backward", f"grad_y, x, {weights}, {stats}, grad_residual_out", grads),
        unsupported(args),
        # y (and the residual stream) alone, for eager calls that need no gradient: no statistics kept
        Function(f"{name}_inference", args, "(y, residual_out)",
                 fallback=lambda impl: lambda *a: getattr(impl, forward)(*a)[:2]),
        # the public call without residual, unchecked by the op but for eps (a float >= 0)
        lean(f"{name}_lean", f"x, normalized_shape, {weights}, eps", "y"))


LAYER_NORM = _norm_family("layer_norm", "weight, bias", "mean, rstd", "(dx, dweight, dbias)")
RMS_NORM = _norm_family("rms_norm", "weight", "rstd", "(dx, dweight)")

LINEAR_ACT = _family(
    "linear_act", Function("linear_act_forward", "x, weight, bias, activation", "(y, preact)"),
    Function("linear_act_backward", "grad_y, x, weight, bias, preact, activation", "(dx, dweight, dbias)"),
    unsupported("x, weight, bias, activation"),
    # y alone, for calls that need no gradient: a backend may skip writing the preact
    Function("linear_act_inference", "x, weight, bias, activation", "y", fallback=_infer_from_forward),
    # the backward without a saved preact (feed_forward's recompute=True), also returning y = act(h)
    Function("linear_act_recompute", "grad_y, x, weight, bias, activation", "(dx, dweight, dbias, y)",
             fallback=_recompute_from_forward),
    # x (..., K) of any rank, the call valid and non-empty (ops/linear_act's plain_call)
    lean("linear_act_lean", "x, weight, bias, activation", "y"))

FAMILIES = {f.name: f for f in (ATTENTION, SOFTMAX, LAYER_NORM, RMS_NORM, LINEAR_ACT, VARLEN_ATTENTION)}
