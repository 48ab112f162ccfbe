"""mmemb: MMEmb-R1, a multimodal embedding model that reasons only when reasoning helps.

The library holds all logic; it never imports Prefect or MLflow (those live in ``flows/``
and ``tasks/``).
"""

from mmemb._compat import patch_torchvision_for_cpu_torch

patch_torchvision_for_cpu_torch()

__version__ = "0.1.0"
