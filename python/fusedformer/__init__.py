"""fusedformer: fused Triton and CUDA C++ kernels for the transformer's hot paths, with
pure-PyTorch references as the CPU path and the oracle of every parity test."""

__version__ = "0.1.0"

from fusedformer import models, nn
from fusedformer.backends import BackendUnavailableError, available_backends, use_backend
from fusedformer.ops import (
    feed_forward,
    layer_norm,
    linear_act,
    rms_norm,
    scaled_dot_product_attention,
    softmax,
    varlen_attention,
)
from fusedformer.patch import (
    PatchReport,
    PatchVerificationError,
    patch,
    patch_report,
    patched,
    unpatch,
)

__all__ = [
    "BackendUnavailableError",
    "PatchReport",
    "PatchVerificationError",
    "available_backends",
    "feed_forward",
    "layer_norm",
    "linear_act",
    "models",
    "nn",
    "patch",
    "patch_report",
    "patched",
    "rms_norm",
    "scaled_dot_product_attention",
    "softmax",
    "unpatch",
    "use_backend",
    "varlen_attention",
]
