import dataclasses

import pytest

from mmemb.eval import tasks
from mmemb.eval.tasks import TaskSpec, get_task, register_suite, select_tasks


def test_registry_counts():
    specs = select_tasks()
    assert len(specs) == 78
    assert [len(select_tasks(modalities=m)) for m in ("image", "video", "visdoc")] == [36, 18, 24]
    cats = tasks.CATEGORIES["image"]
    image = {c: len(select_tasks(categories=c, modalities="image")) for c in cats}
    assert image == {"CLS": 10, "QA": 10, "RET": 12, "GD": 4}
    assert len(select_tasks(modalities="video", categories="MRET")) == 3
    assert len(select_tasks(categories="ViDoRe-v2")) == 4


def test_metrics_and_ranking():
    assert {s.metric for s in select_tasks(modalities=["image", "video"])} == {"hit@1"}
    assert {(s.metric, s.ranking) for s in select_tasks(modalities="visdoc")} == {
        ("ndcg@5", "global")
    }
    assert {s.ranking for s in select_tasks(modalities="image")} == {"local"}
    video = {s.name: s.ranking for s in select_tasks(modalities="video")}
    assert sum(r == "global" for r in video.values()) == 9
    assert video["MSR-VTT"] == "global" and video["SmthSmthV2"] == "local"
    assert video["K700"] == "global" and video["MVBench"] == "local"


def test_get_task_and_frozen():
    spec = get_task("MomentSeeker")
    assert (spec.modality, spec.category, spec.metric, spec.ranking, spec.suite) == (
        "video",
        "MRET",
        "hit@1",
        "local",
        "mmeb-v2",
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.metric = "ndcg@5"


def test_select_by_name_keeps_registry_order():
    got = select_tasks(names=["MSCOCO_t2i", "CIRR"])
    assert [s.name for s in got] == ["CIRR", "MSCOCO_t2i"]
    assert [s.name for s in select_tasks(names="CIRR")] == ["CIRR"]
    # "CLS" spans image and video unless narrowed.
    assert len(select_tasks(categories="CLS")) == 15


def test_unknown_values_raise_with_choices():
    with pytest.raises(ValueError, match=r"unknown task 'CIR'.*did you mean CIRR.*valid choices"):
        select_tasks(names=["CIR"])
    with pytest.raises(ValueError, match=r"valid choices: .*ImageNet-1K"):
        get_task("nope")
    with pytest.raises(ValueError, match=r"unknown category 'CLASS'.*valid choices: CLS"):
        select_tasks(categories="CLASS")
    with pytest.raises(ValueError, match=r"unknown modality 'audio'.*image, video, visdoc"):
        select_tasks(modalities=["audio"])
    with pytest.raises(ValueError, match="unknown suite"):
        select_tasks(suite="missing")


def test_invalid_spec_rejected():
    with pytest.raises(ValueError, match="category"):
        TaskSpec("x", "image", "MRET", "hit@1", "local")
    with pytest.raises(ValueError, match="metric"):
        TaskSpec("x", "image", "CLS", "recall@1", "local")


@pytest.fixture
def synthetic():
    yield "test-synthetic"
    tasks._SUITES.pop("test-synthetic", None)


def test_register_other_suite(synthetic):
    specs = [
        TaskSpec("syn-a", "image", "anything", "hit@1", "local", suite=synthetic),
        TaskSpec("syn-b", "visdoc", "docs", "ndcg@5", "global", suite=synthetic),
    ]
    register_suite(synthetic, specs)
    assert get_task("syn-b", suite=synthetic).metric == "ndcg@5"
    assert [s.name for s in select_tasks(synthetic, modalities="image")] == ["syn-a"]
    with pytest.raises(ValueError, match="already registered"):
        register_suite(synthetic, specs)
    with pytest.raises(ValueError, match="expected 'other'"):
        register_suite("other", specs)
