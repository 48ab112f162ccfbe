"""CPU-sized checkpoints of the *real* Qwen-VL layouts, for tests and smoke runs.

A layout folder holds what a hub checkpoint holds besides its weights: ``config.json``,
``tokenizer_config.json`` (the added-token table at the real ids), ``vocab.json`` /
``merges.txt`` (the family's byte-level BPE, optionally ``.xz``-compressed), the chat
template, the processor configs and ``generation_config.json``. :func:`build_checkpoint`
gives it small random weights (``from_config`` + ``save_pretrained``), so the result loads
exactly as ``Qwen/Qwen2-VL-2B-Instruct`` does, only with a shrunk config.

Why: the tiny model of :mod:`mmemb.model.tiny` has a tokenizer made for the synthetic world,
with the method's tokens already in it; it cannot show what a real checkpoint lacks (no
``<emb>``, a padded vocabulary, a chat template with or without a system turn, a
generation_config that samples greedily). These can.

The repository ships the three layouts (``tests/fixtures/qwen_layouts``, provenance in its
README) so a fresh clone needs nothing outside itself. Run alone::

    python -m mmemb.model.layouts --layout tests/fixtures/qwen_layouts/qwen2vl \\
        --out runs/qwen2vl-layout --seed 0
"""

from __future__ import annotations

import argparse
import lzma
import shutil
from pathlib import Path

#: The shipped layouts: family name -> folder name under :data:`LAYOUT_ROOT`.
FAMILIES = {"qwen2_vl": "qwen2vl", "qwen2_5_vl": "qwen25vl", "qwen3_vl": "qwen3vl"}
LAYOUT_ROOT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "qwen_layouts"
#: Shared by the three families (one BPE); looked up in the layout folder, then its parent.
SHARED_FILES = ("vocab.json", "merges.txt")


def layout_dir(family: str, root: str | Path | None = None) -> Path:
    """The layout folder of a family (``qwen2_vl`` / ``qwen2_5_vl`` / ``qwen3_vl``)."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}: choose one of {sorted(FAMILIES)}")
    return Path(root or LAYOUT_ROOT) / FAMILIES[family]


def _copy_shared(layout: Path, out: Path) -> None:
    """vocab.json / merges.txt from the layout or its parent, decompressing ``.xz``."""
    for name in SHARED_FILES:
        for d in (layout, layout.parent):
            if (d / name).is_file():
                shutil.copyfile(d / name, out / name)
                break
            if (d / f"{name}.xz").is_file():
                with lzma.open(d / f"{name}.xz") as src, open(out / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                break
        else:
            raise FileNotFoundError(f"{layout}: no {name} (or {name}.xz) here or in "
                                    f"{layout.parent}; the tokenizer cannot be built")


def copy_layout(layout: str | Path, out: str | Path) -> Path:
    """Copy a layout's files (everything but weights) to ``out``, BPE files decompressed."""
    layout, out = Path(layout), Path(out)
    if not (layout / "config.json").is_file():
        raise FileNotFoundError(f"{layout}/config.json: not a checkpoint layout folder")
    out.mkdir(parents=True, exist_ok=True)
    for f in layout.iterdir():
        if f.is_file() and f.suffix == ".json":
            shutil.copyfile(f, out / f.name)
    _copy_shared(layout, out)
    return out


def build_checkpoint(layout: str | Path, out: str | Path, seed: int = 0) -> Path:
    """A random-weight checkpoint of ``layout`` in ``out``, in the config's dtype.

    The weights are the architecture's own initialisation (seeded), saved as safetensors
    beside the layout's untouched tokenizer, template and processor files; ``config.json``
    is rewritten by ``save_pretrained`` (same keys, current transformers spelling).
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    out = copy_layout(layout, out)
    cfg = AutoConfig.from_pretrained(out)
    dtype = getattr(cfg, "dtype", None) or getattr(cfg.get_text_config(), "dtype", None)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.bfloat16)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype)
    model.save_pretrained(out, safe_serialization=True)
    # save_pretrained rewrites generation_config.json from the model config, dropping the
    # checkpoint's sampling defaults (Qwen2-VL's top_k 1): restore the layout's own file.
    if (Path(layout) / "generation_config.json").is_file():
        shutil.copyfile(Path(layout) / "generation_config.json", out / "generation_config.json")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Build a random-weight checkpoint of a real "
                                "Qwen-VL layout (config, tokenizer, template, processor).")
    p.add_argument("--layout", help="layout folder (default: the shipped one of --family)")
    p.add_argument("--family", default="qwen2_vl", choices=sorted(FAMILIES))
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(build_checkpoint(a.layout or layout_dir(a.family), a.out, a.seed))


if __name__ == "__main__":
    main()
