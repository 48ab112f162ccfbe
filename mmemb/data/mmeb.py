"""Loaders that turn a local MMEB download into the project's contracts.

* MMEB-train (``TIGER-Lab/MMEB-train``, one folder per subset, files
  ``<Subset>/<split>-00000-of-00001.parquet``) -> ``PAIRS``.
* MMEB-V2 eval (the layout of the benchmark's own download, see ``docs/evaluation.md``)
  -> ``EVAL_ROWS`` plus, for globally ranked tasks, ``EVAL_CORPUS``.

Decisions (each documented in ``docs/evaluation.md``):

* **Paths.** Every image/frame path in the produced rows is relative to the MMEB root
  (``image-tasks/...``, ``video-tasks/frames/...``) or absolute (the visdoc image cache),
  so one ``image_root`` (the root) serves all 78 tasks.
* **Video.** A video is its frame folder: ``qry_img_path`` / ``tgt_img_path`` /
  ``cand_img_path`` hold the *folder* (the benchmark ships 8+ pre-extracted frames per
  video). :func:`media_files` expands a folder into ``num_frames`` uniformly sampled frame
  files (the benchmark's ``linspace`` sampling), which the embedder receives as a
  multi-image input. Storing the folder keeps the contract one string per item and lets
  ``num_frames`` change without reloading.
* **``<|image_1|>``** stays in the instruction fields; :func:`mmemb.model.prompts.user_content`
  replaces it with the backbone's image slot. MMEB-train's ``qry`` (instruction and text
  in one string, no reliable separator) is kept whole as ``qry_inst`` with ``qry_text``
  empty: the prompt is then byte-identical to the benchmark's. A positive whose text carries
  the marker goes to ``pos_inst`` for the same reason; text-only positives (labels,
  captions) stay in ``pos_text``, where the later stages read target text.
* **Candidates.** Image and local video tasks: the first candidate is the positive
  (``tgt_rel = [1, 0, ...]``); tasks that have several positives (moment retrieval) mark
  each. Global tasks: ``tgt_id``/``tgt_rel`` list the relevant corpus items (graded for
  visdoc qrels, score > 0 kept, the higher grade wins on duplicates as in the benchmark)
  and the corpus is the whole candidate set: visdoc's ``corpus`` subset, or for global
  video tasks the union of every row's targets (the benchmark's own construction).

Every error names the task and the file (and row where there is one) and says how to fix it.
"""

from __future__ import annotations

import argparse
import hashlib
import io as _bio
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts import io
from data_contracts.files import json_digest, sha256_file
from data_contracts.io import ContractError
from data_contracts.schemas import EVAL_CORPUS, EVAL_ROWS, PAIRS
from mmemb.eval.tasks import DEFAULT_SUITE, TaskSpec, select_tasks
from mmemb.model.prompts import IMAGE_MARKER

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")
NUM_FRAMES = 8


class MMEBFormatError(ContractError):
    """A file of the MMEB download that is missing or not in the benchmark's layout."""

    def __init__(self, task: str, file: str | Path, message: str, *, column: str | None = None,
                 row: int | None = None, fix: str | None = None):
        self.task = task
        super().__init__(file, f"task {task!r}: {message}", column=column, row=row, fix=fix)


class MMEBMissingError(MMEBFormatError):
    """A file or folder of the download is absent (not malformed): what ``skip_missing``
    skips. ``what`` names the missing thing in one short phrase."""

    def __init__(self, task: str, file: str | Path, message: str, **kw):
        self.what, self.reason = str(file), message
        super().__init__(task, file, message, **kw)


# --------------------------------------------------------------------------- files

def find_split_files(folder: Path, subset: str | None, split: str, task: str) -> list[Path]:
    """The data files of one (subset, split) of a locally downloaded HF dataset.

    Looks where ``huggingface-cli download --local-dir`` and ``git clone`` put them:
    ``<subset>/<split>-*.parquet`` (a dataset with configs), ``data/<split>-*.parquet``
    (the default config), or ``<split>.parquet|jsonl|json`` at either level.
    """
    base = folder / subset if subset else folder
    bases = [base, base / "data"]
    found: list[Path] = []
    for b in bases:
        for pat in (f"{split}-*.parquet", f"{split}.parquet", f"{split}/*.parquet",
                    f"{split}-*.jsonl", f"{split}.jsonl", f"{split}.json"):
            found += sorted(b.glob(pat))
        if found:
            return found
    where = base if base.is_dir() else folder
    fix = (f"download the dataset so that {base}/{split}-*.parquet (or data/{split}-*.parquet) "
           "exists; see docs/evaluation.md for the commands")
    if not folder.is_dir():
        raise MMEBMissingError(task, folder, "folder does not exist.", fix=fix)
    raise MMEBMissingError(task, where, f"no '{split}' split files (looked for {split}-*.parquet, "
                          f"{split}.parquet/.jsonl/.json, also under data/).", fix=fix)


def _iter_records(files: list[Path], task: str, required: Iterable[str],
                  batch_rows: int = 256) -> Iterator[tuple[Path, int, dict]]:
    """Yield ``(file, row_in_file, record)``, streaming Parquet in batches (visdoc corpora
    hold page images as bytes: reading a whole file at once can need gigabytes)."""
    required = list(required)
    for f in files:
        if f.suffix == ".parquet":
            try:
                pf = pq.ParquetFile(f)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
                raise MMEBFormatError(task, f, f"not a readable Parquet file ({type(e).__name__}: "
                                      f"{e}).", fix="re-download the file; it is truncated or "
                                      "not Parquet") from e
            _check_required(task, f, pf.schema_arrow.names, required)
            i = 0
            try:
                for batch in pf.iter_batches(batch_size=batch_rows):
                    for rec in batch.to_pylist():
                        yield f, i, rec
                        i += 1
            except (OSError, pa.ArrowException) as e:
                raise MMEBFormatError(task, f, f"Parquet data cannot be read at row {i} "
                                      f"({type(e).__name__}: {e}).",
                                      fix="re-download the file") from e
        else:
            yield from _iter_json(f, task, required)


def _iter_json(f: Path, task: str, required: list[str]) -> Iterator[tuple[Path, int, dict]]:
    """Records of one JSON (array) or JSON Lines file with their row numbers, so a bad
    record is reported by file, row and missing column."""
    try:
        text = f.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MMEBFormatError(task, f, f"cannot be read as UTF-8 text ({e}).") from e
    if f.suffix == ".json" and text.lstrip().startswith("["):
        try:
            recs = json.loads(text)
        except json.JSONDecodeError as e:
            raise MMEBFormatError(task, f, f"invalid JSON at line {e.lineno}: {e.msg}.") from e
        lines = list(enumerate(recs))
    else:
        lines = []
        for n, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                lines.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise MMEBFormatError(task, f, f"line {n + 1} is not valid JSON ({e.msg}).",
                                      row=n, fix="one JSON object per line (JSON Lines)") from e
    checked = False
    for i, (n, rec) in enumerate(lines):
        if not isinstance(rec, dict):
            raise MMEBFormatError(task, f, f"record {n} is a {type(rec).__name__}, not an object.",
                                  row=n)
        if not checked:
            _check_required(task, f, list(rec), required)
            checked = True
        yield f, i, rec


