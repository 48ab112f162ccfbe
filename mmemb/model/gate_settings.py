"""The gate's budget and threshold, which travel with the gate's model.

The gate stage trains its policy at one reasoning budget and decides with one threshold,
and writes both beside the policy as ``mmemb_gate.json``. Whoever runs that model in
adaptive mode (the evaluate stage, ``mmemb embed``, the MLflow model) reads them here, so
the adaptive numbers are measured at the budget the gate was trained for. A setting the
user gives explicitly wins, and :meth:`GateSettings.describe` says which one was used.

    >>> s = GateSettings.load("runs/demo/gate/policy").override(budget=None)  # doctest: +SKIP
    >>> s.budget, s.threshold, s.describe()                                  # doctest: +SKIP
    (48, 0.5, 'budget 48, threshold 0.5 (from the gate: .../mmemb_gate.json)')
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

GATE_FILE = "mmemb_gate.json"
DEFAULT_BUDGET = 64  # a model without a gate file (no gate stage): the encoder's defaults
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class GateSettings:
    """Reasoning budget (tokens) and gate threshold, with where each came from: the gate's
    file (its path), ``"default"`` or ``"set"`` (given explicitly)."""

    budget: int = DEFAULT_BUDGET
    threshold: float = DEFAULT_THRESHOLD
    budget_from: str = "default"
    threshold_from: str = "default"

    @classmethod
    def load(cls, model: str | Path) -> GateSettings:
        """The settings saved beside ``model`` (a checkpoint folder); the defaults when it has
        none (a hub id, a model no gate stage produced). A broken file fails loudly: silently
        falling back would measure the model at settings it was not trained for."""
        path = Path(model) / GATE_FILE
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: unreadable gate settings ({e}); rerun the gate stage or "
                             "delete the file") from None
        budget = data.get("budget", DEFAULT_BUDGET) if isinstance(data, dict) else None
        threshold = data.get("threshold", DEFAULT_THRESHOLD) if isinstance(data, dict) else None
        if (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1
                or not isinstance(threshold, (int, float)) or isinstance(threshold, bool)
                or not math.isfinite(threshold) or not 0 <= threshold <= 1):
            raise ValueError(f"{path}: expected {{'budget': int >= 1, 'threshold': 0..1}}, got "
                             f"{data!r}")
        return cls(budget, float(threshold), str(path), str(path))

    def save(self, model: str | Path) -> Path:
        """Write these settings beside ``model`` (the gate stage, for its policy): the one
        writer of the file :meth:`load` reads."""
        from data_contracts.files import atomic_write_json

        path = Path(model) / GATE_FILE
        atomic_write_json(path, {"threshold": self.threshold, "budget": self.budget})
        return path

    def override(self, budget: int | None = None, threshold: float | None = None
                 ) -> GateSettings:
        """These settings with each explicitly given value (not None) in place of the gate's."""
        out = self
        if budget is not None:
            out = replace(out, budget=int(budget), budget_from="set")
        if threshold is not None:
            out = replace(out, threshold=float(threshold), threshold_from="set")
        return out

    def describe(self) -> str:
        """One line for logs and reports: the values and where each came from."""
        def src(where: str) -> str:
            return {"set": "set explicitly", "default": "default, no gate file"}.get(
                where, f"from the gate: {where}")

        if self.budget_from == self.threshold_from:
            return f"budget {self.budget}, threshold {self.threshold:g} ({src(self.budget_from)})"
        return (f"budget {self.budget} ({src(self.budget_from)}), threshold "
                f"{self.threshold:g} ({src(self.threshold_from)})")
