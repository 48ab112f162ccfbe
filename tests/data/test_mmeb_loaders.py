"""MMEB loaders on fixture files written in the benchmark's own layouts."""

from __future__ import annotations

import shutil
from pathlib import Path

import mmeb_layout as layout  # tests/data/fixtures, on the path (tests/conftest.py)
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_contracts import io
from data_contracts.schemas import EVAL_CORPUS, EVAL_ROWS, PAIRS
from mmemb.data.mmeb import (
    SOURCES,
    MMEBFormatError,
    load_mmeb_eval,
    load_mmeb_train,
    load_task,
    media_files,
    sample_frames,
)
from mmemb.eval.tasks import select_tasks
from mmemb.model.prompts import IMAGE_MARKER, QWEN_IMAGE, EmbedInput, user_content


@pytest.fixture(scope="module")
def mmeb_root(tmp_path_factory) -> Path:
    return layout.write_mmeb_v2(tmp_path_factory.mktemp("mmeb") / "mmeb-v2")


@pytest.fixture(scope="module")
def loaded(mmeb_root, tmp_path_factory):
    cache = tmp_path_factory.mktemp("pages")
    return load_mmeb_eval(mmeb_root, skip_missing=True, image_cache=cache), cache


def _rows(ev, task):
    return [r for r in ev.rows.to_pylist() if r["task"] == task]


def test_sources_cover_the_78_registered_tasks():
    assert set(SOURCES) == {s.name for s in select_tasks()}
    assert SOURCES["K700"].data == "video-tasks/Kinetics-700"  # HF name differs from task
    assert SOURCES["VisRAG_ArxivQA"].split == "train"
    assert SOURCES["MSR-VTT"].subset == "test_1k"


def test_loaded_tables_satisfy_the_contracts_and_round_trip(loaded, tmp_path):
    ev, _ = loaded
    assert ev.tasks == ["N24News", "MSCOCO_t2i", "HMDB51", "Video-MME", "MSR-VTT",
                        "QVHighlight", "ViDoRe_arxivqa"]  # registry order
    assert len(ev.missing) == 78 - 7
    io.validate(ev.rows, EVAL_ROWS, "rows")
    back = io.read(io.write(ev.rows, tmp_path / "rows", EVAL_ROWS).uri, EVAL_ROWS)
    assert back.to_pylist() == ev.rows.to_pylist()
    io.write(ev.corpus, tmp_path / "corpus", EVAL_CORPUS)
    assert ev.rows.num_rows == 3 + 2 + 3 + 1 + 3 + 1 + 2 and ev.corpus.num_rows == 2 + 2 + 4


def test_image_task_rows_first_candidate_positive_and_image_slot(loaded, mmeb_root):
    ev, _ = loaded
    n24 = _rows(ev, "N24News")
    assert [r["tgt_text"][0] for r in n24] == ["sports", "politics", "science"]
    assert all(r["tgt_rel"] == [1.0, 0.0, 0.0] for r in n24)
    r = n24[1]
    assert (r["category"], r["modality"], r["metric"]) == ("CLS", "image", "hit@1")
    assert r["qry_img_path"] == "image-tasks/N24News/img_1.jpg"
    assert (mmeb_root / r["qry_img_path"]).is_file()
    # <|image_1|> stays in the instruction and becomes the backbone's image slot in the prompt.
    inp = EmbedInput.from_row(r["qry_inst"], r["qry_text"], r["qry_img_path"], mmeb_root)
    content = user_content(inp)
    # no space after the image: as the chat template renders an image item, then the text
    assert content.startswith(QWEN_IMAGE + "Represent the given news image")
    assert IMAGE_MARKER not in content and content.count(QWEN_IMAGE) == 1
    t2i = _rows(ev, "MSCOCO_t2i")[1]
    assert t2i["qry_img_path"] == "" and t2i["tgt_img_path"] == [
        "image-tasks/MSCOCO_t2i/cand_1.jpg", "image-tasks/MSCOCO_t2i/cand_2.jpg",
        "image-tasks/MSCOCO_t2i/cand_3.jpg"]


def test_visdoc_beir_graded_qrels_and_page_cache(loaded):
    ev, cache = loaded
    rows = _rows(ev, "ViDoRe_arxivqa")
    assert [r["row_id"] for r in rows] == ["10", "11"]
    assert rows[0]["tgt_id"] == ["1", "2"] and rows[0]["tgt_rel"] == [2.0, 1.0]  # score 0 dropped
    assert rows[1]["tgt_id"] == ["0"] and rows[1]["metric"] == "ndcg@5"
    corpus = [c for c in ev.corpus.to_pylist() if c["task"] == "ViDoRe_arxivqa"]
    assert [c["cand_id"] for c in corpus] == ["0", "1", "2", "3"]  # the whole corpus
    assert corpus[0]["cand_inst"] == "Understand the content of the provided document image."
    # Page bytes were written under the cache, with the format's own extension.
    p1 = Path(corpus[1]["cand_img_path"])
    assert p1.parent == cache / "ViDoRe_arxivqa" and p1.suffix == ".jpg"
    with Image.open(corpus[0]["cand_img_path"]) as im:
        assert im.getpixel((3, 3)) == layout.COLOURS[0]
    assert rows[0]["tgt_img_path"][0] == corpus[1]["cand_img_path"]


