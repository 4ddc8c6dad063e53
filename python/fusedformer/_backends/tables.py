"""Every op family's backend table: the functions a backend module must define (forward and
backward, written out), the ones it may define, and the module each backend implements it in.

An op module imports its family's table (``from fusedformer._backends.tables import SOFTMAX``)
and calls ``SOFTMAX.implementation(backend).softmax_forward(x, dim)``. Inputs reaching a backend
are already validated by ops/ (norms and linear_act see 2-D rows). Each module is checked
against its table when first loaded (fusedformer._backends.contract), and only then: importing
this file imports no backend.

Adding a backend: one line per family it implements, in that family's ``modules``, and its name
in fusedformer.backends (BACKENDS, and AUTO_ORDER if ``auto`` should pick it).
"""

from fusedformer._backends.contract import Family, Function, unsupported


def _infer_from_forward(impl):
    return lambda x, weight, bias, activation: impl.linear_act_forward(x, weight, bias, activation)[0]


def _recompute_from_forward(impl):
    def recompute(grad_y, x, weight, bias, activation):
        y, preact = impl.linear_act_forward(x, weight, bias, activation)
        return (*impl.linear_act_backward(grad_y, x, weight, bias, preact, activation), y)

    return recompute


_ATTENTION_ARGS = "q, k, v, bias, causal, scale, dropout_p, seed, window, alibi_slopes"
ATTENTION = Family(
    "attention",
    required=(
        Function("attention_forward", _ATTENTION_ARGS, "(out, lse)"),
        Function("attention_backward", "grad_out, q, k, v, bias, out, lse, causal, scale, dropout_p, seed, window, "
                 "alibi_slopes, bias_requires_grad", "(dq, dk, dv, dbias or None)"),
    ),
    optional=(unsupported(_ATTENTION_ARGS),),
    modules={
        "reference": "fusedformer.reference",
        "triton": "fusedformer._backends.triton.attention",
        "cuda": "fusedformer._backends.cuda.attention",
    },
)

_VARLEN_ARGS = ("q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, dropout_p, seed, "
                "window, alibi_slopes")
VARLEN_ATTENTION = Family(
    "varlen_attention",
    required=(
        Function("varlen_attention_forward", _VARLEN_ARGS, "(out, lse)"),
        Function("varlen_attention_backward", "grad_out, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, "
                 "max_seqlen_k, out, lse, causal, scale, dropout_p, seed, window, alibi_slopes", "(dq, dk, dv)"),
    ),
    optional=(unsupported(_VARLEN_ARGS),),
    modules={
        "reference": "fusedformer.reference",
        "triton": "fusedformer._backends.triton.varlen_attention",
    },
)

SOFTMAX = Family(
    "softmax",
    required=(
        Function("softmax_forward", "x, dim", "y"),
        Function("softmax_backward", "grad_y, y, dim", "dx"),
    ),
    optional=(unsupported("x, dim"),),
    modules={
        "reference": "fusedformer.reference",
        "triton": "fusedformer._backends.triton.softmax",
        "cuda": "fusedformer._backends.cuda.softmax",
    },
)

LAYER_NORM = Family(
    "layer_norm",
    required=(
        Function("layer_norm_forward", "x, weight, bias, eps, residual", "(y, residual_out, mean, rstd)"),
        Function("layer_norm_backward", "grad_y, x, weight, bias, mean, rstd, grad_residual_out",
                 "(dx, dweight, dbias)"),
    ),
    optional=(unsupported("x, weight, bias, eps, residual"),),
    modules={
        "reference": "fusedformer.reference",
        "triton": "fusedformer._backends.triton.layer_norm",
        "cuda": "fusedformer._backends.cuda.layer_norm",
    },
)

RMS_NORM = Family(
    "rms_norm",
    required=(
        Function("rms_norm_forward", "x, weight, eps, residual", "(y, residual_out, rstd)"),
        Function("rms_norm_backward", "grad_y, x, weight, rstd, grad_residual_out", "(dx, dweight)"),
    ),
    optional=(unsupported("x, weight, eps, residual"),),
    modules={
        "reference": "fusedformer.reference",
        "triton": "fusedformer._backends.triton.rms_norm",
        "cuda": "fusedformer._backends.cuda.rms_norm",
    },
)

LINEAR_ACT = Family(
    "linear_act",
    required=(
        Function("linear_act_forward", "x, weight, bias, activation", "(y, preact)"),
        Function("linear_act_backward", "grad_y, x, weight, bias, preact, activation", "(dx, dweight, dbias)"),
    ),
    optional=(
        unsupported("x, weight, bias, activation"),
        # y alone, for calls that need no gradient: a backend may skip writing the preact
        Function("linear_act_inference", "x, weight, bias, activation", "y", fallback=_infer_from_forward),
        # the backward without a saved preact (feed_forward's recompute=True), also returning y = act(h)
        Function("linear_act_recompute", "grad_y, x, weight, bias, activation", "(dx, dweight, dbias, y)",
                 fallback=_recompute_from_forward),
    ),
    modules={
        "reference": "fusedformer.reference",
        "triton": "fusedformer._backends.triton.linear_act",
        "cuda": "fusedformer._backends.cuda.linear_act",
    },
)

FAMILIES = {f.name: f for f in (ATTENTION, SOFTMAX, LAYER_NORM, RMS_NORM, LINEAR_ACT, VARLEN_ATTENTION)}
