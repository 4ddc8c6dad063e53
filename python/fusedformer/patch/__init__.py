"""ff.patch / ff.unpatch / ff.patched: route an existing torch.nn or Hugging Face model through
fusedformer in place, and undo it exactly.

Nothing is rebuilt: every parameter stays the same tensor (optimizers, tied weights and
state_dict keys stay valid) and hooks on the patched modules keep firing. The package, in the
order a model is patched:

- ``driver``: the public functions; walks the model and applies the rules below;
- ``swap``: exact torch.nn types (LayerNorm, RMSNorm, MultiheadAttention, the Transformer layers
  and stacks) get their ``__class__`` swapped to the fusedformer.nn drop-in subclass;
- ``norm``, ``mlp``: any other module matched by rule (norms with ``weight`` and an epsilon; MLPs
  with gate/up/down or fc1/fc2-style projections and an activation) gets an instance ``forward``
  on fusedformer ops, kept only if a probe input gives the same output as its own forward;
- ``hf``: Hugging Face attention goes through the registered ``fusedformer`` attention function;
  ``hf_inputs`` builds the synthetic batch that verifies a Hugging Face model;
- ``verify``: probes and tolerances; ``undo``: the log of every change, so that ``unpatch``
  restores the model exactly; ``report``: PatchReport and PatchVerificationError.
"""

from fusedformer.patch.driver import OPS, patch, patch_report, patched, unpatch
from fusedformer.patch.report import PatchReport, PatchVerificationError

__all__ = ["OPS", "PatchReport", "PatchVerificationError", "patch", "patch_report", "patched", "unpatch"]
