"""Security: nothing is unpickled or eval'd, image paths stay inside the data root, tampered editor files
are refused, and the infra scripts listen on loopback unless told otherwise.

- An AST scan of the project's code (components/, flows/, infra/, benchmarks/) fails on any call that
  can execute code hidden in a file: `torch.load` without `weights_only=True`, pickle/dill/joblib/
  cloudpickle/marshal loads, `pandas.read_pickle`, `numpy.load(allow_pickle=True)`, `yaml.load`
  without a safe loader, `yaml.unsafe_load`/`full_load`, and the builtins `eval`/`exec`. The scanner is
  tested on snippets first, so a scan that finds nothing means something.
- Records whose image is `../…`, absolute, or a symlink out of the data root are refused by name by
  `mrt validate`, `mrt train` and `mrt benchmark` (an image root that is itself a symlink still works).
- Editors whose files were tampered with — bytes flipped, tensors swapped with a forged checksum, the
  placement edited, a pickle posing as safetensors — are refused through `mrt predict`/`mrt benchmark`,
  and the pickle's payload never runs.
"""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import pytest

from reliability_env import Workspace, run_cli, snapshot, workspace

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("components", "flows", "infra", "benchmarks")
PROMPT = ("--prompt", "What shape is in the image?")


@pytest.fixture()
def ws(tmp_path_factory, tmp_path) -> Workspace:
    return workspace(tmp_path_factory, tmp_path)


# ---------------------------------------------------------------------------------------------
# the AST scan
# ---------------------------------------------------------------------------------------------
PICKLE_MODULES = ("pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve")
PICKLE_LOADERS = ("load", "loads", "Unpickler", "open")  # shelve.open unpickles too
SAFE_YAML_LOADERS = ("SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader")


def _aliases(tree: ast.AST) -> dict[str, str]:
    """local name → dotted origin, from every import in the module (`import torch as T`, `from pickle import loads`)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(func: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    parts.append(aliases.get(func.id, func.id))
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str, filename: str = "<snippet>") -> list[str]:
    """Every call in `source` that could run code from a file or a string, as 'file:line: what'."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases) or ""
        where = f"{filename}:{node.lineno}"
        mod, _, attr = name.rpartition(".")
        if isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec") and node.func.id not in aliases:
            found.append(f"{where}: builtin {node.func.id}()")
        elif name == "torch.load" and not _is_true(_kw(node, "weights_only")):
            found.append(f"{where}: torch.load without weights_only=True")
        elif mod.split(".")[0] in PICKLE_MODULES and attr in PICKLE_LOADERS:
            found.append(f"{where}: {name} (unpickling)")
        elif attr == "read_pickle" and mod.split(".")[0] in ("pandas", "pd"):
            found.append(f"{where}: {name} (unpickling)")
        elif name in ("numpy.load", "np.load") and _is_true(_kw(node, "allow_pickle")):
            found.append(f"{where}: numpy.load(allow_pickle=True)")
        elif name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
            found.append(f"{where}: {name}")
        elif name in ("yaml.load", "yaml.load_all"):
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            loader_name = (_dotted(loader, aliases) or "") if loader is not None else ""
            if loader_name.rpartition(".")[2] not in SAFE_YAML_LOADERS:
                found.append(f"{where}: {name} without a safe Loader")
    return found


@pytest.mark.parametrize("snippet", [
    "import torch\nstate = torch.load('x.pt')",
    "import torch\nstate = torch.load('x.pt', weights_only=False)",
    "import torch as T\nT.load(f)",
    "from torch import load\nload(f)",
    "import pickle\npickle.loads(b)",
    "from pickle import Unpickler\nUnpickler(f).load()",
    "import joblib\nm = joblib.load('m.joblib')",
    "import dill\ndill.load(f)",
    "import pandas as pd\npd.read_pickle('x.pkl')",
    "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
    "import yaml\nyaml.load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.FullLoader)",
    "import yaml\nyaml.unsafe_load(text)",
    "eval(expr)",
    "exec(code, {})",
])
def test_scanner_flags_each_unsafe_pattern(snippet):
    assert unsafe_calls(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load(p, weights_only=True)",
    "model.eval()",
    "import yaml\nyaml.safe_load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
    "import numpy as np\nnp.load('x.npy')",
    "import json\njson.loads(s)",
    "from safetensors.torch import load_file\nload_file(p)",
])
def test_scanner_passes_safe_code(snippet):
    assert unsafe_calls(snippet) == []


