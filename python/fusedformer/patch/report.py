"""What ff.patch did (PatchReport), and the error it raises when verification fails."""

import dataclasses


class PatchVerificationError(RuntimeError):
    """The patched model's outputs differ from the original's; the model was left unpatched."""

    def __init__(self, message, report):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass
class PatchReport:
    """What ff.patch did. ``replaced``: (module name, original type, replacement); ``left``:
    (module name, type, reason); ``attention``: how attention is routed; ``verified``: max abs
    difference and tolerance of the verification forward, or None when not run."""

    replaced: list = dataclasses.field(default_factory=list)
    left: list = dataclasses.field(default_factory=list)
    attention: str | None = None
    verified: dict | None = None
    backend: str | None = None

    def __str__(self):
        lines = [f"fusedformer patch (backend={self.backend or 'auto'}): {len(self.replaced)} replaced, "
                 f"{len(self.left)} left"]
        if self.attention:
            lines.append(f"  attention: {self.attention}")
        lines += [f"  replaced {name or '<root>'}: {orig} -> {new}" for name, orig, new in self.replaced]
        lines += [f"  left     {name or '<root>'}: {typ} ({why})" for name, typ, why in self.left]
        if self.verified is not None:
            lines.append(f"  verified: max abs diff {self.verified['max_abs_diff']:.3g} "
                         f"(tolerance {self.verified['tolerance']:.3g})")
        return "\n".join(lines)
