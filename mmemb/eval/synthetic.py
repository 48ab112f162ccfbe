"""The synthetic benchmark as an eval suite of its own ('synthetic').

Registered beside MMEB-V2 so the demo's numbers come from the same harness, metrics and
report that would score MMEB-V2; it is a separate suite so its tasks can never be averaged
into an MMEB overall (``aggregate`` refuses mixed suites). Every synthetic task is an image
task ranked over its own candidate list with hit@1, like MMEB-V2's image tasks; the
categories mirror MMEB's (CLS, QA, RET, GD) so per-category tables line up.
"""

from __future__ import annotations

from mmemb.data.synth import TASKS
from mmemb.eval.tasks import TaskSpec, register_suite, suites

SUITE = "synthetic"


def specs() -> list[TaskSpec]:
    return [TaskSpec(name, "image", category, "hit@1", "local", suite=SUITE)
            for name, (_family, category) in TASKS.items()]


def register() -> None:
    """Idempotent: importing this module twice (or from two places) must not fail."""
    if SUITE not in suites():
        register_suite(SUITE, specs())


register()
