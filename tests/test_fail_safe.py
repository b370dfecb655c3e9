"""Nothing stale, nothing half-checked: resume keyed on the inputs, checkpoints that survive their own
corruption, one input guard for every door, training that fails fast and loud, confined pointers,
bounded params YAML. Every case runs the real CLI (or the served pyfunc model's predict) on a
private copy of the reliability workspace (tests/reliability_env.py).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from reliability_env import Workspace, run_cli, snapshot, workspace, write_params

REPO = Path(__file__).resolve().parents[1]
rel = pytest.mark.reliability
PROMPT = ("--prompt", "What shape is in the image?")


@pytest.fixture()
def ws(tmp_path_factory, tmp_path) -> Workspace:
    return workspace(tmp_path_factory, tmp_path)


def _records(ws: Workspace, split: str) -> list[dict]:
    return json.loads(ws.annotation(split).read_text(encoding="utf-8"))


def _rotate_answers(ws: Workspace, split: str = "train") -> None:
    """Every training answer replaced in place by the next record's (the data stays valid)."""
    recs = _records(ws, split)
    answers = [r["conversations"][1]["value"] for r in recs]
    for r, a in zip(recs, answers[1:] + answers[:1]):
        r["conversations"][1]["value"] = a
    assert answers != [r["conversations"][1]["value"] for r in recs]
    ws.annotation(split).write_text(json.dumps(recs, indent=1) + "\n", encoding="utf-8")


def _out(ws: Workspace) -> Path:
    return ws.models / "editors-new"


