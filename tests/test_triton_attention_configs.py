"""Every attention tile config autotune may select, compiled and run on a GPU (each one forced in
turn) against the float64 reference: the forward and the backward kernels, at the head dims and
dtypes where the prune rules keep the most and the fewest configs, and the decode path. The CPU
side of the rules: every dtype and head dim keeps at least one config on sm_80 and sm_90."""

import pytest
import torch
from _attention_cases import assert_parity, case

pytest.importorskip("triton")

import triton  # noqa: E402
from fusedformer.kernels import _autotune  # noqa: E402
from fusedformer.kernels import attention as fwd_kernels  # noqa: E402
from fusedformer.kernels import attention_backward as bwd_kernels  # noqa: E402
from fusedformer.kernels import attention_common as common  # noqa: E402
from fusedformer.kernels import attention_resources as resources  # noqa: E402

HEAD_DIMS = (16, 32, 40, 64, 80, 96, 128, 256)


def _sm90_lists(monkeypatch):
    """The configs autotune chooses from on a GPU (the interpreter has one small config instead):
    forward, dK/dV, dQ."""
    monkeypatch.setattr(fwd_kernels, "interpreted", lambda: False)
    monkeypatch.setattr(bwd_kernels, "interpreted", lambda: False)
    return fwd_kernels.fwd_configs(), bwd_kernels.dkdv_configs(), bwd_kernels.dq_configs()


@pytest.mark.parametrize("smem", [_autotune.SMEM_SM80, _autotune.SMEM_SM90], ids=["sm80", "sm90"])
def test_every_dtype_and_head_dim_keeps_a_config(monkeypatch, smem):
    fwd, dkdv, dq = _sm90_lists(monkeypatch)
    for elt, ieee in ((2, False), (4, False), (4, True)):
        for d in HEAD_DIMS:
            bd = max(16, triton.next_power_of_2(d))
            for dropout in (False, True):
                for tma in (False, True) if elt == 2 and smem == _autotune.SMEM_SM90 else (False,):
                    where = (elt, ieee, d, dropout, tma)
                    assert any(resources.fits_fwd(c, bd, bd, elt, ieee, smem, dropout, tma) for c in fwd), where
                    fits = resources.fits_bwd
                    assert any(fits("dkdv", c, bd, bd, elt, ieee, smem, dropout, tma) for c in dkdv), where
                    assert any(fits("dq", c, bd, bd, elt, ieee, smem, dropout) for c in dq), where


def _tiles(configs):
    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs}


def test_forward_large_tile_is_kept_at_d128_without_dropout_only(monkeypatch):
    """128x128 / 8 warps compiles without spills for 16-bit D = 128 on sm_90a, and spills once
    dropout's draws are live (attention_resources.fits_fwd), so the rule keeps it for the plain
    forward only: 2 stages with pointer loads, 3 with K/V through TMA (whose 2-stage wgmma tiles
    crashed triton 3.6's ptxas)."""
    fwd, _, _ = _sm90_lists(monkeypatch)
    q = torch.empty(1, dtype=torch.bfloat16)

    def tiles(dropout, tma):
        return _tiles(fwd_kernels.prune_fwd(fwd, {"Q": q, "key_lq": 4096}, BLOCK_D=128, BLOCK_DV=128, IEEE_DOT=False,
                                            DROPOUT=dropout, USE_TMA=tma))

    assert (128, 128, 8, 2) in tiles(False, False) and (128, 128, 8, 3) in tiles(False, True)
    assert not {(128, 128, 8, 2), (128, 128, 8, 3)} & (tiles(True, False) | tiles(True, True))
    assert not {t for t in tiles(False, True) if t[3] == 2 and t[0] >= 64}
    assert (128, 64, 8, 3) in tiles(True, False) & tiles(True, True)


def test_backward_keeps_a_64x128_dkdv_tile_at_d128_through_tma(monkeypatch):
    """The two-pass 64x128 / 8-warp dK/dV tile (wgmma, no spill on sm_90a) is what the sm_90 path
    can pick at D = 128; with pointer loads (sm_80) only the 32-row tiles fit."""
    _, dkdv, _ = _sm90_lists(monkeypatch)
    q = torch.empty(1, dtype=torch.bfloat16)

    def kept(tma, dropout=False):
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["SPLIT_DKDV"]) for c in bwd_kernels.prune_bwd(
            dkdv, {"Q": q}, BLOCK_D=128, BLOCK_DV=128, IEEE_DOT=False, DROPOUT=dropout, USE_TMA=tma)}

    assert (64, 128, True) in kept(True)
    assert all(m <= 32 for m, _, _ in kept(False) | kept(True, dropout=True))


def _kept(prune, configs, q, D, rows):
    bd = max(16, triton.next_power_of_2(D))
    return prune(configs, {"Q": q, "key_lq": rows}, BLOCK_D=bd, BLOCK_DV=bd, IEEE_DOT=q.dtype == torch.float32,
                 DROPOUT=False, USE_TMA=common.use_tma(q.device, False, q))


SHAPES = [(torch.bfloat16, 64), (torch.bfloat16, 128), (torch.bfloat16, 256), (torch.float32, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,D", SHAPES, ids=[f"{str(d)[6:]}-D{D}" for d, D in SHAPES])
def test_every_config_compiles_and_matches_on_gpu(dtype, D, monkeypatch):
    fwd, dkdv, dq = _sm90_lists(monkeypatch)
    tuned_fwd = fwd_kernels._tuned_fwd
    q = torch.empty(1, 1, 1, D, device="cuda", dtype=dtype)
    rows = case(2, 4, 2, 173, 301, D, causal=True, bias="float")
    decode = case(2, 8, 2, 1, 1037, D, bias="float", alibi=True)
    for config in _kept(fwd_kernels.prune_fwd, fwd, q, D, 256):
        monkeypatch.setattr(fwd_kernels, "_tuned_fwd", lambda: (fwd_kernels._attn_fwd_kernel, config))
        assert_parity(rows, dtype)
        if config.kwargs["BLOCK_M"] <= 16:  # the decode path's packed rows (4 here) take these
            assert_parity(decode, dtype)
    monkeypatch.setattr(fwd_kernels, "_tuned_fwd", tuned_fwd)  # the backward's forward: tuned
    tuned = bwd_kernels._tuned
    for name, kernel, configs in (("dkdv", bwd_kernels._attn_bwd_dkdv, dkdv), ("dq", bwd_kernels._attn_bwd_dq, dq)):
        for config in _kept(bwd_kernels.prune_bwd, configs, q, D, 256):
            monkeypatch.setattr(bwd_kernels, "_tuned", lambda n: (kernel, config) if n == name else tuned(n))
            assert_parity(rows, dtype)