def _check_required(task: str, f: Path, names: list[str], required: list[str]) -> None:
    missing = [c for c in required if c not in names]
    if missing:
        raise MMEBFormatError(task, f, f"missing column(s) {missing}; the file has {names}.",
                              column=missing[0], fix="this file is not in the benchmark's layout "
                              "for this task; re-download it (docs/evaluation.md)")


# --------------------------------------------------------------------------- frames

def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def list_frames(folder: str | Path) -> list[Path]:
    """Image files of a frame folder in natural order (``frame_2`` before ``frame_10``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = [n for n in os.listdir(folder) if Path(n).suffix.lower() in FRAME_EXTENSIONS]
    return [folder / n for n in sorted(names, key=_natural_key)]


def sample_frames(frames: list, num_frames: int | None = NUM_FRAMES, pad: bool = True) -> list:
    """``num_frames`` uniformly spaced frames (first and last included; ``linspace`` indices,
    which repeat frames when a video has fewer, so every video gives the model the same
    number of images). ``pad=False`` passes a shorter video's frames as they are, and
    ``num_frames=None`` every frame: the official ``process_video_frames`` / MomentSeeker's
    ``load_frames`` (``src/utils/vision_utils/vision_utils.py``)."""
    if not frames or (num_frames is not None and num_frames <= 0):
        return []
    if num_frames is None or (not pad and len(frames) < num_frames):
        return list(frames)
    idx = np.linspace(0, len(frames) - 1, num_frames).astype(int)  # [num_frames]
    return [frames[i] for i in idx]


def media_files(path: str | None, image_root: str | Path | None = None,
                num_frames: int | None = NUM_FRAMES, pad: bool = True) -> list[str]:
    """The image files one contract path stands for: ``[]`` (no media), ``[image]``, or the
    sampled frames of a frame folder (a video; see :func:`sample_frames`)."""
    if not path:
        return []
    p = Path(image_root) / path if image_root else Path(path)
    if p.is_dir():
        frames = list_frames(p)
        if not frames:
            raise ValueError(f"frame folder {str(p)!r} holds no {'/'.join(FRAME_EXTENSIONS)} "
                             "files; re-extract the frames of this video")
        return [str(f) for f in sample_frames(frames, num_frames, pad)]
    return [str(p)]


# --------------------------------------------------------------------------- sources

@dataclass(frozen=True)
class Source:
    """Where one MMEB-V2 task lives under the root and which parser reads it."""

    parser: str
    data: str  # folder (relative to the root) of the annotation dataset
    subset: str | None
    split: str
    frames: str | None = None  # video: frame folder root, relative to the MMEB root
    hf_repo: str | None = None  # where users download ``data`` from (docs)
    instruction: str = ""
    official_rows: int | None = None  # official: only the first N rows (SmthSmthV2)
    image_parser: str | None = None  # image tasks: the official parser (cls, qa, i2t, ...)


_VQA_PROMPT = ("Given a video and a question, select the most accurate answer from the "
               "provided candidates. Return only the exact text of your chosen answer.")
_VID_TGT = "Understand the content of the provided video."
_CLIP_TGT = "Understand the content of the provided video clip."  # MomentSeeker, official
#: Official parser of each image task (``experiments/public/eval/image.yaml``): cls, qa and
#: i2t embed the bare candidate text (no ``tgt_inst``); their candidates are named by text.
_IMAGE_PARSER = {
    **dict.fromkeys("ImageNet-1K N24News HatefulMemes VOC2007 SUN397 Place365 ImageNet-A "
                    "ImageNet-R ObjectNet Country211".split(), "cls"),
    **dict.fromkeys("OK-VQA A-OKVQA DocVQA InfographicsVQA ChartQA Visual7W ScienceQA VizWiz "
                    "GQA TextVQA".split(), "qa"),
    **dict.fromkeys("MSCOCO_i2t VisualNews_i2t".split(), "i2t"),
    **dict.fromkeys("VisDial MSCOCO_t2i VisualNews_t2i WebQA EDIS Wiki-SS-NQ".split(), "t2i"),
    **dict.fromkeys("CIRR NIGHTS OVEN FashionIQ MSCOCO RefCOCO RefCOCO-Matching "
                    "Visual7W-Pointing".split(), "i2i_vg"),
}
_DOC_QRY = "Find a document image that matches the given query:"
_DOC_TGT = "Understand the content of the provided document image."


def _image_sources() -> dict[str, Source]:
    return {s.name: Source("image", "image-tasks", s.name, "test",
                           hf_repo="ziyjiang/MMEB_Test_Instruct",
                           image_parser=_IMAGE_PARSER.get(s.name))
            for s in select_tasks(DEFAULT_SUITE, modalities="image")}


def _video_sources() -> dict[str, Source]:
    """Where each MMEB-V2 video task's annotations and frames live in the download."""
    vc, vr, vm, vq = ("video-tasks/frames/video_cls", "video-tasks/frames/video_ret",
                      "video-tasks/frames/video_mret", "video-tasks/frames/video_qa")

    def v(parser, name, data, subset, split, frames, inst=""):
        return name, Source(parser, f"video-tasks/{data}", subset, split, frames,
                            f"VLM2Vec/{data}", inst,
                            official_rows=1000 if name == "SmthSmthV2" else None)

    return dict([
        v("video_cls", "K700", "Kinetics-700", None, "test", f"{vc}/K700",
          "Recognize the category of the video content."),
        v("ssv2", "SmthSmthV2", "SmthSmthV2", None, "test", f"{vc}/SSv2",
          "What actions or object interactions are being performed by the person in the "
          "video?"),
        v("video_cls", "HMDB51", "HMDB51", None, "test", f"{vc}/HMDB51",
          "What actions or objects interactions are the person in the video doing?"),
        v("video_cls", "UCF101", "UCF101", None, "test", f"{vc}/UCF101",
          "What activities or sports are being performed by the person in the video?"),
        v("video_cls", "Breakfast", "Breakfast", None, "test", f"{vc}/Breakfast",
          "Recognize the breakfast type that the person is cooking in the video."),
        v("videomme", "Video-MME", "Video-MME", None, "test", f"{vq}/Video-MME", _VQA_PROMPT),
        v("nextqa", "NExTQA", "NExTQA", "MC", "test", f"{vq}/NExTQA", _VQA_PROMPT),
        v("egoschema", "EgoSchema", "EgoSchema", "Subset", "test", f"{vq}/EgoSchema",
          _VQA_PROMPT),
        v("mvbench", "MVBench", "MVBench", "*", "train", f"{vq}/MVBench", _VQA_PROMPT),
        v("activitynetqa", "ActivityNetQA", "ActivityNetQA", None, "test",
          f"{vq}/ActivityNetQA", _VQA_PROMPT),
        v("msrvtt", "MSR-VTT", "MSR-VTT", "test_1k", "test", f"{vr}/MSR-VTT",
          "Find a video that contains the following visual content:"),
        v("msvd", "MSVD", "MSVD", None, "test", f"{vr}/MSVD",
          "Find the video snippet that corresponds to the given summary:"),
        v("didemo", "DiDeMo", "DiDeMo", None, "test", f"{vr}/DiDeMo",
          "Find a video that includes the following described scenes:"),
        v("vatex", "VATEX", "VATEX", None, "test", f"{vr}/VATEX",
          "Select a video that fits the description provided:"),
        v("youcook2", "YouCook2", "YouCook2", None, "val", f"{vr}/YouCook2",
          "Find a video that demonstrates the following action while making a recipe:"),
        v("moment", "QVHighlight", "QVHighlight", None, "test", f"{vm}/QVHighlight",
          "Find the clip that corresponds to the described scene in the given video:"),
        v("moment", "Charades-STA", "Charades-STA", None, "test", f"{vm}/Charades_STA",
          "Find the clip that corresponds to the described scene in the given video:"),
        v("momentseeker", "MomentSeeker", "MomentSeeker", None, "test",
          f"{vm}/MomentSeeker"),
    ])