def _report(ws: Workspace) -> dict:
    return json.loads((ws.reports / "train.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# resume keyed on everything; a finished run is never resumed
# ---------------------------------------------------------------------------------------------
@rel(area="faults", case="`mrt train` again after a finished run, with the training answers changed in place",
     outcome="trains afresh on the new data (the finished run left no checkpoint); other editors")
def test_a_finished_run_is_never_resumed(ws):
    first = run_cli(ws, "train")
    assert first.exit_code == 0, first.output
    assert not (_out(ws) / "checkpoints").exists(), "a finished run left checkpoints to resume from"
    weights = (_out(ws) / "editors.safetensors").read_bytes()
    _rotate_answers(ws)
    again = run_cli(ws, "train")
    assert again.exit_code == 0, again.output
    assert "resuming" not in again.output, again.output
    assert _report(ws)["resumed_from"] is None and _report(ws)["steps"] == 2
    assert (_out(ws) / "editors.safetensors").read_bytes() != weights


# ---------------------------------------------------------------------------------------------
# a killed run's checkpoints: corrupt newest → previous one; changed data → fresh, says why
# ---------------------------------------------------------------------------------------------
KILL_STEPS, KILL_EVERY = 80, 20
KILL_SETS = ("-S", f"train.steps={KILL_STEPS}", "-S", f"train.save_every={KILL_EVERY}")


@pytest.fixture(scope="module")
def killed_checkpoints(tmp_path_factory) -> Path:
    """SIGKILL a real `mrt train` once two checkpoints exist; a copy of what it left behind."""
    from components.train.checkpoints import listed
    from components.core.offline import set_offline_env

    set_offline_env()
    ws = workspace(tmp_path_factory, tmp_path_factory.mktemp("killed"))
    ckpt = _out(ws) / "checkpoints"
    env = {**os.environ, "MRT_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": ws.tracking_uri}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "train", "-p", str(ws.params), *KILL_SETS],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    try:
        while proc.poll() is None and time.monotonic() < deadline and len(listed(ckpt)) < 2:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    steps = [s for s, _ in listed(ckpt)]
    assert len(steps) >= 2 and steps[-1] < KILL_STEPS, f"not killed mid-run: checkpoints {steps}"
    keep = tmp_path_factory.mktemp("killed-copy") / "checkpoints"
    shutil.copytree(ckpt, keep)
    return keep


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


CORRUPTIONS = {
    "empty state.pt": ("state.pt", 0.0),
    "half-length state.pt": ("state.pt", 0.5),
    "half-length trainable.safetensors": ("trainable.safetensors", 0.5),
}


@pytest.mark.parametrize("how", [pytest.param(h, id=h.replace(" ", "-"), marks=rel(
    area="faults", case=f"killed `mrt train` whose newest checkpoint has an {h}" if h.startswith("e") else
    f"killed `mrt train` whose newest checkpoint has a {h}",
    outcome="the bad file is named, training resumes from the previous checkpoint and finishes (exit 0)"))
    for h in CORRUPTIONS])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(ws, killed_checkpoints, how, monkeypatch):
    from components.train.checkpoints import listed

    shutil.copytree(killed_checkpoints, _out(ws) / "checkpoints")
    (newest_step, newest), (prev_step, _) = listed(_out(ws) / "checkpoints")[-1], listed(_out(ws) / "checkpoints")[-2]
    name, keep = CORRUPTIONS[how]
    _truncate(newest / name, keep)
    monkeypatch.setenv("MRT_DEBUG", "1")  # details shown, and still no traceback: the fallback is not an error
    result = run_cli(ws, "train", *KILL_SETS)
    assert result.exit_code == 0, result.output
    assert str(newest / name) in result.output and "trying the previous one" in result.output, result.output
    assert "[" in result.output.split(str(newest / name), 1)[1].splitlines()[0]  # MRT_DEBUG: the underlying error
    assert f"resuming from {_out(ws) / 'checkpoints' / f'step-{prev_step}'} (step {prev_step})" in result.output
    assert _report(ws)["resumed_from"] == prev_step < newest_step and _report(ws)["steps"] == KILL_STEPS
    assert not (_out(ws) / "checkpoints").exists()


@rel(area="faults", case="killed `mrt train`, then the training answers changed in place before the restart",
     outcome="its checkpoints are not resumed: the message says the data changed; training starts fresh")
def test_changed_data_is_never_resumed_and_says_why(ws, killed_checkpoints):
    shutil.copytree(killed_checkpoints, _out(ws) / "checkpoints")
    _rotate_answers(ws)
    result = run_cli(ws, "train", *KILL_SETS)
    assert result.exit_code == 0, result.output
    assert "changed: data)" in result.output and "training starts fresh" in result.output, result.output
    assert not [line for line in result.output.splitlines() if line.startswith("resuming from")]
    assert _report(ws)["resumed_from"] is None


# ---------------------------------------------------------------------------------------------
# fail fast and loud
# ---------------------------------------------------------------------------------------------
@rel(area="faults", case="`mrt train -S train.lr=1e30` (training diverges)",
     outcome="exit 1 naming the step where the loss or weights became non-finite; no editors saved")
def test_divergence_stops_training_with_a_nonzero_exit(ws):
    result = run_cli(ws, "train", "-S", "train.lr=1e30", "-S", "train.steps=4")
    assert result.exit_code == 1, result.output
    assert "not finite" in result.output or "loss is nan" in result.output.lower(), result.output
    assert "step " in result.output and "Traceback" not in result.output
    assert not (_out(ws) / "editors.safetensors").exists()


@pytest.mark.parametrize("setting, needle", [
    pytest.param("train.steps=0", "train.steps", marks=rel(area="bad input", case="`mrt train -S train.steps=0`",
                                                           outcome="exit 2 naming train.steps; nothing saved")),
    pytest.param("train.lr=inf", "train.lr", marks=rel(area="bad input", case="`mrt train -S train.lr=inf` (or nan)",
                                                       outcome="exit 2 naming train.lr; nothing saved")),
])
def test_untrainable_settings_are_refused_before_training(ws, setting, needle):
    result = run_cli(ws, "train", "-S", setting)
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert not _out(ws).exists()


@rel(area="faults", case="`mrt train` whose report folder cannot be created (a file is in the way)",
     outcome="exit 1 before the first step, naming the folder; no editors written")
def test_an_unwritable_output_folder_is_found_before_training(ws):
    (ws.root / "blocker").write_text("a file, not a folder\n")
    result = run_cli(ws, "train", "-S", f"train.report={ws.root / 'blocker' / 'train.json'}")
    assert result.exit_code == 1, result.output
    assert "not writable" in result.output and str(ws.root / "blocker") in result.output, result.output
    assert "step 1/" not in result.output and not _out(ws).exists()


# ---------------------------------------------------------------------------------------------
# one input guard: the same limits and decoding in validate, train, predict, benchmark, pyfunc
# ---------------------------------------------------------------------------------------------
def _png(path: Path, size: tuple[int, int]) -> Path:
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


@rel(area="bad input", case="image larger than `validate.max_image_side` in train, predict and benchmark",
     outcome="every command refuses it by the same rule (exit 1, record and field named), before decoding it")
def test_image_limits_hold_in_every_command(ws):
    write_params(ws, {"validate": {"max_image_side": 40}})
    big = _png(ws.root / "big.png", (48, 48))
    result = run_cli(ws, "predict", *PROMPT, "--editors", "none", "--image", str(big))
    assert result.exit_code == 1 and "too large (48x48)" in result.output, result.output

    train_rec = _records(ws, "train")[0]
    shutil.copy(big, ws.data / "images" / train_rec["image"])
    for command in ("validate", "train"):
        before = snapshot(ws)
        result = run_cli(ws, command)
        assert result.exit_code == 1, (command, result.output)
        assert f"record {train_rec['id']}" in result.output and "field 'image'" in result.output, result.output
        assert "48x48" in result.output and "Traceback" not in result.output
        assert snapshot(ws) == before and not _out(ws).exists()

    held = _records(ws, "heldout")[0]
    shutil.copy(big, ws.data / "images" / held["image"])
    result = run_cli(ws, "benchmark")
    assert result.exit_code == 1 and f"record {held['id']}" in result.output and "48x48" in result.output, result.output


@pytest.fixture()
def served(ws):
    """The pyfunc model as `mlflow models serve` runs it: load_context on the logged artifacts, then predict."""
    from components.editors.io import CONFIG_NAME
    from components.track.pyfunc_model import ARTIFACT_ADAPTER, ARTIFACT_BASE_REF, MRTEditorModel, base_reference

    fingerprint = json.loads((ws.editors / CONFIG_NAME).read_text())["base_fingerprint"]
    ref = ws.root / "base_ref.json"
    ref.write_text(json.dumps(base_reference(ws.base, fingerprint)))

    def load(**config):
        model = MRTEditorModel()
        model.load_context(SimpleNamespace(artifacts={ARTIFACT_BASE_REF: str(ref), ARTIFACT_ADAPTER: str(ws.editors)},
                                           model_config=config))
        return model
    return load


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@rel(area="bad input", case="served model: 16-bit greyscale, float (mode F) and oversized images",
     outcome="decoded and limited exactly as `mrt predict` does: 16-bit scaled (same answer), mode F and "
             "oversized refused by row and column")
def test_served_model_and_predict_apply_one_guard(ws, served):
    import pandas as pd

    from components.data.images import load_image
    from components.track.pyfunc_model import ModelInputError, decode_image

    grey = ws.root / "grey16.png"
    Image.fromarray(np.tile(np.array([0, 20000, 40000, 65535], dtype=np.uint16), (32, 8))).save(grey)
    assert np.array_equal(np.asarray(decode_image(_b64(grey), 0)), np.asarray(load_image(grey)))
    cli = run_cli(ws, "predict", *PROMPT, "--editors", str(ws.editors), "--image", str(grey))
    assert cli.exit_code == 0, cli.output
    model = served()
    got = model.predict(None, pd.DataFrame({"prompt": [PROMPT[1]], "image": [_b64(grey)]}),
                        params={"max_new_tokens": 2, "batch_size": 4})  # the workspace's predict section
    assert got == [json.loads(cli.output.strip().splitlines()[-1])["answer"]]

    flt = ws.root / "float.tif"
    Image.fromarray(np.zeros((16, 16), dtype=np.float32), mode="F").save(flt)
    wide = _png(ws.root / "wide.png", (5000, 8))
    for path, needle in ((flt, "mode F"), (wide, "too large (5000x8)")):
        with pytest.raises(ModelInputError, match=r"row 1, column 'image': .*" + needle.replace("(", r"\(").replace(")", r"\)")):
            model.predict(None, pd.DataFrame({"prompt": ["a", "b"], "image": ["", _b64(path)]}))


@rel(area="security", case="served model: a server-side path in the `image` column",
     outcome="refused with one message whether or not the file exists; inside a configured image root only "
             "when the model allows paths")
def test_served_model_refuses_server_side_paths_without_revealing_files(ws, served):
    import pandas as pd

    from components.track.pyfunc_model import ModelInputError

    inside = _records(ws, "train")[0]["image"]
    existing, missing = str(ws.data / "images" / inside), str(ws.data / "images" / "no-such.png")
    messages = []
    for path in (existing, missing, "/etc/hostname"):
        with pytest.raises(ModelInputError) as err:
            served().predict(None, pd.DataFrame({"prompt": ["a"], "image": [path]}))
        messages.append(str(err.value))
    assert len(set(messages)) == 1 and "paths are not accepted" in messages[0], messages
    assert "hostname" not in messages[0] and inside not in messages[0]

    allowed = served(image_root=str(ws.data / "images"), allow_image_paths=True)
    assert len(allowed.predict(None, pd.DataFrame({"prompt": ["a"], "image": [inside]}))) == 1
    messages = []
    for path in ("no-such.png", "../annotation_train.json", "/etc/hostname", "../../../../etc/hostname"):
        with pytest.raises(ModelInputError) as err:
            allowed.predict(None, pd.DataFrame({"prompt": ["a"], "image": [path]}))
        messages.append(str(err.value))
    assert len(set(messages)) == 1 and "hostname" not in messages[0], messages


# ---------------------------------------------------------------------------------------------
# confined pointers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [
    pytest.param(v, id=i, marks=rel(area="security", case=f"editor_config.json `weights_file` set to {d}",
                                    outcome="`mrt predict` refuses it naming the field; the file is not opened"))
    for i, v, d in (("absolute", "/etc/hostname", "an absolute path"),
                    ("dotdot", "../../etc/hostname", "`../../etc/hostname`"))])
