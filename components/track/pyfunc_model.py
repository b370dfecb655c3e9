"""The trained editors (or LoRA / full / frozen output) as an MLflow pyfunc model.

Why a pyfunc: the registry then holds a self-describing model — `mlflow.pyfunc.load_model(
"models:/mrt-editors@champion")` answers questions without knowing what an editor is, and the same
version can be served by `mlflow models serve`. It is logged "from code": a three-line entry file
builds `MRTEditorModel`, the `components` package travels as the model's code (`code_paths`), and
its requirements are public packages, so MLflow can build the serving environment from an index.

What a version holds: the editors (or adapter) folder and `base_ref.json` — a *reference* to the
frozen base (the path it was trained from, its source id and its fingerprint), never the base's
weights: the base is gigabytes, the editors kilobytes to megabytes. Loading a version finds the
base (`MRT_BASE_DIR` first, then the recorded path) and checks its fingerprint before anything
answers; a missing or different base is an error that says what was expected and where it looked.
Everything loads through `components.evaluation.inference.load_model`, so the registry answers exactly what
`mrt predict` answers.

Input: a pandas DataFrame with a `prompt` column and an optional `image` column holding base64-encoded
PNG/JPEG bytes, raw bytes, or nothing (text-only question); a server-side file path only when the
model_config sets `allow_image_paths: true` and an `image_root` (the path must lie inside it).
Images pass the same guard as `mrt predict` (components.data.images). Output: one answer per row.
"""

from __future__ import annotations

import base64
import binascii
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc

ARTIFACT_BASE_REF = "base_ref"
ARTIFACT_ADAPTER = "adapter"
BASE_REF_FILE = "base_ref.json"
BASE_DIR_ENV = "MRT_BASE_DIR"  # where the base lives on the machine that loads a version (overrides the record)
# resumable training state (large, not part of the model) and interrupted writes' temporary files
_SKIP_IN_ADAPTER = ("checkpoints", "*.tmp", "*.tmp-*", "*.tmp.*")
# assets: the shipped staged base (6 MB) — a version carries its own base as an artifact, not as code.
_SKIP_IN_CODE = ("__pycache__", "*.pyc", ".*", "assets")
# What `components.evaluation.inference.load_model` and this module import when a version loads and answers
# (distribution names as on the package index).
REQUIREMENTS = ("mlflow", "torch", "transformers", "safetensors", "peft", "accelerate", "pillow", "pandas",
                "numpy", "pydantic", "pyyaml")


class BaseModelError(RuntimeError):
    """The base a registered version needs is missing or is not the one its editors were trained on."""


class ModelInputError(ValueError):
    """A pyfunc input row cannot be used; the message names the row and the column."""


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        import math

        return isinstance(value, float) and math.isnan(value)
    except TypeError:  # pragma: no cover
        return False


def decode_image(value: Any, row: int, limits=None, image_root: str | None = None, allow_paths: bool = False):
    """A PIL image (RGB) from base64 text or raw bytes — or, only when the model allows it, a path
    inside its image root; None when the cell is empty. Decoding, 16-bit scaling, mode and size
    limits are those of `mrt predict` (components.data.images, the one input guard)."""
    from PIL import Image

    from components.data.images import to_rgb
    from components.data.images import ImageRefused, decode_bytes, decode_file, request_path

    if _is_missing(value) or (isinstance(value, str) and not value.strip()):
        return None
    where = f"row {row}, column 'image'"
    try:
        if isinstance(value, Image.Image):
            return to_rgb(value)
        if isinstance(value, (bytes, bytearray, memoryview)):
            return decode_bytes(bytes(value), limits)
        if not isinstance(value, str):
            raise ModelInputError(f"{where}: expected base64 text or bytes, got {type(value).__name__}")
        text = value.strip()
        if text.startswith("data:") and "," in text:  # data URL: data:image/png;base64,....
            text = text.split(",", 1)[1]
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            data = None
        if data is not None:
            return decode_bytes(data, limits)
        if allow_paths and image_root:
            return decode_file(request_path(value.strip(), image_root, allow_paths), limits)
        raise ModelInputError(f"{where}: not base64-encoded image bytes (file paths are not accepted by this model)")
    except ImageRefused as exc:
        raise ModelInputError(f"{where}: {exc}") from None
    except ValueError as exc:  # a file under the allowed root that does not decode
        if isinstance(exc, ModelInputError):
            raise
        raise ModelInputError(f"{where}: no readable image at that path under the model's image root") from None


