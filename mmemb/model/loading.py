"""One loading path for every checkpoint: the tiny default, a hub folder, a prepared base,
a trained student. Every stage (and the baseline evaluation) goes through it.

What a real checkpoint needs before it is an embedder, and why each rule:

* **The method's tokens** (:func:`add_method_tokens`). ``<emb>`` is in no Qwen-VL family;
  ``<think>``/``</think>`` are in Qwen3-VL (ordinary added tokens, reused as they are: the
  model was trained on them) but not in Qwen2-VL / Qwen2.5-VL. New tokens are added as
  special tokens *extending* the list (transformers 5's ``add_special_tokens`` replaces it
  by default, which would un-list the vision markers).
* **The padded vocabulary is kept.** Qwen's embedding matrix has 151,936 rows for a
  tokenizer of 151,657-151,669 ids; new ids land on unused rows and nothing is resized.
  ``resize_token_embeddings(len(tok))`` would *shrink* the matrix (and break vLLM's view of
  the config); a resize happens only when no free row is left (to a multiple of 64).
* **New rows get a documented initial value** (``new_token_init``): ``mean`` (default) sets
  the input and LM-head rows to the mean of the trained rows (ids below the old tokenizer
  size; the padding rows are untrained). Why: a mean row's logit is the average logit, so
  the new token starts neither dominant nor impossible (Hewitt, "Initializing new word
  embeddings", 2021), and on Qwen2-VL, where ``<think>`` and ``<emb>`` are both new, the
  gate starts at p(<think>) = 1/2 with no prior for reasoning or skipping. ``keep`` leaves
  whatever the row holds (an unused padding row: arbitrary), for ablations.
* **The source dtype is kept**: a bf16 checkpoint is saved bf16 (:func:`source_dtype`),
  whatever dtype a stage computed in.
* **Old processor type names** (``Qwen2_5_VLImageProcessor`` in older Qwen2.5-VL copies,
  which current transformers and vLLM reject) are mapped to the current class through a
  shadow folder of links with a fixed ``preprocessor_config.json`` (:func:`loadable_dir`);
  the same folder serves transformers and vLLM, with a warning.
* **The embedding prompt's system turn follows the family's template**: a base without a
  saved :class:`EmbeddingConfig` gets the template's default system text (Qwen2-VL,
  Qwen2.5-VL) or none (Qwen3-VL) (:func:`default_embedding_config`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Literal

from mmemb.model.prompts import EMBEDDING_CONFIG_FILE, EmbeddingConfig

TokenInit = Literal["mean", "keep"]

#: Processor type names older checkpoints carry -> the class current transformers has.
LEGACY_IMAGE_PROCESSORS = {
    "Qwen2_5_VLImageProcessor": "Qwen2VLImageProcessor",
    "Qwen2_5_VLImageProcessorFast": "Qwen2VLImageProcessorFast",
}
PREPROCESSOR_FILE = "preprocessor_config.json"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used; the message names the file and the fix."""


# ---------------------------------------------------------------------------- folders
def looks_like_hub_id(value: str) -> bool:
    """``org/name``: one slash, not absolute, not relative-looking (``./x``, ``~/x``)."""
    return (value.count("/") == 1 and not value.startswith(("/", ".", "~"))
            and all(part and not part.startswith(".") for part in value.split("/")))