def _visdoc_sources() -> dict[str, Source]:
    """Where each MMEB-V2 visual-document task (ViDoRe, VisRAG, ...) lives in the
    download: their corpus, queries and qrels are separate files (BEIR layout)."""
    out = {}
    vid = ("arxivqa_test_subsampled_beir docvqa_test_subsampled_beir infovqa_test_subsampled_beir "
           "tabfquad_test_subsampled_beir tatdqa_test_beir shiftproject_test_beir "
           "syntheticDocQA_artificial_intelligence_test_beir syntheticDocQA_energy_test_beir "
           "syntheticDocQA_government_reports_test_beir "
           "syntheticDocQA_healthcare_industry_test_beir").split()
    for d in vid:
        name = "ViDoRe_" + d.replace("_test_subsampled_beir", "").replace("_test_beir", "")
        out[name] = Source("visdoc", f"visdoc-tasks/{d}", None, "test", hf_repo=f"vidore/{d}")
    for name, d in (("ViDoRe_esg_reports_human_labeled_v2", "esg_reports_human_labeled_v2"),
                    ("ViDoRe_biomedical_lectures_v2_multilingual", "biomedical_lectures_v2"),
                    ("ViDoRe_economics_reports_v2_multilingual", "economics_reports_v2"),
                    ("ViDoRe_esg_reports_v2_multilingual", "esg_reports_v2")):
        out[name] = Source("visdoc", f"visdoc-tasks/{d}", None, "test", hf_repo=f"vidore/{d}")
    for n in "ArxivQA ChartQA MP-DocVQA SlideVQA InfoVQA PlotQA".split():
        out[f"VisRAG_{n}"] = Source("visdoc", f"visdoc-tasks/VisRAG-Ret-Test-{n}", None, "train",
                                    hf_repo=f"openbmb/VisRAG-Ret-Test-{n}")
    for name, d, repo in (("ViDoSeek-page", "ViDoSeek-page", "ViDoSeek-page-fixed"),
                          ("ViDoSeek-doc", "ViDoSeek", "ViDoSeek"),
                          ("MMLongBench-page", "MMLongBench", "MMLongBench-page-fixed"),
                          ("MMLongBench-doc", "MMLongBench-doc", "MMLongBench-doc")):
        out[name] = Source("visdoc", f"visdoc-tasks/{d}", None, "test", hf_repo=f"VLM2Vec/{repo}")
    return out


#: task name -> where it lives; covers exactly the 78 registered MMEB-V2 tasks.
SOURCES: dict[str, Source] = {**_image_sources(), **_video_sources(), **_visdoc_sources()}
assert set(SOURCES) == {s.name for s in select_tasks(DEFAULT_SUITE)}, \
    sorted(set(SOURCES) ^ {s.name for s in select_tasks(DEFAULT_SUITE)})


# --------------------------------------------------------------------------- results

@dataclass
class LoadedEval:
    """Eval rows and corpus of the selected tasks, ready for ``io.write``."""

    rows: pa.Table  # EVAL_ROWS
    corpus: pa.Table  # EVAL_CORPUS (empty when no task is global)
    image_root: Path
    tasks: list[str]
    missing: dict[str, str]  # task -> why it was skipped (skip_missing=True only)
    digests: dict[str, str] = field(default_factory=dict)  # task -> its annotation files' digest


def _row(spec: TaskSpec, row_id: str, qry_inst: str, qry_text: str, qry_img: str,
         tgt_inst: str, tgt_text: list[str], tgt_img: list[str], tgt_rel: list[float],
         tgt_id: list[str] | None = None) -> dict:
    return {"row_id": row_id, "task": spec.name, "suite": spec.suite, "category": spec.category,
            "modality": spec.modality, "metric": spec.metric, "qry_inst": qry_inst,
            "qry_text": qry_text, "qry_img_path": qry_img, "tgt_inst": tgt_inst,
            "tgt_id": tgt_id if tgt_id is not None else [f"c{j}" for j in range(len(tgt_text))],
            "tgt_text": tgt_text, "tgt_img_path": tgt_img, "tgt_rel": tgt_rel, "family": None}


def _join(prefix: str, p: str | None) -> str:
    return f"{prefix.rstrip('/')}/{p.lstrip('/')}" if p else ""


