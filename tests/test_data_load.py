"""Loading a data directory through its manifest; the real-source writer; image path safety."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from components.core.config import DataParams
from components.data.generate import write_dataset
from components.data.load import load_dataset_dir, resolve_image
from components.data.mme import MMEItem, write_mme_item
from components.data.records import DataError
from components.data.visionflan import make_record, write_visionflan

TINY = dict(train_per_task=2, heldout_per_task=2, heldin_per_task=1, align_size=4, text_per_type=2, mme_images_per_subtask=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("load") / "ds"
    return write_dataset(DataParams(out_dir=str(out), **TINY), progress=False).parent


def test_loads_every_split(data_dir):
    loaded = load_dataset_dir(data_dir)
    assert loaded.errors == []
    counts = Counter(r.split for r in loaded.rows)
    m = loaded.manifest["counts"]
    assert counts == {s: m[s] for s in ("train", "heldout", "heldin", "align", "text", "mme")}
    assert loaded.image_root == data_dir / "images"
    assert loaded.mme_root == data_dir / "mme/MME_Benchmark_release_version"
    for split in ("train", "heldout", "heldin", "align", "mme"):
        row = loaded.split(split)[0]
        assert loaded.image_path(row).is_file()
    with pytest.raises(ValueError, match="text-only"):
        loaded.image_path(loaded.split("text")[0])
    only = load_dataset_dir(data_dir, splits=("heldout",))
    assert {r.split for r in only.rows} == {"heldout"}


def _copy_manifest(data_dir: Path, tmp_path: Path, edit) -> Path:
    d = tmp_path / "copy"
    d.mkdir()
    m = json.loads((data_dir / "manifest.json").read_text())
    for name in m["files"].values():
        (d / name).write_bytes((data_dir / name).read_bytes())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def test_manifest_problems_name_file_and_field(data_dir, tmp_path):
    with pytest.raises(DataError, match="manifest not found") as info:
        load_dataset_dir(tmp_path)
    assert info.value.errors[0].file == str(tmp_path / "manifest.json")

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text('{"name": "x",\n "files": {')
    with pytest.raises(DataError) as info:
        load_dataset_dir(bad)
    assert info.value.errors[0].record == "line 2 col 12" and "malformed JSON" in str(info.value)

    d = _copy_manifest(data_dir, tmp_path, lambda m: m.update(format_version=2))
    with pytest.raises(DataError, match="format_version") as info:
        load_dataset_dir(d)
    assert info.value.errors[0].field == "format_version"


def test_missing_split_file_and_mme_folder(data_dir, tmp_path):
    d = _copy_manifest(data_dir, tmp_path, lambda m: m.update(mme_root="nowhere"))
    with pytest.raises(DataError) as info:
        load_dataset_dir(d)
    assert info.value.errors[0].field == "mme_root"
    (d / "annotation_text.json").unlink()
    with pytest.raises(DataError, match="file not found"):
        load_dataset_dir(d, splits=("text",))


def test_bad_records_are_returned_not_raised(data_dir, tmp_path):
    d = _copy_manifest(data_dir, tmp_path, lambda m: m.update(mme_root=None))
    recs = json.loads((d / "annotation_train.json").read_text())
    recs[0]["conversations"][1]["value"] = ""
    (d / "annotation_train.json").write_text(json.dumps(recs))
    loaded = load_dataset_dir(d)
    (err,) = loaded.errors
    assert (err.record, err.field) == (recs[0]["id"], "conversations[1].value")
    assert len(loaded.split("train")) == len(recs) - 1 and loaded.mme_root is None


@pytest.mark.parametrize("rel", ["../x.png", "a/../../x.png", "/etc/passwd", "C:\\x.png", "", ".."])
def test_resolve_image_refuses_escapes(tmp_path, rel):
    with pytest.raises(ValueError, match="image path"):
        resolve_image(tmp_path, rel)


def test_resolve_image_accepts_nested(tmp_path):
    assert resolve_image(tmp_path, "task/./a/../b.png") == tmp_path / "task/b.png"
    assert resolve_image(tmp_path, "task\\c.png") == tmp_path / "task/c.png"


# ---------------------------------------------------------------------------------------------
# source: visionflan (real data layout, faked small)
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def real_source(tmp_path):
    images = tmp_path / "images_191task_1k"
    recs = []
    for task in ("VQA-E", "CLEVR_count", "ScienceQA"):
        for i in range(3):
            (images / task).mkdir(parents=True, exist_ok=True)
            (images / task / f"{i}.jpg").write_bytes(b"\xff\xd8")
            answer = str(i) if task == "CLEVR_count" else f"a longer answer {i}"
            recs.append(make_record(f"{task}_{i}", task, f"question {i}", answer, f"{task}/{i}.jpg"))
    bad = make_record("broken", "VQA-E", "q", "a", "VQA-E/0.jpg")
    bad["conversations"].pop()
    recs.append(bad)
    annotation = write_visionflan(recs, tmp_path / "annotation_191-task_1k.json")
    mme = tmp_path / "MME_Benchmark_release_version"
    write_mme_item(mme, "existence", MMEItem("1", b"\xff\xd8", [("Is there a dog?", "Yes"), ("A cat?", "No")], ".jpg"))
    return tmp_path, annotation, images, mme


def test_real_visionflan_source(real_source):
    base, annotation, images, mme = real_source
    p = DataParams(
        source="visionflan", out_dir=str(base / "out"), visionflan_annotation=str(annotation),
        visionflan_images=str(images), heldout_tasks=["ScienceQA"], mme_root=str(mme),
    )
    manifest_path = write_dataset(p, progress=False)
    m = json.loads(manifest_path.read_text())
    assert m["image_root"] == str(images.resolve()) and Path(m["image_root"]).is_absolute()
    assert m["mme_root"] == str(mme.resolve())
    assert m["files"] == {"train": "annotation_train.json", "heldout": "annotation_heldout.json"}
    assert m["counts"]["train"] == 6 and m["counts"]["heldout"] == 3 and m["counts"]["read_errors"] == 1
    assert "broken" in m["read_errors"][0] and "conversations[1]" in m["read_errors"][0]
    assert m["tasks"]["ScienceQA"]["split"] == "heldout" and m["tasks"]["CLEVR_count"]["answer_kind"] == "number"
    assert not (base / "out" / "images").exists()  # never copies the real images
    loaded = load_dataset_dir(base / "out")
    assert loaded.errors == []
    assert {r.task for r in loaded.split("heldout")} == {"ScienceQA"}
    assert all(loaded.image_path(r).is_file() for r in loaded.rows)
    assert len(loaded.split("mme")) == 2


def test_real_source_refuses_unknown_or_missing_heldout_tasks(real_source):
    base, annotation, images, _ = real_source
    common = dict(source="visionflan", out_dir=str(base / "out"), visionflan_annotation=str(annotation),
                  visionflan_images=str(images))
    with pytest.raises(DataError, match="no such task") as info:
        write_dataset(DataParams(**common, heldout_tasks=["ScienceQa"]), progress=False)
    assert info.value.errors[0].field == "data.heldout_tasks"
    with pytest.raises(DataError, match="needs held-out task names"):
        write_dataset(DataParams(**common), progress=False)
    assert not (base / "out").exists()


def test_embedded_tasks_with_the_real_mme(real_source):
    base, _, _, mme = real_source
    out = base / "mixed"
    m = json.loads(write_dataset(DataParams(out_dir=str(out), mme_root=str(mme), **TINY), progress=False).read_text())
    assert m["mme_root"] == str(mme.resolve()) and m["counts"]["mme"] == 2 and m["counts"]["mme_images"] == 1
    assert not (out / "mme").exists()  # nothing generated: the real release is used as is
    loaded = load_dataset_dir(out)
    assert [r.id for r in loaded.split("mme")] == ["existence/1#0", "existence/1#1"]
    assert loaded.image_path(loaded.split("mme")[0]) == mme.resolve() / "existence/1.jpg"