def test_weights_file_is_confined_to_the_editors_folder(ws, value):
    cfg_path = ws.editors / "editor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["weights_file"] = value
    cfg_path.write_text(json.dumps(cfg))
    result = run_cli(ws, "predict", *PROMPT, "--editors", str(ws.editors))
    assert result.exit_code == 1, result.output
    assert "field 'weights_file'" in result.output and "nothing was read" in result.output, result.output


@pytest.mark.parametrize("field, value", [
    pytest.param("files.train", "../../outside.json", id="split-file", marks=rel(
        area="security", case="manifest.json split file `../../outside.json`",
        outcome="`mrt validate`/`train` refuse it naming the manifest field; nothing read")),
    pytest.param("image_root", "../../..", id="image-root", marks=rel(
        area="security", case="manifest.json relative `image_root` escaping the data folder",
        outcome="`mrt validate`/`train` refuse it naming the manifest field; nothing read")),
])
def test_manifest_paths_are_confined_to_the_data_folder(ws, field, value):
    manifest_path = ws.data / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    node, key = (manifest["files"], "train") if field == "files.train" else (manifest, field)
    node[key] = value
    manifest_path.write_text(json.dumps(manifest))
    for command in ("validate", "train"):
        result = run_cli(ws, command)
        assert result.exit_code == 1, (command, result.output)
        assert "manifest.json" in result.output and field in result.output and "escapes" in result.output, result.output


