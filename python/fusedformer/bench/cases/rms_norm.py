"""RMSNorm over the last dim of x (M, N) with weight (N,). Memory-bound: bytes moved, element
size e: fwd reads x and writes y (2 M N e, + N e weight); bwd reads x, dy and writes dx
(3 M N e, + 2 N e weight and its grad, + 4 M for the fp32 rstd); fwd+bwd the sum."""

import torch.nn.functional as F

import fusedformer as ff
from fusedformer.bench.cases import _rowwise
from fusedformer.bench.providers import liger_function

SHAPES = _rowwise.NORM_SHAPES
PRESET_PROVIDERS = _rowwise.PRESET_PROVIDERS
EPS = 1e-6


def work(shape, pass_, dtype):
    return None, _rowwise.norm_bytes(shape, pass_, dtype, params=1, row_stats=1)


def make(shape, dtype, device):
    return _rowwise.norm_inputs(shape, dtype, device, bias=False)


def eager(x, w):
    return F.rms_norm(x, (x.shape[-1],), w, EPS)


def providers(device, shape):
    out = _rowwise.providers(lambda x, w, backend: ff.rms_norm(x, (x.shape[-1],), w, EPS, backend=backend), eager,
                             device)
    liger = liger_function("rms_norm", "LigerRMSNormFunction", device)
    # in_place=False: Liger's default overwrites dy in the backward, which a timing loop reuses
    out["liger"] = liger if isinstance(liger, str) else (lambda x, w: liger(x, w, EPS, 0.0, "llama", False))
    return out