# ---------------------------------------------------------------------------------------------
# Prefect result storage: task and flow results are never persisted as (cloud)pickle files
# ---------------------------------------------------------------------------------------------
PREFECT_DECORATORS = ("prefect.task", "prefect.flow")
JSON_SERIALIZERS = ("json",)


def _prefect_call(node: ast.Call, aliases: dict[str, str]) -> str | None:
    name = _dotted(node.func, aliases) or ""
    if name in PREFECT_DECORATORS:
        return name
    if isinstance(node.func, ast.Attribute) and node.func.attr == "with_options":
        return "with_options"
    return None


def pickled_results(source: str, filename: str = "<snippet>") -> list[str]:
    """Prefect tasks/flows whose results could be written to result storage with a pickle serializer
    (and loaded — executed — by a later run): every `@task`/`@flow` must say `persist_result=False`
    or use the JSON serializer; `.with_options(...)` may not turn persistence back on."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []

    def check(call: ast.Call, what: str, required: bool) -> None:
        persist = _kw(call, "persist_result")
        serializer = _kw(call, "result_serializer")
        json_results = isinstance(serializer, ast.Constant) and serializer.value in JSON_SERIALIZERS
        off = isinstance(persist, ast.Constant) and persist.value is False
        if serializer is not None and not json_results:
            found.append(f"{filename}:{call.lineno}: {what} with a non-JSON result_serializer")
        elif required and not (off or json_results):
            found.append(f"{filename}:{call.lineno}: {what} without persist_result=False (results may be pickled)")
        elif not required and persist is not None and not off and not json_results:
            found.append(f"{filename}:{call.lineno}: {what} turns result persistence on")

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and _prefect_call(dec, aliases) in PREFECT_DECORATORS:
                    check(dec, f"@{_dotted(dec.func, aliases)} {node.name}", True)
                elif not isinstance(dec, ast.Call) and (_dotted(dec, aliases) or "") in PREFECT_DECORATORS:
                    found.append(f"{filename}:{dec.lineno}: bare @{_dotted(dec, aliases)} {node.name} persists by default "
                                 "settings; pass persist_result=False")
        elif isinstance(node, ast.Call) and _prefect_call(node, aliases) == "with_options":
            check(node, ".with_options()", False)
    return found


@pytest.mark.parametrize("snippet", [
    "from prefect import task\n@task\ndef f(): pass",
    "from prefect import task\n@task(name='x')\ndef f(): pass",
    "from prefect import task\n@task(persist_result=True)\ndef f(): pass",
    "from prefect import flow\n@flow(name='x', result_serializer='pickle')\ndef f(): pass",
    "import prefect\n@prefect.task(cache_key_fn=k)\ndef f(): pass",
    "t.with_options(persist_result=True)",
    "t.with_options(result_serializer='compressed/pickle')",
])
def test_result_scanner_flags_pickled_results(snippet):
    assert pickled_results(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "from prefect import task\n@task(persist_result=False)\ndef f(): pass",
    "from prefect import flow\n@flow(name='x', persist_result=False)\ndef f(): pass",
    "from prefect import task\n@task(result_serializer='json')\ndef f(): pass",
    "t.with_options(refresh_cache=True)",
    "t.with_options(persist_result=False)",
])
def test_result_scanner_passes_unpersisted_or_json_results(snippet):
    assert pickled_results(snippet) == []


@pytest.mark.reliability(area="security", case="Prefect result storage: AST scan of every @task/@flow",
                         outcome="no task or flow result is persisted with a pickle serializer (persist_result=False "
                                 "everywhere; DVC decides staleness), so nothing in result storage is ever loaded")
def test_prefect_results_are_never_pickled():
    files = [p for d in SCANNED if (REPO / d).is_dir() for p in sorted((REPO / d).rglob("*.py"))]
    decorated = [p for p in files if "@task(" in p.read_text(encoding="utf-8") or "@flow(" in p.read_text(encoding="utf-8")]
    assert any(p.name == "tasks.py" for p in decorated)  # the scan sees the flows
    found = [hit for p in files for hit in pickled_results(p.read_text(encoding="utf-8"), str(p.relative_to(REPO)))]
    assert found == [], "Prefect results that may be pickled:\n" + "\n".join(found)


@pytest.mark.reliability(area="security", case="AST scan of components/, flows/, infra/, benchmarks/ for code-executing loads",
                         outcome="no torch.load without weights_only=True, no pickle/dill/joblib loads, no unsafe "
                                 "yaml.load, no eval/exec")
def test_project_code_never_unpickles_or_evals():
    files = [p for d in SCANNED if (REPO / d).is_dir() for p in sorted((REPO / d).rglob("*.py"))]
    assert any(p.parent.name == "components" for p in files)
    found = [hit for p in files for hit in unsafe_calls(p.read_text(encoding="utf-8"), str(p.relative_to(REPO)))]
    assert found == [], "code that can execute what a file contains:\n" + "\n".join(found)


# ---------------------------------------------------------------------------------------------
# image paths confined to the data root
# ---------------------------------------------------------------------------------------------
def _recs(ws: Workspace, split: str) -> list[dict]:
    return json.loads(ws.annotation(split).read_text(encoding="utf-8"))


def _set_image(ws: Workspace, split: str, value: str) -> str:
    recs = _recs(ws, split)
    recs[0]["image"] = value
    ws.annotation(split).write_text(json.dumps(recs, indent=1), encoding="utf-8")
    return recs[0]["id"]


def _symlink_out(ws: Workspace, split: str) -> str:
    """Replace a record's image by a symlink to a (valid) PNG outside the data set."""
    from PIL import Image

    outside = ws.root / "outside"
    outside.mkdir()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(outside / "secret.png")
    rec = _recs(ws, split)[0]
    link = ws.data / "images" / rec["image"]
    link.unlink()
    link.symlink_to(outside / "secret.png")
    return rec["id"]