class MRTEditorModel(mlflow.pyfunc.PythonModel):
    """Frozen base + editors/adapter, answering with batched greedy decoding."""

    # The input is checked against the logged signature (a DataFrame schema), not against type
    # hints; this MLflow switch (the one its ChatModel uses) skips the type-hint wrapper and its
    # "add type hints" warning on every import.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from components.evaluation.inference import load_model

        cfg = dict(getattr(context, "model_config", None) or {})
        ref = read_base_ref(context.artifacts[ARTIFACT_BASE_REF])
        adapter = context.artifacts.get(ARTIFACT_ADAPTER)
        base = resolve_base(ref, adapter)
        self._loaded = load_model(base, adapter, expect_fingerprint=ref.get("fingerprint"))
        self._max_new_tokens = int(cfg.get("max_new_tokens", 8))
        self._batch_size = int(cfg.get("batch_size", 16))
        from components.data.images import ImageLimits

        self._limits = ImageLimits.from_config(cfg)  # the params' validate limits, or their defaults
        self._image_root = cfg.get("image_root")  # paths in requests: only under it, only when allowed
        self._allow_paths = bool(cfg.get("allow_image_paths", False))

    def predict(self, context, model_input, params=None) -> list[str]:
        import pandas as pd

        from components.evaluation.inference import generate

        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        if not isinstance(model_input, pd.DataFrame):
            raise ModelInputError(f"expected a DataFrame with columns prompt[, image], got {type(model_input).__name__}")
        if "prompt" not in model_input.columns:
            raise ModelInputError(f"input has no 'prompt' column (columns: {list(model_input.columns)})")
        prompts = []
        for i, p in enumerate(model_input["prompt"].tolist()):
            if _is_missing(p) or not str(p).strip():
                raise ModelInputError(f"row {i}, column 'prompt': empty")
            prompts.append(str(p))
        raw_images = model_input["image"].tolist() if "image" in model_input.columns else [None] * len(prompts)
        images = [decode_image(v, i, getattr(self, "_limits", None), getattr(self, "_image_root", None),
                               getattr(self, "_allow_paths", False)) for i, v in enumerate(raw_images)]
        params = dict(params or {})
        max_new = int(params.get("max_new_tokens", self._max_new_tokens))
        batch = int(params.get("batch_size", self._batch_size))
        loaded = self._loaded
        return generate(loaded.model, loaded.processor, images, prompts, max_new_tokens=max_new, batch_size=batch)


def signature():
    """prompt (required) and image (optional string) in; one string answer per row out; decoding
    settings as inference params."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "image", required=False)]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 8), ParamSpec("batch_size", "long", 16)]),
    )


def pip_requirements() -> list[str]:
    """REQUIREMENTS pinned to the versions installed here, as an index knows them: the local build
    label is dropped (a CPU wheel's `2.13.0+cpu` is `torch==2.13.0` on the index). Explicit
    requirements keep log_model fast (no environment inference) and make the served environment
    match; the project itself is not a requirement — its code travels with the model."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    reqs = []
    for dist in REQUIREMENTS:
        try:
            reqs.append(f"{dist}=={Version(version(dist)).public}")
        except PackageNotFoundError:  # pragma: no cover - not installed here: leave it unpinned
            reqs.append(dist)
    return reqs


# ---------------------------------------------------------------------------------------------
# the base reference
# ---------------------------------------------------------------------------------------------
def base_reference(base_dir: str | os.PathLike, fingerprint: str) -> dict[str, Any]:
    """What a version records about its base: the folder it was trained from (as given and
    absolute), where that folder came from (base_meta.json: the backbone and, for a published
    checkpoint, its source id) and the fingerprint (`components.editors.model_fingerprint`)."""
    import json

    base = Path(base_dir)
    meta: dict[str, Any] = {}
    if (base / "base_meta.json").is_file():
        try:
            meta = json.loads((base / "base_meta.json").read_text(encoding="utf-8")) or {}
        except ValueError:
            meta = {}
    if not fingerprint or fingerprint == "unknown":
        raise BaseModelError(f"{base}: no base fingerprint to record (the editors' config and the training "
                             "report name none); a version must say which base it needs")
    return {
        "format_version": 1,
        "base_dir": str(base_dir),
        "abs_path": str(base.resolve()),
        "source": meta.get("source"),
        "backbone": meta.get("backbone"),
        "fingerprint": fingerprint,
    }


def read_base_ref(path: str | os.PathLike) -> dict[str, Any]:
    import json

    p = Path(path)
    try:
        ref = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"{p}: cannot read the base reference ({exc})") from None
    for key in ("base_dir", "fingerprint"):
        if not isinstance(ref, dict) or not ref.get(key):
            raise BaseModelError(f"{p}: field {key!r} missing from the base reference")
    return ref