def test_visdoc_rerun_reuses_written_pages(mmeb_root, loaded):
    _, cache = loaded
    page = next((cache / "ViDoRe_arxivqa").glob("0_*.png"))
    before = page.stat().st_mtime_ns
    load_task(mmeb_root, "ViDoRe_arxivqa", image_cache=cache)
    assert page.stat().st_mtime_ns == before


def test_video_global_tasks_corpus_is_union_of_targets(loaded, mmeb_root):
    ev, _ = loaded
    hmdb = _rows(ev, "HMDB51")
    assert [r["tgt_id"] for r in hmdb] == [["run"], ["jump"], ["run"]]
    assert hmdb[0]["qry_img_path"] == "video-tasks/frames/video_cls/HMDB51/video_abc"
    corpus = {c["task"]: [] for c in ev.corpus.to_pylist()}
    for c in ev.corpus.to_pylist():
        corpus[c["task"]].append(c["cand_id"])
    assert corpus["HMDB51"] == ["run", "jump"]
    assert corpus["MSR-VTT"] == ["video7", "video8"]  # two captions share video7
    msr = _rows(ev, "MSR-VTT")
    assert [r["qry_text"] for r in msr] == ["a man cooks", "a cat sleeps", "someone in a kitchen"]
    assert msr[2]["tgt_img_path"] == ["video-tasks/frames/video_ret/MSR-VTT/video7"]


def test_frame_folder_expands_to_eight_uniform_frames(mmeb_root):
    files = media_files("video-tasks/frames/video_cls/HMDB51/video_abc", mmeb_root)
    # linspace(0, 9, 8) -> [0, 1.29, 2.57, 3.86, 5.14, 6.43, 7.71, 9] -> int
    assert [Path(f).name for f in files] == [f"frame_{k + 1:04d}.jpg"
                                             for k in (0, 1, 2, 3, 5, 6, 7, 9)]
    assert sample_frames(["a", "b", "c"], 5) == ["a", "a", "b", "b", "c"]
    assert media_files("", mmeb_root) == []
    assert media_files("image-tasks/N24News/img_0.jpg", mmeb_root) == [
        str(mmeb_root / "image-tasks/N24News/img_0.jpg")]
    inp = EmbedInput("q", "Recognize the video.", files)
    assert user_content(inp).count(QWEN_IMAGE) == 8


def test_video_local_tasks_positives_first(loaded):
    ev, _ = loaded
    (vmme,) = _rows(ev, "Video-MME")
    assert vmme["tgt_text"] == ["green", "red", "blue", "black"]  # answer C moved first
    assert vmme["tgt_rel"] == [1.0, 0.0, 0.0, 0.0]
    assert vmme["qry_text"].startswith("Question: What colour is the car?\nA. red")
    (qv,) = _rows(ev, "QVHighlight")
    names = [Path(p).name for p in qv["tgt_img_path"]]
    assert names == ["positive_0", "positive_1", "negative_0", "negative_2"]
    assert qv["tgt_rel"] == [1.0, 1.0, 0.0, 0.0] and qv["qry_img_path"].endswith("qv_001/query")


def test_mmeb_train_to_pairs(tmp_path):
    folder = layout.write_mmeb_train(tmp_path)
    t = load_mmeb_train(folder, check_images=True)
    io.validate(t, PAIRS, "pairs", check_paths=True, image_root=folder)
    rows = {r["pair_id"]: r for r in t.to_pylist()}
    assert sorted(rows) == ["ImageNet_1K-original-0000000", "ImageNet_1K-original-0000001",
                            "MSCOCO_t2i-original-0000000", "MSCOCO_t2i-original-0000001"]
    cls = rows["ImageNet_1K-original-0000000"]
    assert cls["qry_inst"] == "<|image_1|>\nRepresent the given image for classification\n"
    assert (cls["qry_text"], cls["pos_text"], cls["pos_inst"]) == ("", "plane", "")
    assert (cls["neg_text"], cls["neg_img_path"]) == (["car"], [""])
    assert rows["ImageNet_1K-original-0000001"]["neg_text"] == []  # "" negative = none
    t2i = rows["MSCOCO_t2i-original-0000001"]
    assert t2i["pos_inst"].startswith(IMAGE_MARKER) and t2i["pos_text"] == ""
    assert t2i["neg_text"] == ["Represent the given image."]
    assert t2i["neg_img_path"] == ["images/MSCOCO_t2i/Train/image_0.jpg"]
    # The positive's prompt has the image where the marker was, exactly once.
    inp = EmbedInput(t2i["pos_text"], t2i["pos_inst"], [str(folder / t2i["pos_img_path"])])
    assert user_content(inp) == QWEN_IMAGE + "\nRepresent the given image."