ESCAPES = {
    "dotdot": (lambda ws, split: _set_image(ws, split, "../../../../etc/hostname"), "escapes"),
    "absolute": (lambda ws, split: _set_image(ws, split, "/etc/hostname"), "absolute"),
    "symlink": (_symlink_out, "symbolic link"),
}
COMMAND_SPLIT = {"validate": "train", "train": "train", "benchmark": "heldout"}


@pytest.mark.parametrize("command", list(COMMAND_SPLIT))
@pytest.mark.parametrize("how", [
    pytest.param(h, id=h, marks=pytest.mark.reliability(
        area="security", case=f"image path outside the data root: {label}",
        outcome="`mrt validate`, `mrt train` and `mrt benchmark` refuse the record by name (exit 1); "
                "the file is never opened"))
    for h, label in (("dotdot", "`../../../../etc/hostname`"), ("absolute", "`/etc/hostname`"),
                     ("symlink", "a symlink inside the data set pointing outside it"))
])
def test_image_paths_are_confined_to_the_data_root(ws, how, command):
    make, needle = ESCAPES[how]
    record = make(ws, COMMAND_SPLIT[command])
    before = snapshot(ws)
    result = run_cli(ws, command)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    for part in (f"record {record}", "field 'image'", needle):
        assert part in result.output, f"{part!r} not in:\n{result.output}"
    assert snapshot(ws) == before


