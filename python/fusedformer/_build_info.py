"""How the install's CUDA build went, as setup.py recorded it beside ``fusedformer._C``
(``_build.json``): pip -q hides the build's log, so ``fusedformer info`` and the cuda backend's
unavailability reason read it from here."""

import importlib.resources
import json


def build_record():
    """{"cuda_build": "built" | "failed", "mode", "nvcc", "seconds" | "error", ...}, or None when
    no CUDA build ran (FUSEDFORMER_BUILD_CUDA=0, no nvcc, or a source checkout never installed)."""
    try:
        text = importlib.resources.files("fusedformer").joinpath("_build.json").read_text()
        return json.loads(text)
    except (OSError, ValueError):
        return None


def missing_extension_reason():
    """Why ``fusedformer._C`` cannot be imported, in the words of the build record."""
    record = build_record()
    if record and record.get("cuda_build") == "failed":
        return (f"the CUDA build failed at install time ({record.get('error', 'no error recorded')}); "
                "reinstall with FUSEDFORMER_BUILD_CUDA=1 to see the whole error")
    return "fusedformer._C is not built (no nvcc at install time, or FUSEDFORMER_BUILD_CUDA=0)"
