"""Teachers write candidate rationales (stage 1): vLLM, the transformers fallback, the oracle.

:func:`make_teacher` builds one from its config entry; heavy imports (vLLM, transformers)
happen only for the backend asked for.
"""

from __future__ import annotations

from mmemb.teachers.base import (
    PROMPT_TEMPLATES,
    RESERVED_TOKENS,
    Candidate,
    GenRequest,
    PromptBudget,
    Teacher,
    TeacherInfo,
    request_seed,
)

__all__ = ["PROMPT_TEMPLATES", "RESERVED_TOKENS", "Candidate", "GenRequest", "PromptBudget",
           "Teacher", "TeacherInfo", "close_engine", "engine_key", "make_teacher",
           "request_seed", "start_engine", "teacher_info"]


def teacher_info(cfg, seed: int) -> TeacherInfo:
    """What every row of this teacher records: id, backend, model, K and sampling (every
    knob the backend is given, and ``think_output``: how ``text`` was cut from a sample)."""
    if cfg.backend == "oracle":
        sampling = {"n": cfg.k, "shares": dict(sorted(cfg.shares.items())), "seed": seed}
    else:
        s = cfg.sampling
        sampling = {"n": cfg.k, "temperature": s.temperature, "top_p": s.top_p,
                    "top_k": s.top_k, "min_p": s.min_p,
                    "repetition_penalty": s.repetition_penalty, "max_tokens": s.max_tokens,
                    "stop": list(s.stop), "seed": seed, "think_output": cfg.think_output}
    return TeacherInfo(cfg.id, cfg.backend, cfg.model, cfg.k, sampling)


def engine_key(cfg, seed: int) -> tuple | None:
    """Identity of the engine a teacher needs (None: it needs none). Equal keys share one."""
    if cfg.backend == "vllm":
        from mmemb.teachers.vllm import engine_key as vllm_key

        return vllm_key(cfg, seed)
    if cfg.backend == "hf":
        return ("hf", cfg.model, cfg.dtype, cfg.device)
    return None


def start_engine(cfg, seed: int, max_images: int = 1, log=print):
    """Start the engine of a vllm teacher (``vllm.LLM``) or load an hf teacher's model."""
    if cfg.backend == "vllm":
        from mmemb.teachers.vllm import start_engine as start_vllm

        return start_vllm(cfg, seed, max_images=max_images, log=log)
    if cfg.backend == "hf":
        from mmemb.teachers.hf import load_model

        return load_model(cfg, log=log)
    return None


def close_engine(engine) -> None:
    """Free an engine from :func:`start_engine` (vLLM's processes are shut down)."""
    if engine is None:
        return
    if type(engine).__name__ == "LLM":
        from mmemb.teachers.vllm import close_engine as close_vllm

        close_vllm(engine)


def make_teacher(cfg, seed: int, engine=None, log=print) -> Teacher:
    """The teacher of ``cfg`` (a :class:`mmemb.configs.generate.TeacherConfig`) on ``engine``
    (from :func:`start_engine`; started here when not given)."""
    info = teacher_info(cfg, seed)
    if cfg.backend == "oracle":
        from mmemb.teachers.oracle import OracleTeacher

        tok = None
        if cfg.model:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(cfg.model)
        return OracleTeacher(info, cfg.shares, seed=seed, tokenizer=tok)
    if engine is None:
        engine = start_engine(cfg, seed, log=log)
    if cfg.backend == "hf":
        from mmemb.teachers.hf import HFTeacher

        return HFTeacher(info, cfg, seed, engine, log=log)
    if cfg.backend == "vllm":
        from mmemb.teachers.vllm import VLLMTeacher

        return VLLMTeacher(info, cfg, engine, log=log)
    raise ValueError(f"unknown teacher backend {cfg.backend!r}; use vllm, hf or oracle")
