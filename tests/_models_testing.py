"""What the fusedformer.models tests share: tolerances against Hugging Face, a float model in eval
mode, gradient comparison and random token ids."""

import torch

TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
DTYPES = [torch.float64, torch.float32]


def close(a, b, dtype):
    torch.testing.assert_close(a, b, atol=TOL[dtype], rtol=TOL[dtype])


def hf_eval(model, dtype):
    torch.manual_seed(0)
    return model.to(dtype).eval()


def grad_check(ours_out, hf_out, pairs, dtype):
    """Backprop the same random cotangent through both; compare the listed parameter gradients."""
    g = torch.randn_like(ours_out)
    (ours_out * g).sum().backward()
    (hf_out * g).sum().backward()
    for ours, theirs, transform in pairs:
        assert ours.grad is not None and theirs.grad is not None
        close(ours.grad, transform(theirs.grad), dtype)


def random_ids(B, L, vocab, seed=1):
    return torch.randint(0, vocab, (B, L), generator=torch.Generator().manual_seed(seed))