def resolve_base(ref: dict[str, Any], adapter_dir: str | os.PathLike | None = None) -> str:
    """The base folder to load for `ref`: $MRT_BASE_DIR when set (and then only it), else the
    recorded path, else the recorded absolute path. A full fine-tune needs no base (its folder is
    the whole model). Raises BaseModelError naming what was expected and every place looked at."""
    from components.evaluation.outputs import output_kind

    if output_kind(adapter_dir).whole_model:
        return str(adapter_dir)
    override = os.environ.get(BASE_DIR_ENV)
    tried = [override] if override else [ref.get("base_dir"), ref.get("abs_path")]
    from components.model.backbone import BASE_LINK

    for cand in tried:
        if cand and ((Path(cand) / "config.json").is_file() or (Path(cand) / BASE_LINK).is_file()):
            return str(cand)
    source = f", originally {ref['source']}" if ref.get("source") else ""
    raise BaseModelError(
        f"the base model this version was trained on is missing: expected base {ref.get('base_dir')!r}"
        f"{source} with fingerprint {ref.get('fingerprint')}; looked in "
        + ", ".join(repr(t) for t in tried if t)
        + f" (no folder with config.json or {BASE_LINK}). Set {BASE_DIR_ENV} to a folder holding that base "
        "(the `mrt align` output it was trained on)."
    )


def stage_adapter(adapter_dir: str | os.PathLike, into: str | os.PathLike) -> Path:
    """A copy of the editors/adapter folder without resumable checkpoints, for logging."""
    src, dst = Path(adapter_dir), Path(into) / Path(adapter_dir).name
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: editors/adapter folder not found (run `mrt train` first)")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*_SKIP_IN_ADAPTER, ".*"))
    return dst


_ENTRY = """# Written by components.track.pyfunc_model.log_pyfunc: MLflow "models from code" entry point.
import mlflow.models

from components.track.pyfunc_model import MRTEditorModel

mlflow.models.set_model(MRTEditorModel())
"""


def stage_code(into: str | os.PathLike) -> Path:
    """A copy of the `components` package without caches: the model's code (MLflow code_paths)."""
    import components

    src = Path(components.__file__).resolve().parent
    dst = Path(into) / "code" / src.name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*_SKIP_IN_CODE))
    return dst


def log_pyfunc(run_id: str, base_dir: str | os.PathLike, adapter_dir: str | os.PathLike | None,
               name: str = "editor_model", model_config: dict | None = None, base_fingerprint: str | None = None):
    """Log the model into `run_id` (explicit run id: no reliance on the thread-local active run).
    Returns MLflow's ModelInfo.

    The model is logged "from code" (a three-line entry file that builds `MRTEditorModel`), so
    nothing is pickled. It carries a signature but no input example: MLflow validates an example
    by loading the whole model a second time, which for a real LLaVA costs minutes.
    `base_fingerprint`: the base's fingerprint when the caller knows it (a LoRA adapter does not
    record it); else it is read from the editors' config or the frozen marker."""
    import json
    import tempfile

    from mlflow.models import Model

    from components.model.backbone import BASE_LINK

    base = Path(base_dir)
    if not ((base / "config.json").is_file() or (base / BASE_LINK).is_file()):
        raise FileNotFoundError(f"{base}: base model folder not found, or it holds neither a model (config.json) "
                                f"nor a link to one ({BASE_LINK}); run `mrt align`")
    with tempfile.TemporaryDirectory(prefix="mrt-pyfunc-") as tmp:
        artifacts = {}
        fp = base_fingerprint
        if adapter_dir is not None:
            from components.evaluation.outputs import output_kind

            # fails early, naming the folder, when it is not a training output
            kind = output_kind(adapter_dir)
            artifacts[ARTIFACT_ADAPTER] = str(stage_adapter(adapter_dir, tmp))
            fp = fp or kind.recorded_fingerprint(Path(adapter_dir))
        if not fp:  # the bare base: its own fingerprint (loads it once)
            from components.model.backbone import load_base
            from components.editors import model_fingerprint

            fp = model_fingerprint(load_base(base)[0])
        ref_file = Path(tmp) / BASE_REF_FILE
        ref_file.write_text(json.dumps(base_reference(base, fp), indent=2) + "\n", encoding="utf-8")
        artifacts[ARTIFACT_BASE_REF] = str(ref_file)
        code = stage_code(tmp)
        entry = Path(tmp) / "mrt_editor_model.py"
        entry.write_text(_ENTRY, encoding="utf-8")
        # Created here, in the run's experiment: Model.log alone files the model under the
        # process-wide "active experiment" (Default, with its own artifact root), not the run's.
        client = mlflow.MlflowClient()
        experiment_id = client.get_run(run_id).info.experiment_id
        model_id = client.create_logged_model(experiment_id, name=name, source_run_id=run_id).model_id
        with warnings.catch_warnings():  # the two choices above are deliberate (see the docstring)
            warnings.filterwarnings("ignore", message=".*(type hints|input example was not provided).*")
            return _log(Model, name, run_id, model_id, entry, artifacts, model_config, [str(code)])


def _log(Model, name, run_id, model_id, entry, artifacts, model_config, code_paths):
    return Model.log(
        artifact_path=None,
        name=name,
        flavor=mlflow.pyfunc,
        run_id=run_id,
        model_id=model_id,
        python_model=str(entry),
        artifacts=artifacts,
        code_paths=code_paths,
        pip_requirements=pip_requirements(),
        signature=signature(),
        model_config=model_config or {"max_new_tokens": 8, "batch_size": 16},
    )