# ---------------------------------------------------------------------------------------------
# params YAML, temp files in artifacts
# ---------------------------------------------------------------------------------------------
@rel(area="bad input", case="params file with a duplicate key",
     outcome="exit 2 naming both lines; never the last value silently")
def test_duplicate_params_keys_are_refused(ws):
    ws.params.write_text(ws.params.read_text() + "train:\n  steps: 5\n")  # `train:` is already a section
    result = run_cli(ws, "params")
    assert result.exit_code == 2, result.output
    assert "duplicate key 'train'" in result.output and "first at line" in result.output


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS")
@rel(area="bad input", case="params file with a YAML alias bomb (9 nested aliases in a known key, ~500 bytes)",
     outcome="exit 2 within seconds naming the alias expansion; never expanded")
def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    import resource

    lines, prev = ["validate:", "  report:", '    - &a ["x","x","x","x","x","x","x","x","x"]'], "a"
    for name in "bcdefghi":
        lines.append(f"    - &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
        prev = name
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")

    def cap():  # expanding it would need gigabytes: fail inside this bound instead of the machine's
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "params", "-p", str(bomb)], cwd=REPO,
                              capture_output=True, text=True, timeout=60, preexec_fn=cap)
    except subprocess.TimeoutExpired:
        pytest.fail("`mrt params` on an alias bomb still running after 60 s")
    assert proc.returncode == 2, proc.stdout + proc.stderr[-2000:]
    assert "aliases are expanded" in proc.stderr and time.monotonic() - t0 < 30


@rel(area="tracking", case="a leftover `editors.safetensors.tmp-*` from an interrupted save in the editors folder",
     outcome="not shipped: the registered model's adapter holds only the editors files")
def test_temporary_files_are_never_shipped(ws, tmp_path):
    from components.track.pyfunc_model import stage_adapter

    (ws.editors / "editors.safetensors.tmp-123-abcd").write_bytes(b"half a file")
    staged = stage_adapter(ws.editors, tmp_path / "staged")
    assert sorted(p.name for p in staged.iterdir()) == ["editor_config.json", "editors.safetensors"]


