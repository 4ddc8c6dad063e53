"""fusedformer: fused Triton and CUDA C++ kernels for the transformer's hot paths, with
pure-PyTorch references as the CPU path and the oracle of every parity test."""

from fusedformer import models, nn
from fusedformer._version import __version__
from fusedformer.backends import BackendUnavailableError, available_backends, use_backend
from fusedformer.explain import Explanation, Selection, explain, which_backend
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
from fusedformer.patch import hf_import_hook as _hf_import_hook

# attn_implementation="fusedformer" in transformers, without importing it (patch/hf_import_hook.py)
_hf_import_hook.install()

__all__ = [
    "BackendUnavailableError",
    "Explanation",
    "PatchReport",
    "PatchVerificationError",
    "Selection",
    "available_backends",
    "explain",
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
    "which_backend",
    "__version__",
]