def test_an_image_root_that_is_itself_a_symlink_still_works(ws):
    """Mounted data sets are often symlinks: confinement resolves the root too, so this is not an escape."""
    real = ws.root / "mounted-images"
    (ws.data / "images").rename(real)
    (ws.data / "images").symlink_to(real, target_is_directory=True)
    result = run_cli(ws, "validate")
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------------------
# tampered editor files
# ---------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates a marker file: proof that something was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _forge_checksum(editors: Path) -> None:
    """What a careful attacker does: make the recorded sha256 match the swapped weights."""
    import hashlib

    cfg_path = editors / "editor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["weights_sha256"] = hashlib.sha256((editors / "editors.safetensors").read_bytes()).hexdigest()
    cfg_path.write_text(json.dumps(cfg, indent=2))


def _flip_last_byte(ws):
    path = ws.editors / "editors.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _swap_tensor_shape(ws):
    from safetensors.torch import load_file, save_file

    path = ws.editors / "editors.safetensors"
    tensors = load_file(str(path))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key][:1].clone()
    save_file(tensors, str(path))
    _forge_checksum(ws.editors)


def _extra_tensor(ws):
    import torch
    from safetensors.torch import load_file, save_file

    path = ws.editors / "editors.safetensors"
    tensors = load_file(str(path))
    tensors["backdoor.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(path))
    _forge_checksum(ws.editors)


def _edit_config(fn):
    def apply(ws):
        path = ws.editors / "editor_config.json"
        cfg = json.loads(path.read_text())
        fn(cfg)
        path.write_text(json.dumps(cfg, indent=2))
    return apply


def _pickle_as_safetensors(ws):
    path = ws.editors / "editors.safetensors"
    path.write_bytes(pickle.dumps(_Payload(ws.root / "PWNED")))
    _forge_checksum(ws.editors)


TAMPERING = {
    "flipped-byte": (_flip_last_byte, "editors.safetensors", ("sha256", "NaN", "not a readable")),
    "shape-forged-checksum": (_swap_tensor_shape, "editors.safetensors", ("has shape",)),
    "extra-tensor-forged-checksum": (_extra_tensor, "editors.safetensors", ("unexpected tensor 'backdoor.weight'",)),
    "placement-edited": (_edit_config(lambda c: c["layers"].update(prefix=[0])), "editor_config.json",
                         ("layers.prefix",)),
    "rank-edited": (_edit_config(lambda c: c["params"]["prefix"].update(rank=3)), "editors.safetensors",
                    ("has shape",)),
    "format-version": (_edit_config(lambda c: c.update(format_version=99)), "editor_config.json",
                       ("format_version",)),
    "pickle-posing-as-safetensors": (_pickle_as_safetensors, "editors.safetensors", ("not a readable safetensors",)),
}
LABELS = {
    "flipped-byte": "one byte of editors.safetensors flipped",
    "shape-forged-checksum": "a tensor of another shape, checksum in editor_config.json forged to match",
    "extra-tensor-forged-checksum": "an extra tensor smuggled in, checksum forged",
    "placement-edited": "editor_config.json `layers` edited",
    "rank-edited": "editor_config.json `params.prefix.rank` edited",
    "format-version": "editor_config.json `format_version` from the future",
    "pickle-posing-as-safetensors": "a pickle renamed editors.safetensors (checksum forged)",
}


@pytest.mark.parametrize("command", ["predict", "benchmark"])
@pytest.mark.parametrize("how", [
    pytest.param(h, id=h, marks=pytest.mark.reliability(
        area="security", case=f"tampered editors: {LABELS[h]}",
        outcome="`mrt predict` and `mrt benchmark` refuse to load them, naming the file and what differs"))
    for h in TAMPERING
])
def test_tampered_editors_are_refused(ws, how, command):
    tamper, file_named, any_of = TAMPERING[how]
    tamper(ws)
    before = snapshot(ws)
    args = (*PROMPT, "--editors", str(ws.editors)) if command == "predict" else ("--model-dir", str(ws.editors))
    result = run_cli(ws, command, *args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert file_named in result.output, result.output
    assert any(a in result.output for a in any_of), result.output
    assert not (ws.root / "PWNED").exists(), "a pickle payload ran"
    assert snapshot(ws) == before
    assert not (ws.reports / "benchmark.json").exists()


def test_the_pickle_payload_would_run_if_unpickled(tmp_path):
    """The control for the test above: the payload is live, so its absence there means it never ran."""
    pickle.loads(pickle.dumps(_Payload(tmp_path / "PWNED")))  # noqa: S301 - deliberately, in a test
    assert (tmp_path / "PWNED").exists()


# ---------------------------------------------------------------------------------------------
# infra: loopback by default
# ---------------------------------------------------------------------------------------------
INFRA = REPO / "infra"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _infra_or_skip() -> Path:
    if not INFRA.is_dir():
        pytest.skip("infra/ not written yet")
    return INFRA


@pytest.mark.reliability(area="security", case="infra scripts' default bind address",
                         outcome="every `--host` default in infra/*.py and *.sh is loopback; no script defaults to 0.0.0.0")
def test_infra_scripts_bind_to_loopback_by_default():
    infra = _infra_or_skip()
    checked = 0
    for path in sorted(infra.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args \
                    and isinstance(node.args[0], ast.Constant) and node.args[0].value in ("--host", "--bind"):
                default = _kw(node, "default")
                assert isinstance(default, ast.Constant) and default.value in LOOPBACK, \
                    f"{path.relative_to(REPO)}:{node.lineno}: {node.args[0].value} defaults to {ast.dump(default) if default else None}"
                checked += 1
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in ("host", "bind_host") \
                    and isinstance(node.value, ast.Constant):
                assert node.value.value in LOOPBACK, f"{path.relative_to(REPO)}:{node.lineno}: host defaults to {node.value.value}"
                checked += 1
    for path in sorted(infra.rglob("*.sh")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            assert "0.0.0.0" not in code, f"{path.relative_to(REPO)}:{n}: binds 0.0.0.0: {line.strip()}"
    assert checked, "no --host default found in infra/*.py"


@pytest.mark.reliability(area="security", case="docker compose published ports",
                         outcome="every published port is bound to 127.0.0.1 (0.0.0.0 only inside containers)")
def test_compose_publishes_ports_on_loopback_only():
    import yaml

    infra = _infra_or_skip()
    files = sorted(infra.rglob("compose*.y*ml"))
    if not files:
        pytest.skip("no compose file in infra/")
    published = 0
    for path in files:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for name, svc in (doc.get("services") or {}).items():
            for port in (svc or {}).get("ports") or []:
                host = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0] if str(port).count(":") >= 2 else None
                assert host in LOOPBACK, f"{path.relative_to(REPO)}: service {name} publishes {port!r} beyond loopback"
                published += 1
    assert published


def test_the_deployment_doc_says_how_to_add_authentication():
    """infra/services.py warns, for a non-loopback bind, to read docs/infrastructure.md's
    authentication section first: that section must exist and say how."""
    import re

    doc = (REPO / "docs" / "infrastructure.md").read_text(encoding="utf-8")
    services = (REPO / "infra" / "services.py").read_text(encoding="utf-8")
    assert "docs/infrastructure.md, 'Authentication for a shared MLflow server'" in services
    m = re.search(r"^(#+) Authentication for a shared MLflow server\n(.*?)(?=^\1 |\Z)", doc, re.S | re.M)
    assert m is not None, "docs/infrastructure.md has no 'Authentication for a shared MLflow server' section"
    assert "authentication" in m.group(2).lower() or "auth" in m.group(2).lower()
