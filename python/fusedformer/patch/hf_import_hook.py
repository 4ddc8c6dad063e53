"""``attn_implementation="fusedformer"`` works in transformers as soon as fusedformer is imported,
whichever of the two is imported first, without fusedformer importing transformers.

transformers keeps its attention functions in ``transformers.modeling_utils`` (AttentionInterface);
every model, ``from_pretrained`` and ``set_attn_implementation`` look names up there. If that
module is already loaded, ``install()`` registers now (``hf.register()``); otherwise it leaves a
finder on ``sys.meta_path`` that registers right after the module has executed, then removes
itself. Nothing happens when transformers is never imported (or not installed).
"""

import importlib.abc
import logging
import sys

TRIGGER = "transformers.modeling_utils"
log = logging.getLogger("fusedformer")


def _register():
    from fusedformer.patch import hf

    try:
        reason = hf.register()
    except Exception as exc:  # a transformers we cannot register with must not break its import
        reason = f"{exc.__class__.__name__}: {exc}"
    if reason is not None:
        log.info("attn_implementation='fusedformer' is not registered with transformers: %s", reason)


class _LoaderThatRegisters:
    """The module's own loader, and after it has executed the module, the registration."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register()

    def __getattr__(self, name):  # get_source, is_package, ...: the real loader's
        return getattr(self._loader, name)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TRIGGER:
            return None
        sys.meta_path.remove(self)  # once: the finders below find the real module
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _LoaderThatRegisters(spec.loader)
                return spec
        return None


def install():
    """Register now if transformers' modeling_utils is loaded, else when it loads. Idempotent."""
    if TRIGGER in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
