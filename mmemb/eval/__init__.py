"""Evaluation: the MMEB-V2 task registry, ranking metrics and report writers."""
