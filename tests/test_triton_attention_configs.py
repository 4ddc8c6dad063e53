"""Every attention tile config autotune may select, compiled and run on a GPU (each one forced in
turn) against the float64 reference: the forward and the backward kernels, at the head dims and
dtypes where the prune rules keep the most and the fewest configs, and the decode path. The CPU
side of the rules: every dtype and head dim keeps at least one config on sm_80 and sm_90."""

import pytest
import torch
from _attention_cases import assert_parity, case

pytest.importorskip("triton")

import triton  # noqa: E402
from fusedformer.kernels import attention as fwd_kernels  # noqa: E402
from fusedformer.kernels import attention_backward as bwd_kernels  # noqa: E402
from fusedformer.kernels import _autotune  # noqa: E402
from fusedformer.kernels import attention_resources as resources  # noqa: E402

HEAD_DIMS = (16, 32, 40, 64, 80, 96, 128, 256)


def _sm90_lists(monkeypatch):
    """The configs autotune chooses from on a GPU (the interpreter has one small config instead)."""
    monkeypatch.setattr(fwd_kernels, "interpreted", lambda: False)
    monkeypatch.setattr(bwd_kernels, "interpreted", lambda: False)
    return fwd_kernels.fwd_configs(), bwd_kernels.bwd_configs()


@pytest.mark.parametrize("smem", [_autotune.SMEM_SM80, _autotune.SMEM_SM90], ids=["sm80", "sm90"])
def test_every_dtype_and_head_dim_keeps_a_config(monkeypatch, smem):
    fwd, bwd = _sm90_lists(monkeypatch)
    for elt, ieee in ((2, False), (4, False), (4, True)):
        for d in HEAD_DIMS:
            bd = max(16, triton.next_power_of_2(d))
            assert any(resources.fits_fwd(c, bd, bd, elt, ieee, smem) for c in fwd), (elt, ieee, d)
            assert any(resources.fits_bwd(c, bd, bd, elt, ieee, smem) for c in bwd), (elt, ieee, d)


def test_forward_large_tile_is_kept_at_d128_without_dropout_only(monkeypatch):
    """128x128 / 8 warps / 2 stages compiles without spills for 16-bit D = 128 on sm_90a, and
    spills once dropout's draws are live (attention_resources.fits_fwd), so the rule keeps it
    for the plain forward only."""
    fwd, _ = _sm90_lists(monkeypatch)
    q = torch.empty(1, dtype=torch.bfloat16)

    def tiles(dropout):
        kept = fwd_kernels.prune_fwd(fwd, {"Q": q, "key_lq": 4096}, BLOCK_D=128, BLOCK_DV=128, IEEE_DOT=False,
                                     DROPOUT=dropout)
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept}

    assert (128, 128, 8, 2) in tiles(False)
    assert (128, 128, 8, 2) not in tiles(True)
    assert (128, 64, 8, 3) in tiles(True)


def _kept(prune, configs, q, D, rows):
    bd = max(16, triton.next_power_of_2(D))
    return prune(configs, {"Q": q, "key_lq": rows}, BLOCK_D=bd, BLOCK_DV=bd, IEEE_DOT=q.dtype == torch.float32)


SHAPES = [(torch.bfloat16, 64), (torch.bfloat16, 128), (torch.bfloat16, 256), (torch.float32, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,D", SHAPES, ids=[f"{str(d)[6:]}-D{D}" for d, D in SHAPES])
def test_every_config_compiles_and_matches_on_gpu(dtype, D, monkeypatch):
    fwd, bwd = _sm90_lists(monkeypatch)
    tuned_fwd = fwd_kernels._tuned_fwd
    q = torch.empty(1, device="cuda", dtype=dtype)
    rows = case(2, 4, 2, 173, 301, D, causal=True, bias="float")
    decode = case(2, 8, 2, 1, 1037, D, bias="float", alibi=True)
    for config in _kept(fwd_kernels.prune_fwd, fwd, q, D, 256):
        monkeypatch.setattr(fwd_kernels, "_tuned_fwd", lambda: (fwd_kernels._attn_fwd_kernel, config))
        assert_parity(rows, dtype)
        if config.kwargs["BLOCK_M"] <= 16:  # the decode path's packed rows (4 here) take these
            assert_parity(decode, dtype)
    monkeypatch.setattr(fwd_kernels, "_tuned_fwd", tuned_fwd)  # the backward's forward: tuned
    for config in _kept(bwd_kernels.prune_bwd, bwd, q, D, 256):
        kernels = {"dkdv": bwd_kernels._attn_bwd_dkdv, "dq": bwd_kernels._attn_bwd_dq}
        monkeypatch.setattr(bwd_kernels, "_tuned", lambda name: (kernels[name], config))
        assert_parity(rows, dtype)