class _Ctx:
    """Per-task loading context: root, spec, source, and existence checks with good errors."""

    def __init__(self, root: Path, spec: TaskSpec, src: Source, num_frames: int,
                 check_media: bool, max_queries: int | None, image_cache: Path,
                 protocol: str = "strict", log=print):
        self.root, self.spec, self.src = root, spec, src
        self.num_frames, self.check_media, self.max_queries = num_frames, check_media, max_queries
        self.image_cache = image_cache
        self.protocol, self.log = protocol, log
        self.read: set[Path] = set()  # annotation files read (the task's data digest)
        self._seen: set[str] = set()

    @property
    def official(self) -> bool:
        return self.protocol == "official"

    @property
    def task(self) -> str:
        return self.spec.name

    def files(self, subset: str | None = None, split: str | None = None) -> list[Path]:
        sub = self.src.subset if subset is None else subset
        found = find_split_files(self.root / self.src.data, sub, split or self.src.split,
                                 self.task)
        self.read.update(found)
        return found

    def records(self, required: Iterable[str], subset: str | None = None
                ) -> Iterator[tuple[Path, int, dict]]:
        """The task's records in file order, at most ``max_queries``; official, at most the
        task's ``official_rows`` (SmthSmthV2: the first 1,000, ``video.yaml``
        ``num_sample_per_subset`` applied by ``sample_dataset`` before mapping)."""
        limit = self.max_queries
        if self.official and self.src.official_rows is not None:
            limit = min(limit or self.src.official_rows, self.src.official_rows)
        n = 0
        for item in _iter_records(self.files(subset), self.task, required):
            if limit is not None and n >= limit:
                if limit != self.max_queries:
                    self.log(f"[mmeb] {self.task}: first {limit} rows (official)")
                return
            n += 1
            yield item

    def frames_dir(self, rel: str, f: Path, i: int, column: str) -> str:
        """Check a frame folder exists and holds frames; return it relative to the root."""
        path = _join(self.src.frames or "", rel)
        if self.check_media and path not in self._seen:
            full = self.root / path
            if not list_frames(full):
                what = "does not exist" if not full.is_dir() else "holds no frame images"
                raise MMEBMissingError(
                    self.task, f, f"frame folder {str(full)!r} {what}.", column=column, row=i,
                    fix=f"extract the video-tasks frame archives under {self.root}/"
                    f"{self.src.frames} (docs/evaluation.md)")
            self._seen.add(path)
        return path

    def image(self, rel: str, f: Path, i: int, column: str) -> str:
        if self.check_media and rel and rel not in self._seen:
            if not (self.root / rel).is_file():
                raise MMEBMissingError(self.task, f, f"image {str(self.root / rel)!r} does not "
                                      "exist.", column=column, row=i,
                                      fix="download and extract the image archives "
                                      "(docs/evaluation.md)")
            self._seen.add(rel)
        return rel


def _str(v) -> str:
    return "" if v is None else str(v)


def _list(v) -> list:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    return list(v)


# --------------------------------------------------------------------------- image tasks

def _load_image(ctx: _Ctx) -> tuple[list[dict], list[dict]]:
    """Image tasks (classification, VQA, retrieval, grounding): each row ranks its own
    candidate list, its first target the positive; an empty list is refused by row."""
    rows = []
    for f, i, r in ctx.records(["qry_text", "qry_img_path", "tgt_text"]):
        tgt_text = [_str(t) for t in _list(r["tgt_text"])]
        tgt_img = [_str(p) for p in _list(r.get("tgt_img_path"))] or [""] * len(tgt_text)
        if not tgt_text:
            raise MMEBFormatError(ctx.task, f, "empty candidate list (tgt_text).",
                                  column="tgt_text", row=i)
        if len(tgt_img) != len(tgt_text):
            raise MMEBFormatError(ctx.task, f, f"{len(tgt_text)} tgt_text but {len(tgt_img)} "
                                  "tgt_img_path entries.", column="tgt_img_path", row=i,
                                  fix="one image path (or '') per candidate")
        qry_img = ctx.image(_join("image-tasks", _str(r["qry_img_path"])), f, i,
                            "qry_img_path")
        tgt_img = [ctx.image(_join("image-tasks", p), f, i, "tgt_img_path") for p in tgt_img]
        # Official cls / qa / i2t parsers embed the bare candidate text (tgt_inst unread).
        bare = ctx.official and ctx.src.image_parser in ("cls", "qa", "i2t")
        rows.append(_row(ctx.spec, f"{i:06d}", _str(r.get("qry_inst")), _str(r["qry_text"]),
                         qry_img, "" if bare else _str(r.get("tgt_inst")), tgt_text, tgt_img,
                         [1.0] + [0.0] * (len(tgt_text) - 1)))
    if ctx.official:
        _official_identity(rows, _image_name(ctx.src.image_parser))
    return rows, []


def _image_name(parser: str | None):
    """The official candidate name of an image task's candidate (``cand_names`` of its
    parser): the image path (t2i), ``path:text`` (i2i / visual grounding) or the text."""
    if parser == "t2i":
        return lambda text, img: img
    if parser == "i2i_vg":
        return lambda text, img: f"{img}:{text.strip(chr(34))}"
    return lambda text, img: text


def _official_identity(rows: list[dict], name_of) -> None:
    """Candidates identified by name, as the official scorer does (``generate_cand_dataset``:
    one embedding per name, its first occurrence's; a hit is "a predicted name is a label
    name"): every candidate named like a positive of its row is relevant, and a later
    candidate of the task with an already-seen name takes the first one's text and image, so
    the harness embeds it once (same key) and a duplicate of the positive ties with it."""
    first: dict[str, tuple[str, str]] = {}
    for r in rows:
        names = [name_of(t, p) for t, p in zip(r["tgt_text"], r["tgt_img_path"], strict=True)]
        labels = {n for n, g in zip(names, r["tgt_rel"], strict=True) if g > 0}
        r["tgt_rel"] = [1.0 if n in labels else 0.0 for n in names]
        for j, n in enumerate(names):
            t, p = first.setdefault(n, (r["tgt_text"][j], r["tgt_img_path"][j]))
            r["tgt_text"][j], r["tgt_img_path"][j] = t, p


# --------------------------------------------------------------------------- visdoc

def _image_bytes(value, task: str, f: Path, i: int) -> tuple[bytes | None, str | None]:
    """(bytes, source path) of an HF ``Image`` cell (struct of bytes/path), or a path string."""
    if isinstance(value, dict):
        return value.get("bytes"), value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), None
    if isinstance(value, str):
        return None, value
    raise MMEBFormatError(task, f, f"corpus image is a {type(value).__name__}; expected an "
                          "image struct {bytes, path} or a path.", column="image", row=i)


def _safe_name(cid: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]", "_", cid)[:60]
    return f"{base}_{hashlib.md5(cid.encode()).hexdigest()[:8]}"


def _cache_image(ctx: _Ctx, cid: str, value, f: Path, i: int) -> str:
    """A corpus page image as a file path: embedded bytes are written once to the image
    cache under a name derived from the corpus id; a path is checked, not copied."""
    data, src_path = _image_bytes(value, ctx.task, f, i)
    if data is None:
        if not src_path:
            raise MMEBFormatError(ctx.task, f, f"corpus item {cid!r} has no image.",
                                  column="image", row=i)
        p = Path(src_path)
        cand = p if p.is_absolute() else (ctx.root / ctx.src.data / p)
        if ctx.check_media and not cand.is_file():
            raise MMEBFormatError(ctx.task, f, f"corpus image {str(cand)!r} does not exist.",
                                  column="image", row=i)
        return str(cand)
    from PIL import Image

    try:
        fmt = (Image.open(_bio.BytesIO(data)).format or "png").lower()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise MMEBFormatError(ctx.task, f, f"corpus item {cid!r}: image bytes cannot be "
                              f"decoded ({type(e).__name__}: {e}).", column="image", row=i,
                              fix="re-download the corpus file") from e
    ext = {"jpeg": "jpg"}.get(fmt, fmt)
    out = ctx.image_cache / ctx.task / f"{_safe_name(cid)}.{ext}"
    if not out.is_file():  # a rerun reuses the written pages
        from data_contracts.files import atomic_write_bytes

        atomic_write_bytes(out, data)
    return str(out.resolve())


