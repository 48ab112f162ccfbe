"""Refuse a Prefect deployment whose template variables are unset.

``deploy/prefect.yaml`` fills ``{{ $MLFLOW_TRACKING_URI }}``, ``{{ $MMEMB_HOME }}`` and
``{{ $MMEMB_IMAGE }}`` from the environment of ``prefect deploy``; an unset variable is not
an error there, the deployment would ship the literal text (and every run would log to a
"tracking store" named ``{{ $MLFLOW_TRACKING_URI }}``). The deployments' build step runs::

    python -m tasks.deploy_check MLFLOW_TRACKING_URI MMEMB_HOME [MMEMB_IMAGE]

which exits 2 naming what to export, so ``prefect deploy`` stops before registering
anything. A run that still meets an unfilled template refuses it too
(:func:`tasks.tracking.resolve_uri`).
"""

from __future__ import annotations

import os
import sys

HINTS = {
    "MLFLOW_TRACKING_URI": "the team MLflow server the runs log to, e.g. "
                           "https://mlflow.example.org (deploy/mlflow)",
    "MMEMB_HOME": "the repository root on the worker, e.g. /opt/mmemb in the image",
    "MMEMB_IMAGE": "the mmemb image (deploy/docker/Dockerfile), e.g. registry/mmemb:0.1.0",
}


def missing(names: list[str], env: dict[str, str] | None = None) -> list[str]:
    env = os.environ if env is None else env
    return [n for n in names if not env.get(n, "").strip() or "{{" in env.get(n, "")]


def main(argv: list[str] | None = None) -> int:
    names = list(sys.argv[1:] if argv is None else argv)
    bad = missing(names)
    if not bad:
        print(f"[deploy-check] {', '.join(names)}: set", flush=True)
        return 0
    lines = [f"deploy/prefect.yaml needs {', '.join(bad)} in the environment of `prefect "
             "deploy` (unset, the deployment would carry the literal '{{ $NAME }}' text):"]
    lines += [f"  export {n}=...   # {HINTS.get(n, '')}".rstrip() for n in bad]
    print("\n".join(lines), file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())
