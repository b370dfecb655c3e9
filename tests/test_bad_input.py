"""Bad input through the real CLI, end to end: `mrt validate | train | predict | benchmark` and params.yaml.

Each case breaks one thing in a private copy of a complete workspace (data, base, editors, MLflow
store with a registered champion), runs the command, and asserts three things: a non-zero exit
code with no traceback, a message naming the file, the record and the field (where the input has
them), and that the data, the models and the MLflow store are byte-for-byte as before.

The record-level validation logic itself is tested in test_validation.py; here the point is the
whole command: what a user sees and that nothing stored is damaged.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from reliability_env import Workspace, run_cli, snapshot, workspace, write_params

EXIT_FAILED, EXIT_BAD_PARAMS = 1, 2


@pytest.fixture()
def ws(tmp_path_factory, tmp_path) -> Workspace:
    return workspace(tmp_path_factory, tmp_path)


# ---------------------------------------------------------------------------------------------
# ways to break things
# ---------------------------------------------------------------------------------------------
def _records(ws: Workspace, split: str) -> list[dict]:
    return json.loads(ws.annotation(split).read_text(encoding="utf-8"))


def _save_records(ws: Workspace, split: str, recs: list[dict]) -> None:
    ws.annotation(split).write_text(json.dumps(recs, indent=1) + "\n", encoding="utf-8")


def _edit_record(split: str, index: int, fn: Callable[[dict], None]) -> Callable[[Workspace], str]:
    def apply(ws: Workspace) -> str:
        recs = _records(ws, split)
        fn(recs[index])
        _save_records(ws, split, recs)
        return str(recs[index].get("id"))
    return apply


def _image_of(ws: Workspace, split: str, index: int = 0) -> Path:
    return ws.data / "images" / _records(ws, split)[index]["image"]


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width×height (a 'decompression bomb'): a few dozen bytes on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _truncate_json(split: str):
    def apply(ws):
        text = ws.annotation(split).read_text(encoding="utf-8")
        ws.annotation(split).write_text(text[: len(text) // 2], encoding="utf-8")
        return ""
    return apply


def _wrong_types(ws):
    recs = _records(ws, "train")
    recs[0]["id"] = 17
    recs[1]["conversations"] = "circle"
    _save_records(ws, "train", recs)
    return recs[1]["id"]


def _image_bytes(split: str, data: bytes | Callable[[Path], None]):
    def apply(ws):
        path = _image_of(ws, split)
        if callable(data):
            data(path)
        else:
            path.write_bytes(data)
        return _records(ws, split)[0]["id"]
    return apply


def _every_image_corrupt(split: str):
    def apply(ws):
        for rec in _records(ws, split):
            (ws.data / "images" / rec["image"]).write_bytes(b"GIF89a but not really")
        return ""
    return apply


def _float_image(ws):
    """A 32-bit float TIFF: a mode (F) no stage accepts."""
    recs = _records(ws, "train")
    rel = recs[0]["image"].replace(".png", ".tif")
    Image.fromarray(np.random.default_rng(0).random((32, 32), dtype=np.float32), mode="F").save(ws.data / "images" / rel)
    recs[0]["image"] = rel
    _save_records(ws, "train", recs)
    return recs[0]["id"]


def _params_file(text: str):
    def apply(ws):
        ws.params.write_text(ws.params.read_text(encoding="utf-8") + text, encoding="utf-8")
        return ""
    return apply


def _params_value(section: str, **values):
    def apply(ws):
        write_params(ws, {section: values})
        return ""
    return apply


def _remove_image(split: str):
    def apply(ws):
        _image_of(ws, split).unlink()
        return _records(ws, split)[0]["id"]
    return apply


def _bad_mme_line(ws):
    mme = ws.data / "mme/MME_Benchmark_release_version/existence"
    txt = sorted(mme.glob("*.txt"))[0]
    txt.write_text("Is there a dog in this image? Please answer yes or no.\n", encoding="utf-8")  # no answer column
    return txt.name


# ---------------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    command: str
    case: str
    outcome: str
    breaks: Callable[[Workspace], str]  # returns the record id (or a file name) the message must name
    args: tuple[str, ...] = ()
    exit_code: int = EXIT_FAILED
    needles: tuple[str, ...] = ()  # also in the message; "{record}" is replaced by what `breaks` returned
    extra: dict = field(default_factory=dict)


PROMPT = ("--prompt", "What shape is in the image?")
PREDICT = (*PROMPT, "--editors", "{ws}/models/editors")

CASES = [
    # --- mrt validate ---------------------------------------------------------------------------------
    Case("validate-truncated-json", "validate", "annotation JSON cut off half-way",
         "exit 1; names the file and the line/column; other splits still validated",
         _truncate_json("train"), needles=("annotation_train.json", "line ", " col ", "json_syntax")),
    Case("validate-wrong-types", "validate", "record with an integer id and a string for `conversations`",
         "exit 1; both records named with their field",
         _wrong_types, needles=("annotation_train.json", "record #0", "field 'id'", "record {record}",
                                "field 'conversations'")),
    Case("validate-unknown-task", "validate", "training record with an unknown task name",
         "exit 1; names record and `task_name`",
         _edit_record("train", 0, lambda r: r.update(task_name="vf_no_such_task")),
         needles=("annotation_train.json", "record {record}", "field 'task_name'", "vf_no_such_task")),
    Case("validate-zero-size-image", "validate", "zero-byte image file",
         "exit 1; names record, `image` and the 0 bytes",
         _image_bytes("train", b""), needles=("annotation_train.json", "record {record}", "field 'image'", "0 bytes")),
    Case("validate-huge-image", "validate", "image 5000×8 px (side above `validate.max_image_side`)",
         "exit 1; refused from the header, never decompressed",
         _image_bytes("train", lambda p: Image.new("RGB", (5000, 8)).save(p)),
         needles=("record {record}", "field 'image'", "5000x8")),
    Case("validate-corrupt-image", "validate", "image file that is not an image",
         "exit 1; names record and `image`: cannot be decoded",
         _image_bytes("heldout", b"\x89PNG\r\n\x1a\n garbage"),
         needles=("annotation_heldout.json", "record {record}", "field 'image'", "cannot be decoded")),
    Case("validate-float-image", "validate", "32-bit float image (mode F)",
         "exit 1; refused by the same rule predict/benchmark apply",
         _float_image, needles=("record {record}", "field 'image'", "mode F")),
    # --- params.yaml ----------------------------------------------------------------------------------
    Case("params-out-of-range", "train", "params.yaml: `train.lr: -0.1` (out of range)",
         "exit 2; names the file, the key and the bound", _params_value("train", lr=-0.1),
         exit_code=EXIT_BAD_PARAMS, needles=("params.yaml", "train.lr", "> 0")),
    Case("params-wrong-type", "train", "params.yaml: `train.batch_size: sixteen` (wrong type)",
         "exit 2; names the key and the expected type", _params_value("train", batch_size="sixteen"),
         exit_code=EXIT_BAD_PARAMS, needles=("params.yaml", "train.batch_size", "int")),
    Case("params-unknown-key", "train", "params.yaml: misspelt key `train.stepz`",
         "exit 2; names the unknown key", _params_value("train", stepz=5),
         exit_code=EXIT_BAD_PARAMS, needles=("params.yaml", "unknown key 'train.stepz'")),
    Case("params-broken-yaml", "validate", "params.yaml that is not valid YAML",
         "exit 2; names the file and the line", _params_file("\ntrain: [steps: 3\n"),
         exit_code=EXIT_BAD_PARAMS, needles=("params.yaml", "not valid YAML", "line")),
    Case("params-unknown-perturbation", "benchmark", "`-S benchmark.perturbations=[rain]` (unknown name)",
         "exit 2; names the key and the allowed values", lambda ws: "",
         args=("-S", "benchmark.perturbations=[rain]"), exit_code=EXIT_BAD_PARAMS,
         needles=("benchmark.perturbations", "noise")),
    # --- mrt train ------------------------------------------------------------------------------------
    Case("train-missing-image", "train", "training record whose image file is missing",
         "exit 1 before anything is written; names record and `image`", _remove_image("train"),
         needles=("annotation_train.json", "record {record}", "field 'image'", "not found")),
    Case("train-missing-answer", "train", "training record without its gpt turn",
         "exit 1 before loading the model; names record and `conversations[1]`",
         _edit_record("train", 0, lambda r: r.update(conversations=r["conversations"][:1])),
         needles=("annotation_train.json", "record {record}", "conversations[1]")),
    Case("train-overlong-answer", "train", "training answer longer than `validate.max_answer_chars`",
         "exit 1 before anything is written; names record and `conversations[1].value` (validate's rule)",
         _edit_record("train", 1, lambda r: r["conversations"][1].update(value="x" * 200)),
         needles=("annotation_train.json", "record {record}", "conversations[1].value", "200 characters")),
    Case("train-corrupt-images", "train", "training images that do not decode",
         "exit 1 at the first batch, before any checkpoint; names the image, the record and `image`",
         _every_image_corrupt("train"), needles=("record ", "field 'image'", "cannot read image")),
    # --- mrt predict ----------------------------------------------------------------------------------
    Case("predict-missing-image", "predict", "`--image` file that does not exist",
         "exit 1; names the file and which --image", lambda ws: str(ws.root / "nope.png"),
         args=(*PREDICT, "--image", "{ws}/nope.png"), needles=("--image #1", "{record}", "not found")),
    Case("predict-zero-size-image", "predict", "zero-byte `--image`",
         "exit 1; names the file and which --image", lambda ws: (ws.root / "empty.png").write_bytes(b"") and "",
         args=(*PREDICT, "--image", "{ws}/empty.png"), needles=("--image #1", "empty.png", "cannot read image")),
    Case("predict-decompression-bomb", "predict", "`--image` whose header claims 30000×30000 px",
         "exit 1; refused before decoding (no memory blow-up)",
         lambda ws: png_header_only(ws.root / "bomb.png", 30000, 30000) or "",
         args=(*PREDICT, "--image", "{ws}/bomb.png"), needles=("--image #1", "bomb.png", "too large")),
    Case("predict-editors-other-base", "predict", "editors trained on another base",
         "exit 1; names editor_config.json and `base_fingerprint` (expected vs found)", lambda ws: "",
         args=(*PROMPT, "--base", "{ws}/models/other-base", "--editors", "{ws}/models/editors"),
         needles=("editor_config.json", "field 'base_fingerprint'", "different base")),
    Case("predict-editor-config-truncated", "predict", "truncated editor_config.json",
         "exit 1; names the file: not valid JSON",
         lambda ws: (ws.editors / "editor_config.json").write_text('{"format_version": 1, "par') and "",
         args=(*PROMPT, "--editors", "{ws}/models/editors"), needles=("editor_config.json", "not valid JSON")),
    Case("predict-not-a-model-folder", "predict", "`--editors` pointing at a folder that is no training output",
         "exit 1; says which marker files were expected", lambda ws: "",
         args=(*PROMPT, "--editors", "{ws}/data"), needles=("data", "not a training output")),
    # --- mrt benchmark --------------------------------------------------------------------------------
    Case("benchmark-unknown-task", "benchmark", "held-out record with a task the manifest does not know",
         "exit 1 before generation; names record and `task_name`",
         _edit_record("heldout", 0, lambda r: r.update(task_name="hx_no_such_task")),
         needles=("annotation_heldout.json", "record {record}", "field 'task_name'", "hx_no_such_task")),
    Case("benchmark-corrupt-image", "benchmark", "held-out image that does not decode",
         "exit 1; names record and `image`; no report written", _image_bytes("heldout", b"not an image at all"),
         needles=("annotation_heldout.json", "record {record}", "field 'image'", "cannot read image")),
    Case("benchmark-bad-mme-file", "benchmark", "MME question file with a line missing its answer column",
         "exit 1; names the file and the line", _bad_mme_line, needles=("{record}", "line")),
    Case("benchmark-missing-image", "benchmark", "held-out record whose image file is missing",
         "exit 1; names record and `image`", _remove_image("heldout"),
         needles=("annotation_heldout.json", "record {record}", "field 'image'", "not found")),
]


def _marked(case: Case):
    return pytest.param(case, id=case.id, marks=pytest.mark.reliability(
        area="bad input", case=f"`mrt {case.command}`: {case.case}", outcome=case.outcome))


def message_of(result) -> str:
    return result.output + (getattr(result, "stderr", "") if not result.output else "")


@pytest.mark.parametrize("case", [_marked(c) for c in CASES])
def test_bad_input_is_refused_by_name_and_damages_nothing(ws, case: Case):
    record = str(case.breaks(ws) or "")
    before = snapshot(ws)
    reports_before = {p.name for p in ws.reports.glob("*")} if ws.reports.exists() else set()
    args = [a.replace("{ws}", str(ws.root)) for a in case.args]
    result = run_cli(ws, case.command, *args)
    text = message_of(result)

    assert result.exit_code == case.exit_code, f"exit {result.exit_code}, expected {case.exit_code}:\n{text}"
    assert result.exception is None or isinstance(result.exception, SystemExit), f"crashed: {result.exception!r}"
    assert "Traceback" not in text, text
    for needle in case.needles:
        needle = needle.replace("{record}", record)
        assert needle in text, f"message does not name {needle!r}:\n{text}"
    assert snapshot(ws) == before, "a failing command changed the data, the models or the MLflow store"
    if case.command in ("train", "benchmark", "predict"):  # no half-written training or benchmark outputs
        after = {p.name for p in ws.reports.glob("*")} if ws.reports.exists() else set()
        assert after == reports_before, f"new reports after a failure: {sorted(after - reports_before)}"
        assert not (ws.models / "editors-new").exists(), "training wrote outputs before refusing its input"


def test_there_are_at_least_fifteen_distinct_cases_over_every_command():
    assert len({c.id for c in CASES}) == len(CASES) >= 15
    assert {c.command for c in CASES} >= {"validate", "train", "predict", "benchmark"}
    assert any(c.exit_code == EXIT_BAD_PARAMS for c in CASES)  # params.yaml cases


# ---------------------------------------------------------------------------------------------
# non-RGB and 16-bit images: one rule (components.data.images.to_rgb) in every stage
# ---------------------------------------------------------------------------------------------
@pytest.mark.reliability(area="bad input", case="16-bit greyscale and palette/greyscale (non-RGB) images",
                         outcome="accepted everywhere by one rule: 16-bit scaled to 8 (v // 257), then RGB; "
                                 "validate passes, predict and benchmark answer")
def test_non_rgb_and_16bit_images_follow_one_rule_in_every_stage(ws):
    from components.data.images import load_image, to_rgb

    wide = np.array([[0, 257, 30000, 65535]] * 16, dtype=np.uint16)
    sixteen = ws.root / "sixteen.png"
    Image.fromarray(wide).save(sixteen)
    got = np.asarray(load_image(sixteen))
    assert got.shape == (16, 4, 3) and got[0, :, 0].tolist() == [0, 1, 116, 255]  # not clipped to 255
    assert (got[..., 0] == got[..., 2]).all()
    assert np.asarray(to_rgb(Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)))).max() == 255  # mode I, clipped

    # one 16-bit and one palette image in training and in the held-out set
    for split, mode in (("train", "I;16"), ("heldout", "P")):
        path = _image_of(ws, split)
        grey = np.asarray(Image.open(path).convert("L"), dtype=np.uint16)
        (Image.fromarray(grey * 257) if mode == "I;16" else Image.open(path).convert("P")).save(path)
    before = snapshot(ws)
    result = run_cli(ws, "validate")
    assert result.exit_code == 0, result.output
    modes = json.loads((ws.reports / "validation.json").read_text())["stats"]["images"]["modes"]
    assert set(modes) - {"RGB"}, modes  # the non-RGB images were seen and noted
    result = run_cli(ws, "predict", *PROMPT, "--editors", str(ws.editors), "--image", str(_image_of(ws, "train")))
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["prompt"] == PROMPT[1]
    result = run_cli(ws, "benchmark", "-S", "benchmark.per_task=1")
    assert result.exit_code == 0, result.output
    after = snapshot(ws)  # a benchmark that ran logs its scores to MLflow; data and models stay as they were
    assert (after["data"], after["models"]) == (before["data"], before["models"])


def test_float_image_is_refused_by_predict_and_benchmark_too(ws):
    """The other half of the rule: what validate refuses (mode F) no later stage silently converts."""
    from components.data.images import load_image

    path = ws.root / "float.tif"
    Image.fromarray(np.zeros((8, 8), dtype=np.float32), mode="F").save(path)
    with pytest.raises(ValueError, match="mode F"):
        load_image(path)
    result = run_cli(ws, "predict", *PROMPT, "--editors", "none", "--image", str(path))
    assert result.exit_code == EXIT_FAILED and "mode F" in result.output

    recs = _records(ws, "heldout")
    recs[0]["image"] = recs[0]["image"].replace(".png", ".tif")
    (ws.data / "images" / recs[0]["image"]).write_bytes(path.read_bytes())
    _save_records(ws, "heldout", recs)
    before = snapshot(ws)
    result = run_cli(ws, "benchmark")
    assert result.exit_code == EXIT_FAILED, result.output
    assert f"record {recs[0]['id']}" in result.output and "field 'image'" in result.output and "mode F" in result.output
    assert snapshot(ws) == before