def _load_visdoc(ctx: _Ctx) -> tuple[list[dict], list[dict]]:
    """A BEIR-layout task as (query rows, corpus rows): graded qrels per query, the
    corpus shared by every query (a global task)."""
    qrels: dict[str, dict[str, float]] = {}
    for f, i, r in _iter_records(ctx.files("qrels"), ctx.task,
                                 ["query-id", "corpus-id", "score"]):
        try:
            s = float(r["score"])
        except (TypeError, ValueError):
            raise MMEBFormatError(ctx.task, f, f"score {r['score']!r} is not a number.",
                                  column="score", row=i) from None
        if s > 0:  # the benchmark keeps positive grades only; the higher wins on duplicates
            q = qrels.setdefault(str(r["query-id"]), {})
            q[str(r["corpus-id"])] = max(q.get(str(r["corpus-id"]), 0.0), s)
    corpus: list[dict] = []
    ids: set[str] = set()
    for f, i, r in _iter_records(ctx.files("corpus"), ctx.task, ["corpus-id", "image"]):
        cid = str(r["corpus-id"])
        if cid in ids:
            raise MMEBFormatError(ctx.task, f, f"duplicate corpus-id {cid!r}.",
                                  column="corpus-id", row=i)
        ids.add(cid)
        corpus.append({"task": ctx.task, "cand_id": cid, "cand_inst": _DOC_TGT, "cand_text": "",
                       "cand_img_path": _cache_image(ctx, cid, r["image"], f, i)})
    path_of = {c["cand_id"]: c["cand_img_path"] for c in corpus}
    rows = []
    for f, i, r in ctx.records(["query-id", "query"], subset="queries"):
        qid = str(r["query-id"])
        rel = qrels.get(qid)
        if not rel:
            raise MMEBFormatError(ctx.task, f, f"query-id {qid!r} has no relevant document in "
                                  "qrels (score > 0).", column="query-id", row=i,
                                  fix="the queries and qrels files come from different "
                                  "downloads; re-download the dataset")
        unknown = [c for c in rel if c not in path_of]
        if unknown:
            raise MMEBFormatError(ctx.task, ctx.files("qrels")[0], f"qrels of query {qid!r} "
                                  f"name corpus-id(s) {unknown[:3]} absent from the corpus.",
                                  column="corpus-id", fix="re-download the corpus subset")
        cids = list(rel)
        rows.append(_row(ctx.spec, qid, _DOC_QRY, _str(r["query"]), "", _DOC_TGT,
                         [""] * len(cids), [path_of[c] for c in cids],
                         [rel[c] for c in cids], tgt_id=cids))
    if ctx.official:
        corpus = _official_corpus_order(rows, corpus)
    return rows, corpus


def _official_corpus_order(rows: list[dict], corpus: list[dict]) -> list[dict]:
    """The official candidate order of a global task (``generate_cand_dataset``): the rows'
    own candidates in query order, first occurrence, then the rest of the corpus in file
    order. It only matters for tied scores (a stable sort keeps it)."""
    by_id = {c["cand_id"]: c for c in corpus}
    first = list(dict.fromkeys(cid for r in rows for cid in r["tgt_id"]))
    seen = set(first)
    return [by_id[c] for c in first] + [c for c in corpus if c["cand_id"] not in seen]


# --------------------------------------------------------------------------- video

def _global_video(ctx: _Ctx, items: list[tuple[str, str, str, str, str, str, str]]
                  ) -> tuple[list[dict], list[dict]]:
    """Rows of a globally ranked video task from (row_id, qry_inst, qry_text, qry_img,
    cand_id, cand_text, cand_img) tuples; the corpus is the union of the targets."""
    rows, corpus, seen = [], [], {}
    tgt_inst = "" if ctx.src.parser == "video_cls" else _VID_TGT
    for row_id, qi, qt, qimg, cid, ctext, cimg in items:
        if cid not in seen:
            seen[cid] = (ctext, cimg)
            corpus.append({"task": ctx.task, "cand_id": cid, "cand_inst": tgt_inst,
                           "cand_text": ctext, "cand_img_path": cimg})
        rows.append(_row(ctx.spec, row_id, qi, qt, qimg, tgt_inst, [ctext], [cimg], [1.0],
                         tgt_id=[cid]))
    return rows, corpus


def _load_video_cls(ctx: _Ctx) -> tuple[list[dict], list[dict]]:
    items = []
    for f, i, r in ctx.records(["video_id", "pos_text"]):
        vid = _str(r["video_id"])
        label = _str(r["pos_text"])
        items.append((f"{i:06d}", ctx.src.instruction, "", ctx.frames_dir(vid, f, i, "video_id"),
                      label, label, ""))
    rows, corpus = _global_video(ctx, items)
    if ctx.official:
        corpus = _official_label_corpus(ctx, corpus)
    return rows, corpus


_LABELS_FILE = Path(__file__).with_name("video_cls_labels.json")


def video_cls_labels(task: str) -> list[str]:
    """The full label list of a video classification task (K700, UCF101, HMDB51,
    Breakfast): the official corpus (``VIDEOCLS_LABEL_MAPPING`` of the official
    ``video_classification_utils.py``; shipped as data, not in the MMEB download). Each
    list is checked against the sha256 recorded beside it, so an edited copy fails loudly."""
    entry = json.loads(_LABELS_FILE.read_text(encoding="utf-8"))["tasks"][task]
    labels = entry["labels"]
    got = hashlib.sha256(json.dumps(labels).encode()).hexdigest()
    if got != entry["sha256"]:
        raise ContractError(_LABELS_FILE, f"{task} label list digest {got[:16]} != recorded "
                            f"{entry['sha256'][:16]}", fix="restore the file from git")
    return labels


def _official_label_corpus(ctx: _Ctx, corpus: list[dict]) -> list[dict]:
    """The test labels in first-occurrence order, then the rest of the full label list in
    its order (the official candidate order: rows' names first, then the corpus)."""
    seen = {c["cand_id"] for c in corpus}
    labels = video_cls_labels(ctx.task)
    extra = [lb for lb in labels if lb not in seen]
    test_only = len(seen - set(labels))
    ctx.log(f"[mmeb] {ctx.task}: corpus = {len(labels)} labels (official list) + {test_only} "
            "test-only labels")
    return corpus + [{"task": ctx.task, "cand_id": lb, "cand_inst": "", "cand_text": lb,
                      "cand_img_path": ""} for lb in extra]