def resolve_model(path: str | Path) -> Path | str:
    """A checkpoint folder as a ``Path``, a hub id (``org/name``) as a ``str``.

    A path that exists but is a file, and one that names no folder and cannot be a hub id
    (absolute, ``./``, several components: ``runs/demo/train/student``), is refused here
    with what is missing, instead of the hub client's "Repo id must be in the form ...".
    """
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"model {str(path)!r} is a file, not a checkpoint folder: point "
                              "to the folder holding config.json, the weights and the "
                              "tokenizer")
    if looks_like_hub_id(str(path)):
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") \
                and not _in_hf_cache(str(path)):
            raise CheckpointError(f"model {str(path)!r}: no such folder ({p.absolute()}), and "
                                  "as a hub id it is not in the local Hugging Face cache "
                                  "(HF_HUB_OFFLINE=1: nothing is downloaded); fix the path, "
                                  "or download it once where there is network")
        return str(path)
    parent = next((a for a in p.absolute().parents if a.is_dir()), None)
    raise CheckpointError(f"model folder {str(path)!r} does not exist ({p.absolute()}; the "
                          f"nearest existing folder is {parent}): check the path, or run "
                          "the stage that writes it first (a hub id has the form org/name)")


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an invalid repo id
        return False


def legacy_names(path: str | Path) -> dict[str, str]:
    """{old: new} for each outdated processor type name in a checkpoint folder."""
    f = Path(path) / PREPROCESSOR_FILE
    if not f.is_file():
        return {}
    try:
        d = json.loads(f.read_text())
    except ValueError as e:
        raise CheckpointError(f"{f}: not JSON ({e}); re-download or re-export it") from e
    t = d.get("image_processor_type")
    return {t: LEGACY_IMAGE_PROCESSORS[t]} if t in LEGACY_IMAGE_PROCESSORS else {}


def loadable_dir(path: str | Path, work: str | Path | None = None) -> Path | str:
    """``path``, or a shadow folder (links + a fixed preprocessor config) where ``path``
    names an old processor type. ``work``: where to put it (default: the temp folder)."""
    p = resolve_model(path)
    if not isinstance(p, Path):
        return p  # a hub id: left to transformers / vLLM
    old = legacy_names(p)
    if not old:
        return p
    key = hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:12]
    shadow = Path(work or tempfile.gettempdir()) / f"mmemb-mapped-{key}"
    shadow.mkdir(parents=True, exist_ok=True)
    for f in p.iterdir():
        link = shadow / f.name
        if f.name != PREPROCESSOR_FILE and not link.exists():
            os.symlink(f.resolve(), link)
    d = json.loads((p / PREPROCESSOR_FILE).read_text())
    d["image_processor_type"] = old[d["image_processor_type"]]
    from data_contracts.files import atomic_write_json

    atomic_write_json(shadow / PREPROCESSOR_FILE, d)
    warnings.warn(f"{p / PREPROCESSOR_FILE}: image_processor_type {list(old)[0]!r} is an old "
                  f"name, loaded as {list(old.values())[0]!r} (through {shadow}); re-save the "
                  "processor to silence this", stacklevel=2)
    return shadow


def source_dtype(path: str | Path):
    """The dtype a checkpoint was saved in (``config.json``'s ``dtype``/``torch_dtype``,
    top level or text config); float32 when it says nothing."""
    import torch

    f = Path(path) / "config.json"
    if not f.is_file():
        return torch.float32
    cfg = json.loads(f.read_text())
    for d in (cfg, cfg.get("text_config") or {}):
        name = d.get("dtype") or d.get("torch_dtype")
        if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
    return torch.float32


def load_processor(path: str | Path, trust_remote_code: bool = False):
    """``AutoProcessor`` for a checkpoint, old type names mapped (:func:`loadable_dir`)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(loadable_dir(path), trust_remote_code=trust_remote_code)


# ---------------------------------------------------------------------------- tokens
def method_tokens(cfg: EmbeddingConfig) -> tuple[str, str, str]:
    return (cfg.think_token, cfg.end_think_token, cfg.emb_token)


def missing_tokens(tokenizer, cfg: EmbeddingConfig | None = None) -> list[str]:
    """The method's tokens a tokenizer lacks (each must be exactly one id)."""
    vocab = tokenizer.get_vocab()
    return [t for t in method_tokens(cfg or EmbeddingConfig()) if t not in vocab]


