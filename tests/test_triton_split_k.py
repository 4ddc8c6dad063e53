"""The Triton GEMM's split-K path (kernels/matmul_act.py MODE 2, decode-size M) against the float64
reference in the interpreter: K slices' fp32 partials written once, summed in a fixed order by
bias_act's epilogue kernels (forward and recompute backward), the same bits on every run."""

import pytest
import torch
import torch.nn.functional as F
from fusedformer import reference
from fusedformer.kernels import matmul_act as mm_kernels
from fusedformer.kernels import matmul_act_configs as mm_configs
from fusedformer.vocabulary import ACTIVATIONS, FUSED_ACTIVATIONS, parity_bound

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def assert_within_parity(x, w, b, dy, activation, outputs):
    """Each of ``outputs`` (name -> tensor among y, preact, dh, db) within the parity rule: at most
    2x PyTorch's own error in the input dtype (plus the dtype's floor) against float64."""
    act = ACTIVATIONS[activation]
    p0 = reference.linear_act_forward(x.double(), w.double(), b.double(), activation)[1]
    p_torch = F.linear(x, w, b)
    dh0, dh_torch = act.backward(dy.double(), p0), act.backward(dy, p_torch)
    oracle = {"y": (act.torch_forward(p0), act.torch_forward(p_torch)), "preact": (p0, p_torch),
              "dh": (dh0, dh_torch), "db": (dh0.sum(0), dh_torch.sum(0))}
    for name, got in outputs.items():
        want, theirs = oracle[name]
        err, torch_err = ((t.double() - want).abs().max().item() for t in (got, theirs))
        bound = parity_bound(torch_err, x.dtype, want.abs().max().item())
        assert err <= bound, f"{name}: err {err:.3e} > {bound:.3e} (torch's own {torch_err:.3e})"


def test_split_k_rule():
    assert mm_configs.split_k(1, 4096, 4096, 132) == 4  # 32 output tiles on 132 SMs
    assert mm_configs.split_k(16, 1024, 4096, 132) == mm_configs.MAX_SPLITS
    assert mm_configs.split_k(16, 1024, 512, 132) == 2  # each slice keeps >= SPLIT_MIN_STEPS K steps
    assert mm_configs.split_k(4096, 4096, 4096, 132) == 1
    assert mm_configs.split_k(16, 11008, 4096, 132) == 1  # 86 tiles: more slices would not fit twice
    assert mm_kernels._auto_splits(torch.empty(7, 72), 82) == 2  # the interpreter's rule: odd-shape tests split


@pytest.mark.parametrize("M", (1, 16))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", FUSED_ACTIVATIONS)
def test_split_k_matches_reference(activation, dtype, M):
    """Forward (y, preact) and recompute backward (dh, db, y) through 3 K slices, on a strided x,
    against the float64 reference of the same rounded inputs; two runs give the same bits."""
    g = torch.Generator().manual_seed(M)
    K, n_out = 75, 21
    N = 2 * n_out if ACTIVATIONS[activation].gated else n_out
    x = torch.randn(M, 2 * K, generator=g).to(dtype)[:, ::2]
    w, b = (torch.randn(N, K, generator=g) / K**0.5).to(dtype), torch.randn(N, generator=g).to(dtype)
    dy = torch.randn(M, n_out, generator=g).to(dtype)
    y, p = mm_kernels.matmul_act_forward(x, w, b, activation, splits=3)
    dh, db, y_re = mm_kernels.matmul_act_dh(dy, x, w, b, activation, store_y=True, splits=3)
    assert_within_parity(x, w, b, dy, activation, {"y": y, "preact": p, "dh": dh, "db": db})
    assert_within_parity(x, w, b, dy, activation, {"y": y_re})
    assert all(t.dtype == dtype for t in (y, p, dh, y_re))
    again = mm_kernels.matmul_act_dh(dy, x, w, b, activation, store_y=True, splits=3)
    assert all(torch.equal(a, c) for a, c in zip((dh, db, y_re), again))


@pytest.mark.parametrize("activation", ("gelu", "swiglu"))
def test_split_k_through_tma(activation):
    """The TMA path's slices all take the same number of K steps (what lets the compiler flatten
    the persistent walk): the last slice's steps past K read zeros from the descriptor's edge."""
    g = torch.Generator().manual_seed(3)
    M, K, n_out = 5, 40, 24  # 3 K steps of 16 in 2 slices: the second slice's last step is past K
    N = 2 * n_out if ACTIVATIONS[activation].gated else n_out
    x = torch.randn(M, K, generator=g).to(torch.bfloat16)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(torch.bfloat16)
    b, dy = torch.randn(N, generator=g).to(torch.bfloat16), torch.randn(M, n_out, generator=g).to(torch.bfloat16)
    assert mm_kernels.tma_eligible(x, w)
    y, p = mm_kernels.matmul_act_forward(x, w, b, activation, use_tma=True, splits=2)
    dh, db, _ = mm_kernels.matmul_act_dh(dy, x, w, b, activation, use_tma=True, splits=2)
    assert_within_parity(x, w, b, dy, activation, {"y": y, "preact": p, "dh": dh, "db": db})
