"""Registry of evaluation tasks.

The MMEB-V2 list is written out by hand (from /work/shared/MMEB-FORMATS.md) rather than read
from the benchmark's configs so a missing or renamed task fails loudly at import instead of
silently shifting the task-weighted overall score. Other suites (the synthetic benchmark) are
added at run time with `register_suite`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass

MODALITIES = ("image", "video", "visdoc")
CATEGORIES = {
    "image": ("CLS", "QA", "RET", "GD"),
    "video": ("CLS", "QA", "RET", "MRET"),
    "visdoc": ("ViDoRe-v1", "ViDoRe-v2", "VisRAG", "OOD"),
}
RANKINGS = ("local", "global")
_METRIC_RE = re.compile(r"^(hit|ndcg)@[1-9]\d*$")
DEFAULT_SUITE = "mmeb-v2"


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark task; frozen so a spec can be shared and used as a dict key safely.

    `ranking` is "local" when each query ranks its own candidate list and "global" when it ranks
    the whole corpus; the two give very different scores for the same embeddings, so loaders
    must follow it.
    """

    name: str
    modality: str
    category: str
    metric: str
    ranking: str
    suite: str = DEFAULT_SUITE

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"{self.name}: modality {self.modality!r} not in {MODALITIES}")
        # Other suites may define their own categories; MMEB-V2 must match the paper's table.
        if self.suite == DEFAULT_SUITE and self.category not in CATEGORIES[self.modality]:
            raise ValueError(
                f"{self.name}: category {self.category!r} not in {CATEGORIES[self.modality]}"
            )
        if not _METRIC_RE.match(self.metric):
            raise ValueError(f"{self.name}: metric {self.metric!r} is not hit@k or ndcg@k")
        if self.ranking not in RANKINGS:
            raise ValueError(f"{self.name}: ranking {self.ranking!r} not in {RANKINGS}")


_SUITES: dict[str, dict[str, TaskSpec]] = {}


def register_suite(name: str, specs: Iterable[TaskSpec], replace: bool = False) -> None:
    """Add a suite; refuses to overwrite one unless asked, so two modules can't silently race."""
    if name in _SUITES and not replace:
        raise ValueError(f"suite {name!r} is already registered (pass replace=True)")
    table: dict[str, TaskSpec] = {}
    for spec in specs:
        if spec.suite != name:
            raise ValueError(f"task {spec.name!r} has suite {spec.suite!r}, expected {name!r}")
        if spec.name in table:
            raise ValueError(f"duplicate task {spec.name!r} in suite {name!r}")
        table[spec.name] = spec
    if not table:
        raise ValueError(f"suite {name!r} has no tasks")
    _SUITES[name] = table


def suites() -> list[str]:
    return list(_SUITES)


def _suite(suite: str) -> dict[str, TaskSpec]:
    if suite not in _SUITES:
        raise ValueError(f"unknown suite {suite!r}; valid choices: {', '.join(_SUITES)}")
    return _SUITES[suite]


def _unknown(kind: str, bad: list[str], valid: Iterable[str]) -> ValueError:
    valid = list(valid)
    hints = [m for b in bad for m in difflib.get_close_matches(b, valid, n=1)]
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    return ValueError(
        f"unknown {kind} {', '.join(map(repr, bad))}{hint}; valid choices: {', '.join(valid)}"
    )


def get_task(name: str, suite: str = DEFAULT_SUITE) -> TaskSpec:
    table = _suite(suite)
    if name not in table:
        raise _unknown("task", [name], table)
    return table[name]


def _as_list(value: str | Iterable[str] | None) -> list[str] | None:
    # A bare string would otherwise be iterated character by character.
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def select_tasks(
    suite: str = DEFAULT_SUITE,
    names: str | Iterable[str] | None = None,
    categories: str | Iterable[str] | None = None,
    modalities: str | Iterable[str] | None = None,
) -> list[TaskSpec]:
    """Filters combine with AND and keep registry order, so overall scores are reproducible.

    A category name such as "CLS" matches in every modality that has it; combine with
    `modalities` to narrow it. Unknown values raise rather than select nothing, because an
    empty selection would otherwise look like a finished (and perfect) evaluation.
    """
    table = _suite(suite)
    specs = list(table.values())
    names_, cats, mods = _as_list(names), _as_list(categories), _as_list(modalities)
    if names_ is not None:
        if bad := [n for n in names_ if n not in table]:
            raise _unknown("task", bad, table)
        specs = [s for s in specs if s.name in set(names_)]
    if cats is not None:
        valid = list(dict.fromkeys(s.category for s in table.values()))
        if bad := [c for c in cats if c not in valid]:
            raise _unknown("category", bad, valid)
        specs = [s for s in specs if s.category in cats]
    if mods is not None:
        valid = list(dict.fromkeys(s.modality for s in table.values()))
        if bad := [m for m in mods if m not in valid]:
            raise _unknown("modality", bad, valid)
        specs = [s for s in specs if s.modality in mods]
    return specs