# ---------------------------------------------------------------------------------------------
# concurrent first promotions on a brand-new store
# ---------------------------------------------------------------------------------------------
@rel(area="promote", case="two concurrent `mrt promote` on a brand-new SQLite store",
     outcome="both exit 0: the store is created once, under the promotion lock; two complete versions")
def test_concurrent_promotions_on_a_new_store(ws, tmp_path):
    db = ws.root / "fresh" / "mlflow.db"
    uri = f"sqlite:///{db}"
    bench = {"model": {"trainable_params": 100, "trainable_pct": 0.5}, "heldout": {"hx_a": 0.5}, "heldout_mean": 0.5,
             "mme": {"existence": {"acc": 50.0, "acc_plus": 0.0, "score": 50.0}}, "mme_perception": 50.0,
             "mme_cognition": 0.0, "mme_total": 50.0, "robustness": {}, "real_image_mean": None}
    procs = []
    for i in range(2):
        d = ws.root / f"p{i}"
        d.mkdir()
        (d / "benchmark.json").write_text(json.dumps(bench))
        (d / "validation.json").write_text(json.dumps({"success": True, "checks_failed": 0}))
        write_params(ws, {"track": {"tracking_uri": uri, "system_metrics": False, "retries": 1, "retry_delay_s": 0.05},
                          "promote": {"candidate_dir": str(ws.editors), "benchmark_report": str(d / "benchmark.json"),
                                      "validation_report": str(d / "validation.json"),
                                      "report": str(d / "promotion.json")}})
        params = shutil.copy(ws.params, d / "params.yaml")
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MRT_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "flows.cli", "promote", "-p", str(params)],
                                      cwd=ws.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for proc in procs:
        try:
            outs.append(proc.communicate(timeout=240)[0])
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    assert [p.returncode for p in procs] == [0, 0], "\n-----\n".join(outs)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions("name='mrt-editors'")
    assert len(versions) == 2 and all(v.tags.get("mrt.state") == "complete" for v in versions), \
        [(v.version, v.tags) for v in versions]


# ---------------------------------------------------------------------------------------------
# a killed `mrt run`: its temporary Prefect server stops, its MLflow runs end KILLED
# ---------------------------------------------------------------------------------------------
def _proc_tree(pid: int) -> dict[int, str]:
    from components.track.lifeline import _descendants

    out = {}
    for child in _descendants(pid):
        try:
            out[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            pass
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
@pytest.mark.slow
@rel(area="faults", case="`mrt run` killed with SIGKILL while its stages run",
     outcome="its temporary Prefect server stops within seconds; its RUNNING MLflow runs end KILLED by the check "
             "`mrt run` makes first")
def test_a_killed_pipeline_leaves_no_server_and_no_running_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    from components.core.config import TrackParams
    from components.track.lifeline import _start_time, end_orphaned_runs

    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):  # a DVC project: the flow's tasks run its stages
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / ".dvc", tmp_path / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    for name in ("components", "flows"):  # the stages' code dependencies
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "profiles" / "smoke.yaml", tmp_path / "smoke.yaml")
    git_env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@localhost"}
    for args in (("init", "-q"), ("add", "-A"), ("commit", "-qm", "workspace")):  # DVC's status needs a repository
        subprocess.run(["git", *args], cwd=tmp_path, env=git_env, check=True, capture_output=True, timeout=60)
    db = tmp_path / "build" / "smoke" / "mlflow.db"
    env = {**os.environ, "MRT_NUM_THREADS": "1", "PREFECT_HOME": str(tmp_path / "prefect"),
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # `mrt`, `dvc`
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "-p", "smoke.yaml"], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    server: dict[int, str] = {}
    running: list = []
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            tree = _proc_tree(proc.pid)
            server = {p: c for p, c in tree.items() if "uvicorn" in c and "prefect" in c}
            if server and db.exists():
                try:
                    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
                    running = [r for e in client.search_experiments()
                               for r in client.search_runs([e.experiment_id], "attributes.status = 'RUNNING'")]
                except Exception:  # noqa: BLE001 - the store may be mid-creation
                    running = []
                if running:
                    break
            time.sleep(0.5)
        assert proc.poll() is None, "the pipeline ended before it could be killed:\n" + (tmp_path / "run.log").read_text()
        assert server and running, "no temporary Prefect server or no RUNNING MLflow run seen:\n" + (tmp_path / "run.log").read_text()
        starts = {p: _start_time(p) for p in server}
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
    gone_by = time.monotonic() + 30
    while time.monotonic() < gone_by and any(_start_time(p) == s for p, s in starts.items()):
        time.sleep(0.2)
    leftover = [p for p, s in starts.items() if _start_time(p) == s]
    for p in leftover:  # never leave it running, even when the test fails
        os.kill(p, signal.SIGKILL)
    assert not leftover, f"temporary Prefect server still running after the pipeline was killed: {server}"

    # what the next `mrt run` does first (flows.pipeline.run): the killed pipeline's runs end KILLED
    track = TrackParams(tracking_uri=f"sqlite:///{db}")
    assert end_orphaned_runs(track) >= 1
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    for r in running:
        assert client.get_run(r.info.run_id).info.status == "KILLED"