def _load_video_ret(ctx: _Ctx) -> tuple[list[dict], list[dict]]:
    p = ctx.src.parser
    cols = {"msrvtt": ("video_id", "caption"), "msvd": ("video_id", "caption"),
            "didemo": ("video", "caption"), "vatex": ("videoID", "enCap"),
            "youcook2": ("id", "sentence")}[p]
    items = []
    for f, i, r in ctx.records(cols):
        vid, cap = r[cols[0]], r[cols[1]]
        if p == "didemo":
            vid = os.path.splitext(os.path.basename(_str(vid)))[0]
        if p in ("msvd", "vatex"):  # several captions per video: the first is the query
            caps = _list(cap)
            if not caps:
                raise MMEBFormatError(ctx.task, f, "empty caption list.", column=cols[1], row=i)
            cap = caps[0]
        vid = _str(vid)
        items.append((f"{i:06d}", ctx.src.instruction, _str(cap), "", vid, "",
                      ctx.frames_dir(vid, f, i, cols[0])))
    return _global_video(ctx, items)


def _local_video(ctx: _Ctx, f: Path, i: int, qry_text: str, qry_img: str, cands: list[str],
                 pos: list[int], tgt_inst: str = "", cand_imgs: list[str] | None = None,
                 qry_inst: str | None = None) -> dict:
    """One local row with the positives first (stable order otherwise); official, in the
    dataset's own candidate order (the official parsers keep it)."""
    if not pos or not all(0 <= k < len(cands) for k in pos):
        raise MMEBFormatError(ctx.task, f, f"answer does not match any of the {len(cands)} "
                              "candidates.", row=i, fix="re-download the annotation file")
    imgs = cand_imgs if cand_imgs is not None else [""] * len(cands)
    if ctx.official:
        order = list(range(len(cands)))
    else:
        order = list(pos) + [k for k in range(len(cands)) if k not in set(pos)]
    return _row(ctx.spec, f"{i:06d}", ctx.src.instruction if qry_inst is None else qry_inst,
                qry_text, qry_img, tgt_inst, [cands[k] for k in order], [imgs[k] for k in order],
                [1.0 if k in set(pos) else 0.0 for k in order])


def _options_text(options: list[str]) -> list[str]:
    # "A. text" -> "text" (the benchmark's candidate text for Video-MME / EgoSchema)
    return [o[o.find(". "):].strip(". ") if ". " in o else o for o in options]


def _qa_template(question: str, cands: list[str]) -> tuple[str, list[str]]:
    lines = [f"({chr(ord('A') + k)}) {c}" for k, c in enumerate(cands)]
    return question + "\nOptions:\n" + "\n".join(lines), lines


def _load_video_qa(ctx: _Ctx) -> tuple[list[dict], list[dict]]:
    """Video QA tasks: each query's candidates are its own answer options; the parsers
    differ per source dataset (option lists, answer letters)."""
    p, rows = ctx.src.parser, []
    if p == "videomme":
        for f, i, r in ctx.records(["question", "videoID", "options", "answer"]):
            opts = [_str(o) for o in _list(r["options"])]
            letters = [o[:1] for o in opts]
            ans = _str(r["answer"]).strip()
            rows.append(_local_video(
                ctx, f, i, "Question: " + _str(r["question"]) + "\n" + "\n".join(opts),
                ctx.frames_dir(_str(r["videoID"]), f, i, "videoID"), _options_text(opts),
                [letters.index(ans)] if ans in letters else []))
    elif p == "nextqa":
        for f, i, r in ctx.records(["video", "question", "answer", "a0", "a1", "a2", "a3", "a4"]):
            opts = [_str(r[f"a{k}"]) for k in range(5)]
            q, _ = _qa_template("Question: " + _str(r["question"]), opts)
            rows.append(_local_video(ctx, f, i, q, ctx.frames_dir(_str(r["video"]), f, i,
                                                                   "video"),
                                     opts, [int(r["answer"])]))
    elif p == "egoschema":
        for f, i, r in ctx.records(["video_idx", "question", "answer", "option"]):
            opts = [_str(o) for o in _list(r["option"])]
            rows.append(_local_video(
                ctx, f, i, "Question: " + _str(r["question"]) + " ".join(opts),
                ctx.frames_dir(_str(r["video_idx"]), f, i, "video_idx"), _options_text(opts),
                [int(r["answer"])]))
    elif p == "activitynetqa":
        for f, i, r in ctx.records(["video_name", "question", "answer"]):
            cands = ["yes", "no"]
            ans = _str(r["answer"]).strip().lower()
            rows.append(_local_video(
                ctx, f, i, "Question: " + _str(r["question"]) + "? (A) yes; (B) no.",
                ctx.frames_dir("v_" + _str(r["video_name"]), f, i, "video_name"), cands,
                [cands.index(ans)] if ans in cands else []))
    elif p == "mvbench":
        base = ctx.root / ctx.src.data
        subsets = sorted(d.name for d in base.iterdir() if d.is_dir()) if base.is_dir() else []
        subsets = [s for s in subsets if s != "data"]
        if not subsets:
            raise MMEBMissingError(ctx.task, base, "no MVBench subset folders "
                                  "(<subset>/train-*.parquet).",
                                  fix="download VLM2Vec/MVBench (docs/evaluation.md)")
        n = 0
        for sub in subsets:
            for f, _i, r in _iter_records(ctx.files(sub), ctx.task,
                                          ["question", "video", "candidates", "answer"]):
                if ctx.max_queries is not None and n >= ctx.max_queries:
                    break
                cands = [_str(c) for c in _list(r["candidates"])]
                q, lines = _qa_template("Question: " + _str(r["question"]), cands)
                ans = _str(r["answer"])
                row = _local_video(ctx, f, n, q,
                                   ctx.frames_dir(f"{sub}/{_str(r['video'])}", f, n, "video"),
                                   lines, [cands.index(ans)] if ans in cands else [])
                rows.append(row)
                n += 1
    return rows, []


def _load_ssv2(ctx: _Ctx) -> tuple[list[dict], list[dict]]:
    rows = []
    for f, i, r in ctx.records(["video_id", "pos_text", "neg_text"]):
        cands = [_str(c) for c in _list(r["neg_text"])]  # the benchmark's list includes the label
        pos = _str(r["pos_text"])
        rows.append(_local_video(ctx, f, i, "", ctx.frames_dir(_str(r["video_id"]), f, i,
                                                                "video_id"),
                                 cands, [cands.index(pos)] if pos in cands else []))
    return rows, []


