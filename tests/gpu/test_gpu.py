"""The model code on a CUDA device: bf16 embeddings, stage 4 under DeepSpeed ZeRO-2 in
bf16 (gradient caching on the device: the ``cuda`` case of tests/losses/test_gradcache.py).
Marked ``gpu``; skipped without CUDA (see conftest.py for running them on the CPU to check
the tests themselves)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmemb.model.embedder import Embedder
from mmemb.model.prompts import EmbedInput

NO_DEVICE = (os.environ.get("MMEMB_GPU_TESTS_DEVICE", "cuda") == "cuda"
             and not torch.cuda.is_available())
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(NO_DEVICE, reason="needs a CUDA GPU (torch sees none)")]

ROOT = Path(__file__).resolve().parents[2]


def _inputs(synth) -> list[EmbedInput]:
    imgs = sorted((synth["image_root"] / "images/train").rglob("*.png"))[:4]
    assert len(imgs) == 4
    out = [EmbedInput(text="a red circle", instruction="Represent the text."),
           EmbedInput(text="three blue squares and one triangle")]
    for i, p in enumerate(imgs):
        out.append(EmbedInput(text=["", "it shows shapes"][i % 2],
                              instruction="<|image_1|> Represent the given image.",
                              images=[str(p)]))
    out.append(EmbedInput(text="two images", images=[str(imgs[0]), str(imgs[1])]))
    out.append(EmbedInput(text="what is two plus three", rationale="two plus three is five"))
    return out


def test_bf16_embeddings_on_device_match_fp32_on_cpu(tiny_model, synth, device, exact_fp32):
    """The embeddings a GPU serves in bf16 are the fp32 CPU ones up to bf16 rounding, and
    fp32 on the GPU reproduces the CPU to reduction-order noise."""
    inputs = _inputs(synth)
    ref = Embedder.from_pretrained(tiny_model).encode(inputs, batch_size=4, mode="auto")
    e32 = Embedder.from_pretrained(tiny_model, device=device).encode(inputs, batch_size=4,
                                                                    mode="auto")
    e16 = Embedder.from_pretrained(tiny_model, dtype=torch.bfloat16, device=device).encode(
        inputs, batch_size=4, mode="auto")
    assert torch.equal(e32.n_tokens, ref.n_tokens) and torch.equal(e16.n_tokens, ref.n_tokens)
    torch.testing.assert_close(e32.embeddings, ref.embeddings, atol=1e-4, rtol=1e-4)
    got, want = e16.embeddings.float(), ref.embeddings
    assert torch.isfinite(got).all()
    # A random tiny model maps every input near one direction (pairwise cosine up to
    # ~0.9996), so a raw cosine of bf16 vs fp32 would pass for any input. Measured instead
    # against the spread between inputs: the bf16 error is a fraction of the distance to
    # the nearest other input (fp32 CPU: ~0.004 vs >= 0.029), so retrieval is unchanged.
    err = (got - want).norm(dim=-1)  # [N]
    gap = torch.cdist(want, want).fill_diagonal_(float("inf")).min(dim=1).values  # [N]
    assert (err < 0.5 * gap).all(), (err, gap)
    assert torch.equal(torch.cdist(got, want).argmin(dim=1), torch.arange(len(inputs)))
    centre = want.mean(0)
    cos = F.cosine_similarity(got - centre, want - centre, dim=-1)  # [N]
    assert cos.min() > 0.98, cos


def test_stage4_trains_under_deepspeed_zero2_bf16(tiny_model, synth, gpu_selections, device,
                                                  tmp_path):
    """``python -m mmemb.stages.train`` on the device: DeepSpeed ZeRO-2 in bf16 (auto
    precision on a GPU), gradient caching with the LM term. The loss falls, every trainable
    tensor moves, and the saved student embeds on the device.

    A fresh process: DeepSpeed picks its accelerator once per process, and the suite's
    conftest pins it to the CPU for the CPU tests."""
    out = tmp_path / "train"
    env = {**os.environ, "DS_ACCELERATOR": "cuda" if device == "cuda" else "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "mmemb.stages.train", "--model", str(tiny_model),
           "--data", str(gpu_selections), "--image-root", str(synth["image_root"]),
           "--out", str(out), "--steps", "30"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] is (device == "cuda")
    m = json.loads((out / "train_summary.json").read_text())
    assert m["steps"] == 30 and m["params_trainable"] > 30
    assert m["params_changed"] == m["params_trainable"]
    assert m["loss_last"] < 0.8 * m["loss_first"], (m["loss_first"], m["loss_last"])
    steps = [json.loads(line)[1] for line in (out / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 30 and all(s["loss/lm"] > 0 for s in steps)  # LM term is on
    student = Embedder.from_pretrained(out / "student", device=device)
    e = student.encode(_inputs(synth)[:3]).embeddings
    assert torch.isfinite(e.float()).all() and e.shape == (3, student.hidden_size)