def test_mmeb_train_reads_jsonl_too(tmp_path):
    sub = tmp_path / "VOC2007"
    sub.mkdir()
    (sub / "original.jsonl").write_text(
        '{"qry": "<|image_1|> Represent the image", "qry_image_path": "images/a.jpg", '
        '"pos_text": "cat", "pos_image_path": ""}\n')
    t = load_mmeb_train(tmp_path)
    assert t.column("pair_id").to_pylist() == ["VOC2007-original-0000000"]
    assert t.column("neg_text").to_pylist() == [[]]


# --------------------------------------------------------------------------- bad files

def _copy(root: Path, tmp: Path) -> Path:
    dst = tmp / "copy"
    shutil.copytree(root, dst)
    return dst


def test_missing_annotation_names_task_and_file(mmeb_root, tmp_path):
    with pytest.raises(MMEBFormatError) as e:
        load_task(mmeb_root, "CIRR")
    msg = str(e.value)
    assert "task 'CIRR'" in msg and "image-tasks" in msg and "test-*.parquet" in msg
    with pytest.raises(MMEBFormatError, match=r"task 'ImageNet-1K'.*image-tasks"):
        load_mmeb_eval(mmeb_root, ["N24News", "ImageNet-1K"])


def test_missing_column_names_task_file_and_column(mmeb_root, tmp_path):
    root = _copy(mmeb_root, tmp_path)
    f = root / "image-tasks" / "N24News" / "test-00000-of-00001.parquet"
    pq.write_table(pq.read_table(f).drop_columns(["tgt_text"]), f)
    with pytest.raises(MMEBFormatError) as e:
        load_task(root, "N24News")
    msg = str(e.value)
    assert str(f) in msg and "task 'N24News'" in msg and "column 'tgt_text'" in msg


def test_corrupt_parquet_names_the_file(mmeb_root, tmp_path):
    root = _copy(mmeb_root, tmp_path)
    f = root / "visdoc-tasks/arxivqa_test_subsampled_beir/qrels/test-00000-of-00001.parquet"
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(MMEBFormatError, match=r"test-00000-of-00001\.parquet.*ViDoRe_arxivqa.*"
                       r"not a readable Parquet"):
        load_task(root, "ViDoRe_arxivqa", image_cache=tmp_path / "c")


def test_missing_frames_and_images_name_task_file_and_row(mmeb_root, tmp_path):
    root = _copy(mmeb_root, tmp_path)
    shutil.rmtree(root / "video-tasks/frames/video_ret/MSR-VTT/video8")
    with pytest.raises(MMEBFormatError) as e:
        load_task(root, "MSR-VTT")
    msg = str(e.value)
    assert "task 'MSR-VTT'" in msg and "row 1" in msg and "video8" in msg
    assert "test_1k/test-00000-of-00001.parquet" in msg
    (root / "image-tasks/N24News/img_2.jpg").unlink()
    with pytest.raises(MMEBFormatError, match=r"N24News.*column 'qry_img_path', row 2"):
        load_task(root, "N24News")
    assert len(load_task(root, "N24News", check_media=False)[0]) == 3


def test_inconsistent_qrels_and_answers_are_errors(mmeb_root, tmp_path):
    root = _copy(mmeb_root, tmp_path)
    base = root / "visdoc-tasks/arxivqa_test_subsampled_beir"
    layout.to_parquet([{"query-id": 10, "corpus-id": 99, "score": 1},
                       {"query-id": 11, "corpus-id": 0, "score": 1}],
                      base / "qrels" / "test-00000-of-00001.parquet")
    with pytest.raises(MMEBFormatError, match=r"corpus-id\(s\) \['99'\] absent"):
        load_task(root, "ViDoRe_arxivqa", image_cache=tmp_path / "c")
    f = root / "video-tasks/Video-MME/data/test-00000-of-00001.parquet"
    t = pq.read_table(f).to_pylist()
    t[0]["answer"] = "E"
    layout.to_parquet(t, f)
    with pytest.raises(MMEBFormatError, match=r"Video-MME.*row 0.*answer does not match"):
        load_task(root, "Video-MME")