def _load_moment(ctx: _Ctx) -> tuple[list[dict], list[dict]]:
    """QVHighlight / Charades-STA: ``<frames>/<video>/query/`` holds the query video's frames,
    each other sub-folder is a candidate clip; ``positive*`` folders are the positives
    (official: only the last one in directory order)."""
    rows, several = [], 0
    for f, i, r in ctx.records(["query", "video_path"]):
        name = os.path.splitext(os.path.basename(_str(r["video_path"])))[0]
        qdir = ctx.frames_dir(f"{name}/query", f, i, "video_path")
        vdir = ctx.root / _join(ctx.src.frames or "", name)
        if not vdir.is_dir():
            raise MMEBMissingError(ctx.task, f, f"clip folder {str(vdir)!r} does not exist.",
                                  column="video_path", row=i,
                                  fix="extract the video_mret frame archive")
        if ctx.official:  # moment_retrieval_datasets.py: os.listdir order, the last positive*
            clips = [d for d in os.listdir(vdir) if (vdir / d).is_dir() and d != "query"]
            pos = [k for k, c in enumerate(clips) if c.startswith("positive")][-1:]
            several += sum(c.startswith("positive") for c in clips) > 1
        else:
            clips = sorted(d.name for d in vdir.iterdir() if d.is_dir() and d.name != "query")
            pos = [k for k, c in enumerate(clips) if c.startswith("positive")]
        if not pos:
            raise MMEBFormatError(ctx.task, vdir, "no positive* clip folder.", row=i,
                                  fix="re-extract the video_mret frame archive")
        imgs = [ctx.frames_dir(f"{name}/{c}", f, i, "video_path") for c in clips]
        rows.append(_local_video(ctx, f, i, _str(r["query"]), qdir, [""] * len(clips), pos,
                                 tgt_inst=_VID_TGT, cand_imgs=imgs))
    if several:
        ctx.log(f"[mmeb] {ctx.task}: {several} rows have several positive clips; official "
                "scores only the last in directory order (filesystem-dependent)")
    return rows, []


def _load_momentseeker(ctx: _Ctx) -> tuple[list[dict], list[dict]]:
    """Queries are text, text + image, or text + video; clips are frame folders under
    ``<frames>/video_frames/<clip path with / -> _, without .mp4>``."""
    rows = []
    for f, i, r in ctx.records(["query", "positive_frames", "negative_frames", "input_frames"]):
        inp = _str(r["input_frames"])
        if inp.endswith(".mp4"):
            inst = "Find the clip that corresponds to the given sentence and video segment:"
            qimg = ctx.frames_dir("video_frames/" + inp.split(".mp4")[0].replace("/", "_"), f,
                                  i, "input_frames")
        elif inp.endswith(".jpg"):
            inst = "Select the video clip that aligns with the given text and image:"
            qimg = ctx.image(_join(ctx.src.frames or "", f"query_{inp}"), f, i, "input_frames")
        else:
            inst, qimg = "Find the clip that corresponds to the given text:", ""

        def clip(e, f=f, i=i, col="positive_frames") -> str:
            path = _str(e.get("output_path") if isinstance(e, dict) else e)
            return ctx.frames_dir("video_frames/" + path.replace("/", "_").split(".mp4")[0], f,
                                  i, col)

        pos = [clip(e) for e in _list(r["positive_frames"])]
        neg = [clip(e, col="negative_frames") for e in _list(r["negative_frames"])]
        imgs = pos + neg
        rows.append(_local_video(ctx, f, i, _str(r["query"]), qimg, [""] * len(imgs),
                                 list(range(len(pos))),
                                 tgt_inst=_CLIP_TGT if ctx.official else _VID_TGT,
                                 cand_imgs=imgs, qry_inst=inst))
    return rows, []


_PARSERS = {
    "image": _load_image, "visdoc": _load_visdoc, "video_cls": _load_video_cls,
    "ssv2": _load_ssv2, "msrvtt": _load_video_ret, "msvd": _load_video_ret,
    "didemo": _load_video_ret, "vatex": _load_video_ret, "youcook2": _load_video_ret,
    "videomme": _load_video_qa, "nextqa": _load_video_qa, "egoschema": _load_video_qa,
    "mvbench": _load_video_qa, "activitynetqa": _load_video_qa, "moment": _load_moment,
    "momentseeker": _load_momentseeker,
}


def load_task(root: str | Path, task: str, *, num_frames: int = NUM_FRAMES,
              check_media: bool = True, max_queries: int | None = None,
              image_cache: str | Path | None = None, protocol: str = "strict",
              digests: dict[str, str] | None = None, log=print
              ) -> tuple[list[dict], list[dict]]:
    """EVAL_ROWS rows and EVAL_CORPUS rows (global tasks) of one MMEB-V2 task, shaped by
    ``protocol`` (``official`` | ``strict``, docs/evaluation.md); ``digests[task]`` receives
    the digest of the annotation files read."""
    from mmemb.eval.tasks import get_task

    root = Path(root)
    spec = get_task(task, DEFAULT_SUITE)
    src = SOURCES[task]
    cache = Path(image_cache) if image_cache else root / "visdoc-tasks" / "_images"
    ctx = _Ctx(root, spec, src, num_frames, check_media, max_queries, cache, protocol, log)
    rows, corpus = _PARSERS[src.parser](ctx)
    if digests is not None:
        digests[task] = task_data_digest(root, ctx.read)
    if not rows:
        files = ctx.files("queries") if src.parser == "visdoc" else \
            (ctx.files() if src.parser != "mvbench" else [root / src.data])
        raise MMEBFormatError(task, files[0], "no rows.", fix="re-download the file")
    if spec.ranking == "global" and not corpus:
        raise MMEBFormatError(task, root / src.data, "a globally ranked task needs a corpus "
                              "and none was found.")
    return rows, corpus


def load_mmeb_eval(root: str | Path, tasks: Iterable[str] | None = None, *,
                   categories: Iterable[str] | None = None,
                   modalities: Iterable[str] | None = None, num_frames: int = NUM_FRAMES,
                   check_media: bool = True, max_queries: int | None = None,
                   image_cache: str | Path | None = None,
                   skip_missing: bool = False, protocol: str = "strict",
                   log=print) -> LoadedEval:
    """Load the selected MMEB-V2 tasks from a local download folder.

    With ``skip_missing`` a task whose files are absent (folder, split files, frames,
    images: :class:`MMEBMissingError`) is skipped with one line naming what is missing, and
    listed in ``missing``, instead of failing, for partial downloads; a present but
    malformed file always fails.
    """
    root = Path(root)
    if not root.is_dir():
        raise ContractError(root, "MMEB-V2 root folder does not exist.",
                            fix="download the benchmark (docs/evaluation.md) and point "
                            "evaluate.eval at it")
    specs = select_tasks(DEFAULT_SUITE, names=None if tasks is None else list(tasks),
                         categories=None if categories is None else list(categories),
                         modalities=None if modalities is None else list(modalities))
    rows: list[dict] = []
    corpus: list[dict] = []
    done, missing, digests = [], {}, {}
    for spec in specs:
        try:
            r, c = load_task(root, spec.name, num_frames=num_frames, check_media=check_media,
                             max_queries=max_queries, image_cache=image_cache,
                             protocol=protocol, digests=digests, log=log)
        except MMEBMissingError as e:
            if not skip_missing:
                raise
            missing[spec.name] = f"{e.what}: {e.reason}"
            log(f"[evaluate] skip {spec.name}: missing {e.what} ({e.reason})")
            continue
        rows += r
        corpus += c
        done.append(spec.name)
    if not done:
        raise ContractError(root, f"none of the {len(specs)} selected MMEB-V2 tasks is "
                            "present.", fix="check the folder layout (docs/evaluation.md)")
    return LoadedEval(io.conform(rows, EVAL_ROWS, str(root)),
                      io.conform(corpus, EVAL_CORPUS, str(root)), root, done, missing, digests)


