"""The MLflow pyfunc wrapper of an mmemb checkpoint, logged as *models from code*.

MLflow's classic ``python_model=MyModel()`` pickles the object with cloudpickle; a pickle
is code that runs on load, which a user who downloads the model must not be made to trust.
Models from code log this file's source instead; the checkpoint (safetensors, tokenizer,
processor, embedding config) travels as the model's ``checkpoint`` artifact.

Load and embed::

    >>> m = mlflow.pyfunc.load_model("models:/mmemb-policy@latest")          # doctest: +SKIP
    >>> m.predict(pd.DataFrame({"text": ["2 circles and 3 squares"]}))       # doctest: +SKIP

Input columns: ``text`` (required), ``instruction``, ``image`` (a path, may be empty);
``params={"mode": "direct" | "reason" | "adaptive"}``. Output: one list of floats per row.
Reason and adaptive modes run at the gate's budget and threshold, saved in the checkpoint
folder beside the policy (``mmemb_gate.json``, read by :mod:`mmemb.model.gate_settings`),
so the registered model decides as the gate was trained to; optional ``params`` ``budget``
and ``threshold`` override them.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class MMEmbPyfunc(PythonModel):
    """An mmemb checkpoint as an MLflow model: embeds a DataFrame of inputs in a mode."""

    def load_context(self, context):
        from mmemb.model.embedder import Embedder
        from mmemb.model.gate_settings import GateSettings

        self.embedder = Embedder.from_pretrained(context.artifacts["checkpoint"])
        self.gate = GateSettings.load(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None
                ) -> list:
        """One embedding (list of floats) per row, in ``params['mode']`` (default direct)."""
        from mmemb.model.prompts import EmbedInput

        params = params or {}
        mode = params.get("mode", "direct")
        rows = model_input.to_dict("records")
        inputs = [EmbedInput(text=str(r.get("text") or ""),
                             instruction=str(r.get("instruction") or ""),
                             images=[r["image"]] if r.get("image") else []) for r in rows]
        if mode == "direct":
            out = self.embedder.encode(inputs, mode="direct").embeddings
        else:
            from mmemb.inference import AdaptiveEncoder

            gate = self.gate.override(params.get("budget"), params.get("threshold"))
            out = AdaptiveEncoder(self.embedder, budget=gate.budget, threshold=gate.threshold
                                  ).encode(inputs, mode=mode).embeddings
        return out.tolist()


mlflow.models.set_model(MMEmbPyfunc())