@rel(area="promote", case="promotion lease left by a process killed mid-promotion (server store)",
     outcome="stale at once (its holder's process is gone), not after the lease's TTL; a live holder's or another "
             "host's lease is kept")
def test_a_dead_holders_lease_is_stale_and_a_live_one_is_not():
    from components.track.registry import _stale

    host = os.uname().nodename
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    future = time.time() + 100
    assert _stale({"token": f"abc@{host}:{dead.pid}", "expires": future}, "mine")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not _stale({"token": f"abc@{host}:{live.pid}", "expires": future}, "mine")
    finally:
        live.kill()
        live.wait(timeout=30)
    assert not _stale({"token": f"abc@another-host:{dead.pid}", "expires": future}, "mine")


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE semantics")
@rel(area="faults", case="`mrt train` when a checkpoint cannot be written (file-size limit: what a full disk does to a write)",
     outcome="exit 1 naming the checkpoint and the OS reason; no half-written checkpoint or temporary folder left")
def test_a_failed_checkpoint_write_is_clear_and_leaves_nothing(ws):
    import resource

    def limit():  # writes past 6000 bytes fail with EFBIG (the trainable tensors fit, the state does not)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))

    # no tracking store to write to under the limit: a closed local port (the stage then runs untracked)
    write_params(ws, {"track": {"retries": 0, "system_metrics": False}})
    env = {**os.environ, "MRT_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    env.pop("MRT_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "train", "-p", str(ws.params)], cwd=REPO, env=env,
                          preexec_fn=limit, capture_output=True, text=True, timeout=240)
    ckpt = _out(ws) / "checkpoints"
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"{ckpt / 'step-1'}: cannot write the step-1 checkpoint (File too large)" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not ckpt.exists() or not list(ckpt.iterdir()), sorted(p.name for p in ckpt.iterdir())
    assert not (_out(ws) / "editors.safetensors").exists()


@rel(area="tracking", case="`mrt promote` against a tracking server that accepts connections but never answers",
     outcome="exit 1 within the params' bound (request_timeout_s × attempts), one error line, no traceback")
def test_a_silent_tracking_server_fails_fast_with_one_line(ws):
    import socket
    import threading

    held = []
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.2)
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])  # accepted, never answered
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    uri = f"http://127.0.0.1:{srv.getsockname()[1]}"
    bench = ws.root / "benchmark.json"
    bench.write_text(json.dumps({"model": {"trainable_params": 1, "trainable_pct": 0.1}, "heldout": {"hx_a": 0.5},
                                 "heldout_mean": 0.5, "mme": {}, "mme_perception": 0.0, "mme_cognition": 0.0,
                                 "mme_total": 0.0, "robustness": {}, "real_image_mean": None}))
    (ws.root / "validation.json").write_text(json.dumps({"success": True, "checks_failed": 0}))
    write_params(ws, {"track": {"tracking_uri": uri, "request_timeout_s": 2, "retries": 1, "retry_delay_s": 0.1,
                                "system_metrics": False},
                      "promote": {"candidate_dir": str(ws.editors), "benchmark_report": str(bench),
                                  "validation_report": str(ws.root / "validation.json"),
                                  "report": str(ws.root / "promotion.json")}})
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MRT_NUM_THREADS": "1"}
    for key in ("MRT_DEBUG", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        env.pop(key, None)
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "promote", "-p", str(ws.params)], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=150)
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        srv.close()
    took = time.monotonic() - t0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert uri in lines[0] and "failed after 2 attempt(s)" in lines[0], lines[0]
    assert took < 60, f"took {took:.0f} s"