def task_data_digest(root: Path, files: Iterable[Path]) -> str:
    """Digest of a task's annotation files: sha256 of each (``data_contracts.files``), keyed
    by its path under the root, as canonical JSON."""
    parts = {}
    for f in sorted(set(files)):
        rel = str(f.relative_to(root)) if f.is_relative_to(root) else str(f)
        parts[rel] = sha256_file(f)
    return json_digest(parts)


# --------------------------------------------------------------------------- MMEB-train

def _split_marker(text: str) -> tuple[str, str]:
    """(inst, text): a string carrying ``<|image_1|>`` is an instruction (the marker must be
    mapped to the image slot), anything else is plain target text."""
    return (text, "") if IMAGE_MARKER in text else ("", text)


def _empty_side(r: dict) -> bool:
    """The official drop rule: Python truthiness of the raw values (None and "" are empty,
    " " is not), query text and image both empty, or positive text and image both empty."""
    return ((not r["qry"] and not r["qry_image_path"])
            or (not r["pos_text"] and not r["pos_image_path"]))


def _train_pair(folder: Path, sub: str, split: str, f: Path, i: int, r: dict,
                check_images: bool) -> dict:
    """One MMEB-train record as a PAIRS row; a malformed negative list or (with
    ``check_images``) a missing image is refused naming the file, column and row."""
    pos_inst, pos_text = _split_marker(_str(r["pos_text"]))
    neg_t, neg_i = _list(r.get("neg_text")), _list(r.get("neg_image_path"))
    if neg_t and not neg_i:
        neg_i = [""] * len(neg_t)
    if len(neg_t) != len(neg_i):
        raise MMEBFormatError(sub, f, f"{len(neg_t)} neg_text but {len(neg_i)} "
                              "neg_image_path.", column="neg_image_path", row=i)
    # One negative per row in MMEB-train; "" text and "" image means "none".
    negs = [(_str(t).replace(IMAGE_MARKER, "").strip() if p else _str(t), _str(p))
            for t, p in zip(neg_t, neg_i, strict=True) if _str(t) or _str(p)]
    rec = {"pair_id": f"{sub}-{split}-{i:07d}", "dataset": sub, "family": None,
           "qry_inst": _str(r["qry"]), "qry_text": "",
           "qry_img_path": _str(r["qry_image_path"]),
           "pos_inst": pos_inst, "pos_text": pos_text,
           "pos_img_path": _str(r["pos_image_path"]),
           "neg_text": [t for t, _ in negs], "neg_img_path": [p for _, p in negs],
           "meta": json.dumps({"source": "MMEB-train", "split": split, "row": i})}
    if check_images:
        for col in ("qry_img_path", "pos_img_path"):
            if rec[col] and not (folder / rec[col]).is_file():
                raise MMEBFormatError(sub, f, f"image {str(folder / rec[col])!r} does "
                                      "not exist.", column=col, row=i,
                                      fix="unzip images_zip/<Subset>.zip into images/")
    return rec


def load_mmeb_train(folder: str | Path, subsets: Iterable[str] | None = None,
                    split: str = "original", *, check_images: bool = False,
                    max_rows: int | None = None, protocol: str = "official",
                    log=print) -> pa.Table:
    """MMEB-train subsets -> a PAIRS table (image paths relative to ``folder``).

    ``pair_id`` is ``<subset>-<split>-<row>``: stable across reruns and unique across splits
    (a dropped row keeps its number free). Official, a row with no query (text and image
    empty) or no positive is dropped, as the official train parser does
    (``mmeb_dataset.py data_prepare_v4``, after the first ``max_rows`` rows were taken);
    ``strict`` keeps every row.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ContractError(folder, "MMEB-train folder does not exist.",
                            fix="git clone https://huggingface.co/datasets/TIGER-Lab/MMEB-train")
    if subsets is None:
        subsets = sorted(d.name for d in folder.iterdir() if d.is_dir()
                         and (list(d.glob(f"{split}-*.parquet")) or list(d.glob(f"{split}.*"))))
        if not subsets:
            raise ContractError(folder, f"no subset folder holds '{split}' files "
                                f"(<Subset>/{split}-*.parquet).",
                                fix="split is 'original' or 'diverse_instruction'")
    out = []
    for sub in subsets:
        files = find_split_files(folder, sub, split, sub)
        dropped = 0
        for f, i, r in _iter_records(files, sub, ["qry", "qry_image_path", "pos_text",
                                                  "pos_image_path"]):
            if max_rows is not None and i >= max_rows:
                break
            if protocol == "official" and _empty_side(r):
                dropped += 1
                continue
            out.append(_train_pair(folder, sub, split, f, i, r, check_images))
        if dropped:
            log(f"[mmeb-train] {sub}: dropped {dropped} rows with an empty query or positive "
                "(official rule)")
    table = io.conform(out, PAIRS, str(folder))
    io.validate(table, PAIRS, str(folder))
    return table


# --------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> None:
    """Convert a local download into contract artifacts::

        python -m mmemb.data.mmeb train --src data/MMEB-train --out runs/x/pairs
        python -m mmemb.data.mmeb eval --root data/mmeb-v2 --out runs/x/mmeb --tasks CIRR
    """
    ap = argparse.ArgumentParser(description="MMEB downloads -> contract artifacts")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="MMEB-train -> pairs")
    t.add_argument("--src", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--split", default="original")
    t.add_argument("--subsets", help="comma-separated; default all")
    e = sub.add_parser("eval", help="MMEB-V2 -> eval_rows (+ eval_corpus)")
    e.add_argument("--root", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--tasks", help="comma-separated task names; default all 78")
    e.add_argument("--max-queries", type=int)
    a = ap.parse_args(argv)
    if a.cmd == "train":
        table = load_mmeb_train(a.src, a.subsets.split(",") if a.subsets else None, a.split)
        print(json.dumps(io.write(table, a.out, PAIRS).to_dict(), indent=2))
    else:
        ev = load_mmeb_eval(a.root, a.tasks.split(",") if a.tasks else None,
                            max_queries=a.max_queries)
        refs = {"rows": io.write(ev.rows, Path(a.out) / "eval_rows", EVAL_ROWS).to_dict()}
        if ev.corpus.num_rows:
            refs["corpus"] = io.write(ev.corpus, Path(a.out) / "eval_corpus",
                                      EVAL_CORPUS).to_dict()
        print(json.dumps({**refs, "image_root": str(ev.image_root)}, indent=2))


if __name__ == "__main__":
    main()
