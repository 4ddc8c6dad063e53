"""fusedformer: fused Triton and CUDA C++ kernels for the transformer's hot paths, with
pure-PyTorch references as the CPU path and the oracle of every parity test."""

from fusedformer.backends import BackendUnavailableError, available_backends, use_backend
from fusedformer.ops import (
    feed_forward,
    layer_norm,
    linear_act,
    rms_norm,
    scaled_dot_product_attention,
    softmax,
)
from fusedformer.ops.varlen_attention import varlen_attention  # noqa: F401  (public: ff.varlen_attention)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "feed_forward",
    "layer_norm",
    "linear_act",
    "rms_norm",
    "scaled_dot_product_attention",
    "softmax",
    "use_backend",
]

from fusedformer import models, nn  # noqa: E402, F401  (subpackages: ff.nn.*, ff.models.*)
from fusedformer.patch import PatchReport, PatchVerificationError, patch, patch_report, patched, unpatch  # noqa: E402, F401