def add_method_tokens(model, tokenizer, cfg: EmbeddingConfig | None = None,
                      init: TokenInit = "mean", round_to=None) -> list[str]:
    """Add the tokens ``tokenizer`` lacks, on free padding rows, initialised by ``init``.

    Returns the tokens added (empty: nothing changed). Existing tokens, Qwen3-VL's own
    ``<think>``/``</think>`` among them, are left exactly as they are. ``round_to``: the
    source dtype; the mean is rounded to it, so rows added in memory to a float32 copy
    equal the rows the prepare stage saved in bf16, bit for bit.
    """
    import torch
    from transformers import AddedToken

    new = missing_tokens(tokenizer, cfg)
    if not new:
        return []
    n_old = len(tokenizer)
    added = [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False)
             for t in new]
    try:  # extend the special-token list (transformers 5 replaces it by default)
        tokenizer.add_special_tokens({"additional_special_tokens": added},
                                     replace_extra_special_tokens=False)
    except TypeError:  # transformers 4: extending is the only behaviour
        tokenizer.add_special_tokens({"additional_special_tokens": added})
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:  # no free padding row left: grow, never shrink
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64,
                                      mean_resizing=False)
    ids = tokenizer.convert_tokens_to_ids(new)
    if init == "mean":
        with torch.no_grad():
            mats = [model.get_input_embeddings().weight]
            out = model.get_output_embeddings()
            if out is not None and out.weight.data_ptr() != mats[0].data_ptr():
                mats.append(out.weight)  # an untied LM head: its rows too (the gate reads them)
            for w in mats:  # [V, H]
                m = w[:n_old].float().mean(0, keepdim=True)  # [1, H]
                w[ids] = m.to(round_to or w.dtype).to(w.dtype)
    elif init != "keep":
        raise ValueError(f"new_token_init={init!r}: choose 'mean' or 'keep'")
    return new


def load_model(path: str | Path, dtype=None, trust_remote_code: bool = False,
               attn_implementation: str = "sdpa"):
    """The generative model of a checkpoint (old processor names mapped), in ``dtype``
    (default float32: the stages compute in it; saving keeps the source dtype)."""
    import torch
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(
        loadable_dir(path), dtype=dtype or torch.float32, trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation)


def load_model_with_tokens(path: str | Path, processor, init: TokenInit = "mean", dtype=None,
                           trust_remote_code: bool = False
                           ) -> tuple[object, EmbeddingConfig, list[str]]:
    """The model of checkpoint ``path`` with the method's tokens added to it and to the
    given (already loaded) ``processor``'s tokenizer: ``(model, embedding config, tokens
    added)``. For a caller that had to load the processor anyway (the prepare stage reads
    its tokens first), so the processor is loaded once, not twice.
    """
    src = loadable_dir(path)
    model = load_model(src, dtype=dtype, trust_remote_code=trust_remote_code)
    cfg = saved_embedding_config(path) or default_embedding_config(processor)
    added = add_method_tokens(model, processor.tokenizer, cfg, init=init,
                              round_to=source_dtype(src) if isinstance(src, Path) else None)
    return model, cfg, added


# ---------------------------------------------------------------------------- prompt config
def template_system(processor) -> str | None:
    """The system text a family's chat template adds by default, or None (Qwen3-VL)."""
    try:
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": "x"}]}],
            tokenize=False, add_generation_prompt=False)
    except Exception:  # noqa: BLE001 - no template: the method's default
        return EmbeddingConfig().system
    head = "<|im_start|>system\n"
    if not text.startswith(head):
        return None
    return text[len(head):text.index("<|im_end|>")]


def default_embedding_config(processor) -> EmbeddingConfig:
    """The embedding format for a base with no saved :class:`EmbeddingConfig`: the
    method's, with the family template's system turn (or none)."""
    return EmbeddingConfig(system=template_system(processor))


def saved_embedding_config(path: str | Path) -> EmbeddingConfig | None:
    p = Path(path)
    return EmbeddingConfig.load(p) if (p / EMBEDDING_CONFIG_FILE).is_file() else None
