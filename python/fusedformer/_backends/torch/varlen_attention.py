"""torch varlen attention: each packed sequence through this backend's attention (torch's CPU flash
kernel) on its own, as a (1, H, L, D) view of the packed rows; same contract as reference.py."""

from fusedformer._backends.torch import attention
from fusedformer.vocabulary import compute_dtype, varlen_slopes, varlen_spans


def unsupported(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, dropout_p=0.0,
                seed=None, window=(-1, -1), alibi_slopes=None):
    return attention.unsupported(q, k, v, None, causal, scale, dropout_p)


def _sequence(t, start, end):
    """Rows start:end of a packed (T, H, D) tensor as a (1, H, L, D) view."""
    return t[start:end].transpose(0, 1)[None]


def _sequences(cu_seqlens_q, cu_seqlens_k):
    """(b, q rows, k rows) of every sequence with queries and keys: the others attend nothing."""
    for b, (qs, qe, ks, ke) in enumerate(varlen_spans(cu_seqlens_q, cu_seqlens_k)):
        if qe > qs and ke > ks:
            yield b, (qs, qe), (ks, ke)


def varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                             dropout_p=0.0, seed=None, window=(-1, -1), alibi_slopes=None):
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    lse = q.new_full((q.shape[1], q.shape[0]), float("-inf"), dtype=compute_dtype(q))
    for b, rows, keys in _sequences(cu_seqlens_q, cu_seqlens_k):
        o, l = attention.attention_forward(_sequence(q, *rows), _sequence(k, *keys), _sequence(v, *keys), None,
                                           causal, scale, dropout_p, None, window, varlen_slopes(alibi_slopes, b))
        _sequence(out, *rows).copy_(o)
        lse[:, rows[0]:rows[1]] = l[0]
    return out, lse


def varlen_attention_backward(grad_out, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, out,
                              lse, causal, scale, dropout_p=0.0, seed=None, window=(-1, -1), alibi_slopes=None):
    grads = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    for b, rows, keys in _sequences(cu_seqlens_q, cu_seqlens_k):
        dq, dk, dv, _ = attention.attention_backward(
            _sequence(grad_out, *rows), _sequence(q, *rows), _sequence(k, *keys), _sequence(v, *keys), None,
            _sequence(out, *rows), lse[None, :, rows[0]:rows[1]], causal, scale, dropout_p, None, window,
            varlen_slopes(alibi_slopes, b))
        for grad, part, span in zip(grads, (dq, dk, dv), (rows, keys, keys)):
            _sequence(grad, *span).copy_(part)
    return grads
