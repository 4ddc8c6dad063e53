"""Triton attention dropout: the reference's Philox stream bit for bit, the keep rate, and the
seed's life as a device tensor (what makes dropout safe inside a captured CUDA graph): drawn by
torch's generator per call, read by the kernels at launch, and reused by the backward.
Shape legend: B batch, H heads, Lq/Lk lengths, D head dim."""

import fusedformer as ff
import pytest
import torch
from _attention_cases import DEV, assert_parity, case, randn
from fusedformer import reference, vocabulary

pytest.importorskip("triton")

from fusedformer._backends.triton import attention as tri  # noqa: E402
from fusedformer.kernels import attention as fwd_kernels  # noqa: E402


def test_dropout_matches_reference_with_same_seed():
    rows = assert_parity(case(1, 2, 1, 19, 26, 32, dropout_p=0.3, causal=True), torch.float32)
    assert {r["output"] for r in rows} == {"out", "d0", "d1", "d2"}
    # the reference with the same seed is matched exactly up to fp32 rounding: a wrong mask would not
    assert max(r["err"] for r in rows) < 1e-4


def _uniform_rows(gen, B=1, H=2, Lq=32, Lk=64, D=16):
    """q, k and v = identity: with scale 0 every row is uniform, so out is the dropout mask / Lk."""
    q, k = randn(gen, B, H, Lq, D).float(), randn(gen, B, H, Lk, D).float()
    return q, k, torch.eye(Lk, dtype=torch.float32, device=DEV).expand(B, H, Lk, Lk)


def test_dropout_keep_rate_and_reproducibility():
    gen = torch.Generator().manual_seed(3)
    q, k, v = _uniform_rows(gen)
    B, H, Lq, Lk, p = 1, 2, 32, 64, 0.25
    seed = 123456789012
    out, _ = tri.attention_forward(q, k, v, None, False, 0.0, p, seed)
    kept = out != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.03
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (Lk * (1 - p))))
    keep = vocabulary.attention_dropout_keep(seed, B, H, Lq, Lk, p, DEV)
    assert torch.equal(kept, keep)
    again, _ = tri.attention_forward(q, k, v, None, False, 0.0, p, seed)
    assert torch.equal(out, again)


def test_seed_tensor_is_read_by_the_kernel_at_launch():
    """A recorded launch (a graph's view of it: the arguments fixed once) reads the seed tensor's
    value when it runs: redrawing the seed in place, as torch's generator does before each replay,
    changes the mask. A seed passed as a host integer would replay one mask forever."""
    gen = torch.Generator().manual_seed(8)
    q, k, v = _uniform_rows(gen)
    seed = torch.tensor(987654321, dtype=torch.int64, device=DEV)
    out, _, launches = tri._plan_forward(q, k, v, None, False, 0.0, 0.5, seed, (-1, -1), None, None, None)
    masks = []
    for _ in range(2):
        seed += 1  # in place, after the launch arguments were made
        fwd_kernels.run(launches)
        masks.append(out != 0)
        assert torch.equal(masks[-1], vocabulary.attention_dropout_keep(int(seed), *out.shape[:3], 64, 0.5, DEV))
    assert not torch.equal(*masks)


def test_each_call_draws_a_fresh_seed_and_manual_seed_replays_it():
    gen = torch.Generator().manual_seed(9)
    q, k, v = _uniform_rows(gen)
    torch.manual_seed(5)
    first = ff.scaled_dot_product_attention(q, k, v, dropout_p=0.5, scale=0.0, backend="triton")
    second = ff.scaled_dot_product_attention(q, k, v, dropout_p=0.5, scale=0.0, backend="triton")
    assert not torch.equal(first != 0, second != 0)
    torch.manual_seed(5)
    assert torch.equal(first, ff.scaled_dot_product_attention(q, k, v, dropout_p=0.5, scale=0.0, backend="triton"))


def test_backward_uses_the_forward_seed():
    """Random draws between the forward and the backward do not change the backward's mask."""
    gen = torch.Generator().manual_seed(10)
    q, k, v = (randn(gen, 1, 2, L, 16).float().requires_grad_() for L in (11, 13, 13))
    do = randn(gen, 1, 2, 11, 16).float()
    torch.manual_seed(6)
    out = ff.scaled_dot_product_attention(q, k, v, dropout_p=0.4, backend="triton")
    torch.rand(100, device=DEV)  # moves the generator on
    got = torch.autograd.grad(out, (q, k, v), do)
    torch.manual_seed(6)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64, device=DEV))  # what the op drew
    ref = [t.detach().double() for t in (q, k, v)]
    out_ref, lse = reference.attention_forward(*ref, None, False, 0.25, 0.4, seed)
    want = reference.attention_backward(do.double(), *ref, None, out_ref, lse, False, 0.25, 0.4, seed)[:3]
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_dropout_inside_a_captured_cuda_graph_draws_a_new_mask_per_replay():
    gen = torch.Generator().manual_seed(11)
    q, k, v = _uniform_rows(gen, B=2, H=4, Lq=128, Lk=256, D=64)
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture: compile and tune first
        for _ in range(2):
            ff.scaled_dot_product_attention(q, k, v, dropout_p=0.5, scale=0.0, backend="triton")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ff.scaled_dot_product_attention(q, k, v, dropout_p=0.5, scale=0.0, backend="triton")
    masks = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        masks.append(out != 0)
        assert abs(masks[-1].float().mean().item() - 0.5) < 0.02
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
