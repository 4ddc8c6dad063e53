"""What the fusedformer.nn tests share: comparing a module with its torch.nn twin (weights loaded
both ways, outputs and gradients close) and torch-convention masks."""

import torch

# float64 parity: both sides compute the same math in a different order
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def twin(ours, theirs):
    """Load ours' weights into theirs and back: both directions strict, keys identical."""
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def close(a, b, dtype=torch.float64):
    tol = TOL[dtype]
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def compare(ours, theirs, inputs, dtype=torch.float64, modules=None):
    """Same output and the same gradients for every parameter (of ``modules``, default ours and
    theirs) and every floating input."""
    inputs_a = [t.clone().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t for t in inputs]
    inputs_b = [t.clone().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t for t in inputs]
    ya, yb = ours(*inputs_a), theirs(*inputs_b)
    close(ya, yb, dtype)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    mod_a, mod_b = modules or (ours, theirs)
    for (name, pa), (_, pb) in zip(mod_a.named_parameters(), mod_b.named_parameters()):
        assert (pa.grad is None) == (pb.grad is None), name
        if pa.grad is not None:
            close(pa.grad, pb.grad, dtype)
    for a, b in zip(inputs_a, inputs_b):
        if isinstance(a, torch.Tensor) and a.is_floating_point() and b.grad is not None:
            close(a.grad, b.grad, dtype)
    return ya


def key_padding_mask(N, S, kind):
    keep = torch.ones(N, S, dtype=torch.bool)
    keep[-1, S // 2:] = False  # pad the last sequence
    pad = ~keep
    return pad if kind == "bool" else torch.zeros(N, S, dtype=torch.float64).masked_fill(pad, float("-inf"))


def random_attn_mask(L, S, kind, N=None, H=None):
    torch.manual_seed(2)
    shape = (L, S) if N is None else (N * H, L, S)
    forbid = torch.rand(shape) < 0.3
    forbid[..., 0] = False  # every query keeps a key: torch gives NaN for empty rows
    if kind == "bool":
        return forbid
    return torch.randn(shape, dtype=torch.float64).masked_fill(forbid, float("-inf"))
