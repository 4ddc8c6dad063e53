"""LayerNorm over the last dim of x (M, N) with weight and bias (N,). Memory-bound: bytes moved,
element size e: fwd reads x and writes y (2 M N e, + 2 N e for weight/bias); bwd reads x, dy and
writes dx (3 M N e, + 4 N e for weight/bias and their grads; the per-row mean/rstd are fp32 and
small: 8 M bytes each way); fwd+bwd the sum."""

import torch.nn.functional as F

import fusedformer as ff
from fusedformer.bench.cases import _rowwise
from fusedformer.bench.providers import liger_function

SHAPES = _rowwise.NORM_SHAPES
PRESET_PROVIDERS = _rowwise.PRESET_PROVIDERS
EPS = 1e-5


def work(shape, pass_, dtype):
    return None, _rowwise.norm_bytes(shape, pass_, dtype, params=2, row_stats=2)


def make(shape, dtype, device):
    return _rowwise.norm_inputs(shape, dtype, device, bias=True)


def eager(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, EPS)


def providers(device, shape):
    out = _rowwise.providers(lambda x, w, b, backend: ff.layer_norm(x, (x.shape[-1],), w, b, EPS, backend=backend),
                             eager, device)
    liger = liger_function("layer_norm", "LigerLayerNormFunction", device)
    out["liger"] = liger if isinstance(liger, str) else (lambda x, w, b: liger(x, w, b, EPS))
    return out