_IMAGE = {
    "CLS": "ImageNet-1K N24News HatefulMemes VOC2007 SUN397 Place365 ImageNet-A ImageNet-R "
    "ObjectNet Country211",
    "QA": "OK-VQA A-OKVQA DocVQA InfographicsVQA ChartQA Visual7W ScienceQA VizWiz GQA TextVQA",
    "RET": "VisDial CIRR VisualNews_t2i VisualNews_i2t MSCOCO_t2i MSCOCO_i2t NIGHTS WebQA "
    "FashionIQ Wiki-SS-NQ OVEN EDIS",
    "GD": "MSCOCO RefCOCO RefCOCO-Matching Visual7W-Pointing",
}
_VIDEO = {
    "CLS": "K700 SmthSmthV2 HMDB51 UCF101 Breakfast",
    "QA": "MVBench Video-MME NExTQA EgoSchema ActivityNetQA",
    "RET": "DiDeMo MSR-VTT MSVD VATEX YouCook2",
    "MRET": "QVHighlight Charades-STA MomentSeeker",
}
_VIDEO_GLOBAL = {
    "HMDB51",
    "UCF101",
    "K700",
    "Breakfast",
    "MSR-VTT",
    "MSVD",
    "DiDeMo",
    "YouCook2",
    "VATEX",
}
_VIDEO_LOCAL = {
    "SmthSmthV2",
    "QVHighlight",
    "Charades-STA",
    "MomentSeeker",
    "Video-MME",
    "NExTQA",
    "EgoSchema",
    "MVBench",
    "ActivityNetQA",
}
_SYN = "ViDoRe_syntheticDocQA_"
_VISDOC = {
    "ViDoRe-v1": f"ViDoRe_arxivqa ViDoRe_docvqa ViDoRe_infovqa ViDoRe_tabfquad ViDoRe_tatdqa "
    f"ViDoRe_shiftproject {_SYN}artificial_intelligence {_SYN}energy "
    f"{_SYN}government_reports {_SYN}healthcare_industry",
    "ViDoRe-v2": "ViDoRe_esg_reports_human_labeled_v2 ViDoRe_biomedical_lectures_v2_multilingual "
    "ViDoRe_economics_reports_v2_multilingual ViDoRe_esg_reports_v2_multilingual",
    "VisRAG": "VisRAG_ArxivQA VisRAG_ChartQA VisRAG_MP-DocVQA VisRAG_SlideVQA VisRAG_InfoVQA "
    "VisRAG_PlotQA",
    "OOD": "ViDoSeek-page ViDoSeek-doc MMLongBench-page MMLongBench-doc",
}


def _mmeb_v2() -> list[TaskSpec]:
    specs = [
        TaskSpec(n, "image", c, "hit@1", "local") for c, ns in _IMAGE.items() for n in ns.split()
    ]
    specs += [
        TaskSpec(n, "video", c, "hit@1", "global" if n in _VIDEO_GLOBAL else "local")
        for c, ns in _VIDEO.items()
        for n in ns.split()
    ]
    specs += [
        TaskSpec(n, "visdoc", c, "ndcg@5", "global")
        for c, ns in _VISDOC.items()
        for n in ns.split()
    ]
    return specs


register_suite(DEFAULT_SUITE, _mmeb_v2())


def _check_mmeb_v2() -> None:
    specs = list(_SUITES[DEFAULT_SUITE].values())
    count = {m: sum(s.modality == m for s in specs) for m in MODALITIES}
    assert count == {"image": 36, "video": 18, "visdoc": 24} and len(specs) == 78, count
    image = {c: sum(s.modality == "image" and s.category == c for s in specs) for c in _IMAGE}
    assert image == {"CLS": 10, "QA": 10, "RET": 12, "GD": 4}, image
    video = {s.name for s in specs if s.modality == "video"}
    assert video == _VIDEO_GLOBAL | _VIDEO_LOCAL and not _VIDEO_GLOBAL & _VIDEO_LOCAL


_check_mmeb_v2()
