"""Entry point of a launched stage process (see :mod:`tasks.launch`).

Every rank calls the stage's ``run``; rank 0 logs step metrics live to the MLflow run named
by ``MMEMB_MLFLOW_RUN_ID`` and writes the result JSON. On failure it writes
``<result>.error`` with the exception type, message and whether a retry could help, so the
launching task applies the same retry policy as for an in-process stage.

    python -m tasks.worker --stage train --config runs/demo/train/_launch_config.yaml \\
        --result runs/demo/train/_launch_result.json
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

# Engines (vLLM) spawn processes that re-import this __main__ module: importing mmemb here
# applies its CPU torchvision shim (mmemb/_compat.py) in them before vLLM imports
# transformers' image utilities.
import mmemb  # noqa: E402, F401


def main(argv: list[str] | None = None) -> int:
    """One launched rank: run the stage in this process from its resolved config, stream
    step metrics to the MLflow run the environment names, and have rank 0 write the
    result (or the error) JSON the launching task reads back."""
    ap = argparse.ArgumentParser(description="Run one stage in this process (a launched rank).")
    ap.add_argument("--stage", required=True)
    ap.add_argument("--config", required=True, help="the stage's resolved config (YAML)")
    ap.add_argument("--result", required=True, help="where rank 0 writes the result JSON")
    a = ap.parse_args(argv)

    from data_contracts.files import atomic_write_json
    from mmemb.configs.pipeline import load_stage_config
    from mmemb.stages.base import run_stage
    from tasks.cache import result_to_state
    from tasks.launch import is_transient
    from tasks.tracking import ENV_RUN, Tracker, is_rank0

    rank0 = is_rank0()
    try:
        cfg = load_stage_config(a.stage, a.config)
        log = None
        steps = [0]
        run_id = os.environ.get(ENV_RUN)
        if rank0 and run_id and os.environ.get("MLFLOW_TRACKING_URI"):
            tr = Tracker(os.environ["MLFLOW_TRACKING_URI"], "", Path(a.result).parent.parent,
                         quiet=False)
            live = tr.step_logger(run_id)

            def log(step, metrics):
                live(step, metrics)
                if tr.active:
                    steps[0] += 1
        res = run_stage(a.stage, cfg, log)
        if rank0:
            atomic_write_json(Path(a.result), {"result": result_to_state(res),
                                               "steps_logged": steps[0]})
        return 0
    except BaseException as e:  # noqa: BLE001 - reported to the launcher, then re-raised
        if rank0:
            atomic_write_json(Path(a.result + ".error"), {
                "type": type(e).__name__, "message": str(e)[:4000],
                "transient": is_transient(e), "traceback": traceback.format_exc()[-8000:]})
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
