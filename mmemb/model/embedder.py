"""The embedder: any Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint as an embedding model.

The embedding is the last-layer hidden state at ``<emb>``, L2-normalised. It is computed
through the base model (``model.model``) without the LM head, so embedding a batch never
materialises vocabulary-sized logits; the LM head is applied only where a loss needs it
(the rationale tokens of stage 4, the gate token of stage 5).

Example::

    >>> emb = Embedder.from_pretrained("runs/demo/tiny-qwen2vl")            # doctest: +SKIP
    >>> out = emb.encode([EmbedInput(text="a red circle")], batch_size=8)    # doctest: +SKIP
    >>> out.embeddings.shape                                                 # doctest: +SKIP
    torch.Size([1, 64])
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

import mmemb  # noqa: F401  (CPU torchvision shim)
from mmemb.model.images import DEFAULT_MAX_DECODE_PIXELS, ImageCache, TargetFn, file_identity
from mmemb.model.prompts import EMBEDDING_CONFIG_FILE, EmbeddingConfig, EmbedInput, embed_prompt
from mmemb.model.resolution import Grid, fit_image, target_size

Mode = Literal["direct", "reason", "auto"]
IMAGE_PAD = "<|image_pad|>"  # one per image in a prompt, expanded by the processor


class EmbeddingConfigMismatch(ValueError):
    """The checkpoint was trained with another prompt/pooling than the one requested."""


@dataclass
class EncoderOutput:
    """What an embedding pass returns (typed, as in tevatron)."""

    embeddings: torch.Tensor  # [B, H], L2-normalised when the config says so
    n_tokens: torch.Tensor  # [B] prompt tokens per input (no padding)
    hidden: torch.Tensor | None = None  # [B, T, H] last hidden states, only when asked
    input_ids: torch.Tensor | None = None  # [B, T]
    attention_mask: torch.Tensor | None = None  # [B, T]


def load_image(path_or_img, max_pixels: int | None = None, *,
               max_decode_pixels: int | None = DEFAULT_MAX_DECODE_PIXELS,
               target: TargetFn | None = None):
    """Open an image as RGB; CMYK, palette, 16-bit and animated inputs are converted.

    A path goes through :func:`mmemb.model.images.open_image`: regular files only, the
    decode limit, large images decoded reduced. ``target`` (original size -> the size the
    caller resizes to, e.g. the processor grid's): an image decoded smaller than the file
    is resized here to exactly that target, computed from the *original* size, so the
    token count is the one the header predicts (unreduced images are returned as decoded,
    for the caller's resize as before). ``max_pixels``: cap the area, aspect kept.
    """
    if not isinstance(path_or_img, (str, Path)):
        img = _to_rgb(path_or_img)
    else:
        from mmemb.model.images import open_image

        want_of = target
        if want_of is None and max_pixels:
            want_of = lambda w, h: _capped(w, h, max_pixels)  # noqa: E731
        img, orig, reduced = open_image(path_or_img, max_decode_pixels=max_decode_pixels,
                                        target=want_of, convert=_to_rgb)
        if target is not None and reduced:
            w, h = target(*orig)
            if img.width != img.height and (img.width > img.height) != (w > h):
                w, h = h, w  # EXIF turned the image by 90 degrees
            if img.size != (w, h):
                img = img.resize((w, h), resample=3)  # bicubic, as fit_image and HF
    if max_pixels and img.width * img.height > max_pixels:
        scale = (max_pixels / (img.width * img.height)) ** 0.5
        img = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))))
    if min(img.size) < 2:
        img = img.resize((max(2, img.width), max(2, img.height)))
    return img


def _capped(w: int, h: int, max_pixels: int) -> tuple[int, int]:
    if w * h <= max_pixels:
        return w, h
    scale = (max_pixels / (w * h)) ** 0.5
    return max(1, int(w * scale)), max(1, int(h * scale))


def _to_rgb(img):
    """First frame, EXIF orientation, then RGB (alpha composited on white)."""
    from PIL import Image, ImageOps

    if getattr(img, "is_animated", False):
        img.seek(0)  # first frame of an animated GIF/PNG
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v * (1 / 256)).convert("L")
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB")


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The HF ``*ForConditionalGeneration`` under a peft wrapper (or the model itself); peft
    injects its adapters into that model's modules, so calling it uses them."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class Embedder(torch.nn.Module):
    """A Qwen-VL generative model used as an embedder (direct or reasoning mode)."""

    def __init__(self, model, processor, config: EmbeddingConfig | None = None,
                 max_pixels: int = 1024 * 1024, max_text_tokens: int = 2048,
                 min_pixels: int | None = None,
                 max_decode_pixels: int | None = DEFAULT_MAX_DECODE_PIXELS):
        """Wrap a loaded model and processor; the method's token ids and the image grid
        are resolved once here, not on every batch."""
        super().__init__()
        self.min_pixels = min_pixels
        self.max_decode_pixels = max_decode_pixels
        self.save_dtype: torch.dtype | None = None  # set by from_pretrained (source dtype)
        self.max_text_tokens = max_text_tokens
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.config = config or EmbeddingConfig()
        self.max_pixels = max_pixels
        self.grid = Grid.of(processor) if hasattr(processor, "image_processor") else None
        self.image_cache = ImageCache()  # processed images by file and resolution settings
        missing = [t for t in (self.config.think_token, self.config.end_think_token,
                               self.config.emb_token)
                   if self.tokenizer.convert_tokens_to_ids(t) in (None,
                                                                  self.tokenizer.unk_token_id)]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}; load the checkpoint "
                             "with Embedder.from_pretrained(..., add_special_tokens=True)")
        self.emb_id = self.tokenizer.convert_tokens_to_ids(self.config.emb_token)
        self.think_id = self.tokenizer.convert_tokens_to_ids(self.config.think_token)
        self.end_think_id = self.tokenizer.convert_tokens_to_ids(self.config.end_think_token)

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | str | None = None,
                        device: str | torch.device | None = None,
                        expect: EmbeddingConfig | None = None,
                        add_special_tokens: bool | None = None,
                        new_token_init: str = "mean",
                        trust_remote_code: bool = False, attn_implementation: str = "sdpa",
                        max_pixels: int = 1024 * 1024, max_text_tokens: int = 2048,
                        min_pixels: int | None = None,
                        max_decode_pixels: int | None = DEFAULT_MAX_DECODE_PIXELS
                        ) -> Embedder:
        """Load any checkpoint through the one path of :mod:`mmemb.model.loading`.

        Refuses one whose saved embedding config differs from ``expect``. A base without
        ``<think>``/``</think>``/``<emb>`` (a hub Qwen-VL folder) gets them added in memory
        exactly as the prepare stage adds them on disk (``new_token_init``), with a warning
        unless ``add_special_tokens=True`` says the caller expects it; ``False`` refuses.
        ``dtype``: the compute dtype (default float32); saving keeps the source dtype.
        """
        from mmemb.model import loading

        path = loading.resolve_model(path)  # a missing folder is named as such
        saved = EmbeddingConfig.load(path) if isinstance(path, Path) else None
        _refuse_other_config(path, saved, expect)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        src = loading.loadable_dir(path)  # warns once about old processor names
        processor = loading.load_processor(src, trust_remote_code=trust_remote_code)
        model = loading.load_model(src, dtype=dtype, trust_remote_code=trust_remote_code,
                                   attn_implementation=attn_implementation)
        cfg = saved or expect or loading.default_embedding_config(processor)
        save_dtype = loading.source_dtype(src) if isinstance(src, Path) else None
        _add_missing_tokens(path, model, processor, cfg, add_special_tokens, new_token_init,
                            round_to=save_dtype)
        emb = cls(model, processor, cfg, max_pixels=max_pixels, max_text_tokens=max_text_tokens,
                  min_pixels=min_pixels, max_decode_pixels=max_decode_pixels)
        emb.save_dtype = save_dtype
        if device is not None:
            emb.to(device)
        return emb

    def save_pretrained(self, out: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Save weights (safetensors), processor, tokenizer and the embedding config.

        ``dtype``: the saved weights' dtype; default the source checkpoint's (a bf16 hub
        folder stays bf16 however the stage computed), float32 for a model built in memory.
        """
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        model = self.model
        if hasattr(model, "merge_and_unload"):  # a peft LoRA model: save merged weights
            model = model.merge_and_unload()
        dtype = dtype or self.save_dtype
        state = None
        if dtype is not None and next(model.parameters()).dtype != dtype:
            state = cast_state_dict(model.state_dict(), dtype)  # the model keeps its dtype
        model.save_pretrained(out, state_dict=state, safe_serialization=True)
        if state is not None:  # transformers records the in-memory dtype; say the saved one
            _record_dtype(out / "config.json", dtype)
        self.processor.save_pretrained(out)
        if hasattr(self.processor, "image_processor"):  # preprocessor_config.json: vLLM's
            self.processor.image_processor.save_pretrained(out)  # loader reads it
        self.config.save(out)
        return out

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        return getattr(cfg, "text_config", cfg).hidden_size

    # ------------------------------------------------------------------ tokenisation
    def tokenize(self, texts: list[str], images: list[list]) -> dict[str, torch.Tensor]:
        """Run the processor on full prompt strings; images are expanded to their tokens.

        Each prompt must hold one image slot per image (the prompt builders write them and
        escape any in the data); a mismatch is refused here, naming the input, instead of
        failing inside the processor."""
        for i, (t, ims) in enumerate(zip(texts, images, strict=True)):
            n = t.count(IMAGE_PAD)
            if n != len(ims):
                raise ValueError(f"input {i}: its prompt has {n} image slot(s) ({IMAGE_PAD}) "
                                 f"for {len(ims)} image(s); build prompts with "
                                 "mmemb.model.prompts (it escapes markup found in the data)")
        flat = [self.processed_image(im) for ims in images for im in ims]
        kw = dict(text=texts, padding=True, return_tensors="pt")
        if flat:
            kw["images"] = flat
        batch = self.processor(**kw)
        return {k: v.to(self.device) if hasattr(v, "to") else v for k, v in batch.items()}

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """The size an image of ``width x height`` is given to the processor at."""
        if self.grid is None:
            return _capped(width, height, self.max_pixels) if self.max_pixels else (width,
                                                                                    height)
        return target_size(width, height, self.grid, self.max_pixels, self.min_pixels)

    def processed_image(self, path_or_img):
        """One image at the run's resolution (:mod:`mmemb.model.resolution`), as the
        processor gets it; a file is decoded and resized once while it stays in
        ``image_cache`` (keyed by its path, size, mtime and the resolution settings), so a
        query embedded direct and with K rationales shares one decode."""
        def make():
            return fit_image(self.load_image(path_or_img), self.grid, self.max_pixels,
                             self.min_pixels)

        ident = file_identity(path_or_img) if isinstance(path_or_img, (str, Path)) else None
        cache = getattr(self, "image_cache", None)  # absent on objects built without __init__
        if ident is None or cache is None:
            return make()
        grid = None if self.grid is None else (self.grid.patch_size, self.grid.merge_size,
                                               self.grid.min_pixels, self.grid.max_pixels)
        key = (*ident, self.max_pixels, self.min_pixels, self.max_decode_pixels, grid)
        return cache.get(key, make)

    def load_image(self, path_or_img):
        """One image as the embedder sees it before :func:`fit_image`: decoded within
        ``max_decode_pixels``, reduced while decoding where the format allows."""
        return load_image(path_or_img, max_decode_pixels=self.max_decode_pixels,
                          target=self.target_size)

    def prompts(self, inputs: list[EmbedInput], mode: Mode = "direct") -> list[str]:
        """Prompt strings: ``direct`` ignores rationales, ``reason`` requires one per input,
        ``auto`` reasons exactly where a rationale is given (mixed batches)."""
        inputs = [self._clip(x) for x in inputs]
        if mode == "direct":
            return [embed_prompt(EmbedInput(x.text, x.instruction, x.images), self.config)
                    for x in inputs]
        if mode == "reason":
            missing = [i for i, x in enumerate(inputs) if x.rationale is None]
            if missing:
                raise ValueError(f"mode='reason' needs a rationale for every input; inputs "
                                 f"{missing[:5]} have none (use mmemb.inference to generate)")
        elif mode != "auto":
            raise ValueError(f"mode={mode!r}: choose 'direct', 'reason' or 'auto'")
        return [embed_prompt(x, self.config) for x in inputs]

    def _clip(self, x: EmbedInput) -> EmbedInput:
        """Keep the first ``max_text_tokens`` tokens of text and rationale (documented
        handling of huge inputs: the prompt still ends at ``<emb>``, memory stays bounded)."""
        def clip(t: str | None) -> str | None:
            if t is None or len(t) <= self.max_text_tokens:  # a token has >= 1 character
                return t
            ids = self.tokenizer(t, add_special_tokens=False)["input_ids"]
            if len(ids) <= self.max_text_tokens:
                return t
            return self.tokenizer.decode(ids[: self.max_text_tokens])

        text, rat = clip(x.text), clip(x.rationale)
        if text is x.text and rat is x.rationale:
            return x
        return EmbedInput(text or "", x.instruction, x.images, rat)

    # ------------------------------------------------------------------ forward
    def hidden_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Last-layer hidden states of the base model (no LM head): [B, T, H]."""
        hf = hf_model(self.model)
        base = hf.model if hasattr(hf, "model") else hf
        out = base(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False,
                   return_dict=True)
        return out.last_hidden_state

    def pool(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden state at the last ``<emb>`` of each row: [B, T, H] -> [B, H]."""
        is_emb = input_ids == self.emb_id  # [B, T]
        if not bool(is_emb.any(dim=1).all()):
            bad = (~is_emb.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(f"rows {bad} contain no {self.config.emb_token} token (prompt "
                             "truncated or built without it)")
        t = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = torch.where(is_emb, t, torch.full_like(t, -1)).max(dim=1).values  # [B]
        emb = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, H]
        return F.normalize(emb.float(), dim=-1) if self.config.normalize else emb.float()

    def forward(self, batch: dict[str, torch.Tensor], return_hidden: bool = False
                ) -> EncoderOutput:
        hidden = self.hidden_states(batch)  # [B, T, H]
        emb = self.pool(hidden, batch["input_ids"])  # [B, H]
        return EncoderOutput(emb, batch["attention_mask"].sum(1),
                             hidden if return_hidden else None, batch["input_ids"],
                             batch["attention_mask"])

    def embed(self, inputs: list[EmbedInput], mode: Mode = "direct",
              return_hidden: bool = False) -> EncoderOutput:
        """One batch through the model, with graph (training) or without (under no_grad)."""
        batch = self.tokenize(self.prompts(inputs, mode), [x.images for x in inputs])
        return self(batch, return_hidden=return_hidden)

    @torch.no_grad()
    def encode(self, inputs: list[EmbedInput], batch_size: int = 32, mode: Mode = "direct",
               show_progress: bool | None = None) -> EncoderOutput:
        """Embed many inputs in length-sorted batches; returns them in the input order."""
        from tqdm.auto import tqdm

        was_training = self.model.training
        self.model.eval()
        order = sorted(range(len(inputs)), key=lambda i: (len(inputs[i].images),
                                                          len(inputs[i].text)))
        embs: list[torch.Tensor | None] = [None] * len(inputs)
        ntok: list[int] = [0] * len(inputs)
        show = show_progress if show_progress is not None else len(inputs) > 10 * batch_size
        try:
            for s in tqdm(range(0, len(order), batch_size), disable=not show, desc="embed",
                          unit="batch"):
                idx = order[s:s + batch_size]
                out = self.embed([inputs[i] for i in idx], mode)
                for j, i in enumerate(idx):
                    embs[i] = out.embeddings[j].cpu()
                    ntok[i] = int(out.n_tokens[j])
        finally:
            self.model.train(was_training)
        if not inputs:
            return EncoderOutput(torch.zeros(0, self.hidden_size), torch.zeros(0, dtype=torch.long))
        return EncoderOutput(torch.stack(embs), torch.tensor(ntok))


def _refuse_other_config(path: Path | str, saved: EmbeddingConfig | None,
                         expect: EmbeddingConfig | None) -> None:
    """A checkpoint trained with other markup or pooling would embed differently from what
    the caller scores against: refuse it, naming the differing keys."""
    if expect is None or saved is None or saved == expect:
        return
    diff = {k: (v, getattr(expect, k)) for k, v in saved.model_dump().items()
            if getattr(expect, k) != v}
    raise EmbeddingConfigMismatch(
        f"{path}/{EMBEDDING_CONFIG_FILE}: saved embedding config differs from the requested "
        f"one in {diff} (saved, requested); evaluate with the config the checkpoint was "
        "trained with")


def _add_missing_tokens(path, model, processor, cfg: EmbeddingConfig,
                        add_special_tokens: bool | None, init: str, round_to) -> None:
    """Give a base without the method's tokens (a hub folder) the rows prepare would give
    it on disk; ``add_special_tokens``: None warns, False refuses, True is silent."""
    import warnings

    from mmemb.model import loading

    missing = loading.missing_tokens(processor.tokenizer, cfg)
    if not missing:
        return
    if add_special_tokens is False:
        raise ValueError(f"{path}: tokenizer lacks special tokens {missing}; run the prepare "
                         "stage on it (prepare.source: existing) or load with "
                         "add_special_tokens=True")
    if add_special_tokens is None:
        warnings.warn(f"{path}: tokenizer lacks {missing}; added in memory (init {init!r}) "
                      "the way the prepare stage adds them. Prepare the base once "
                      "(prepare.source: existing) to keep the rows stable across stages",
                      stacklevel=3)
    loading.add_method_tokens(model, processor.tokenizer, cfg, init=init, round_to=round_to)


def cast_state_dict(state: dict[str, torch.Tensor], dtype: torch.dtype
                    ) -> dict[str, torch.Tensor]:
    """``state`` with floating tensors cast to ``dtype``, for saving in another dtype.

    Costs one copy of the weights in the target dtype (a deep copy of the model would cost
    a full extra model first). Tensors that share storage (tied input/output embeddings)
    stay shared, so ``save_pretrained`` still recognises and drops the tied copy.
    """
    cast: dict[tuple[int, torch.dtype, tuple], torch.Tensor] = {}
    out = {}
    for name, t in state.items():
        if not t.is_floating_point() or t.dtype == dtype:
            out[name] = t
            continue
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key not in cast:
            cast[key] = t.detach().to(dtype)
        out[name] = cast[key]
    return out


def _record_dtype(config_file: Path, dtype: torch.dtype) -> None:
    """Write ``dtype`` as the checkpoint's dtype in its ``config.json`` (top level and every
    sub-config that names one), so loaders and :func:`loading.source_dtype` see what the
    weights are stored in."""

    from data_contracts.files import atomic_write_json

    cfg = json.loads(config_file.read_text())
    name = str(dtype).removeprefix("torch.")
    for d in (cfg, *(v for v in cfg.values() if isinstance(v, dict))):
        for key in ("dtype", "torch_dtype"):
            if key in d:
                d[key] = name
    atomic_write_json(config_file, cfg)
