"""mmemb: MMEmb-R1, a multimodal embedding model that reasons only when reasoning helps.

The library holds all logic; it never imports Prefect or MLflow (those live in ``flows/``
and ``tasks/``). Importing it is light: no torch until something needs it (the CPU
torchvision shim of :mod:`mmemb._compat` waits for the first ``import torchvision``).
"""

from mmemb._compat import install_hook

install_hook()

__version__ = "0.1.0"
