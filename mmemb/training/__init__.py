"""Stage-4 training machinery: distributed helpers, DeepSpeed config, data order, checkpoints.

Kept import-light on purpose (no deepspeed/transformers at package import), so the losses
can use :mod:`mmemb.training.distributed` without pulling the whole training stack.
"""
