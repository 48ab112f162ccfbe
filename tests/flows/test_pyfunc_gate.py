"""The MLflow model runs adaptive inference at the gate's saved budget and threshold."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pandas as pd


def test_pyfunc_reads_the_gate_settings_beside_the_checkpoint(tiny_model, tmp_path,
                                                              monkeypatch):
    import mmemb.inference as inference
    from tasks.mlflow_model import MMEmbPyfunc

    policy = tmp_path / "policy"
    shutil.copytree(tiny_model, policy)
    (policy / "mmemb_gate.json").write_text(json.dumps({"threshold": 0.25, "budget": 3}))
    built = []

    class Recording(inference.AdaptiveEncoder):
        def __init__(self, embedder, **kw):
            built.append(kw)
            super().__init__(embedder, **kw)

    monkeypatch.setattr(inference, "AdaptiveEncoder", Recording)
    m = MMEmbPyfunc()
    m.load_context(SimpleNamespace(artifacts={"checkpoint": str(policy)}))
    df = pd.DataFrame({"text": ["2 red circles and 3 blue squares", "a green triangle"]})
    vecs = m.predict(None, df, params={"mode": "adaptive"})
    assert len(vecs) == 2 and len(vecs[0]) == 64
    assert built[-1] == {"budget": 3, "threshold": 0.25}
    m.predict(None, df, params={"mode": "reason", "budget": 2})  # an explicit value wins
    assert built[-1] == {"budget": 2, "threshold": 0.25}
    assert len(built) == 2 and len(m.predict(None, df)) == 2  # direct: no adaptive encoder
    assert len(built) == 2
