"""The trained editors (or LoRA / full / frozen output) as an MLflow pyfunc model.

Why a pyfunc: the registry then holds a self-describing model — `mlflow.pyfunc.load_model(
"models:/mrt-editors@champion")` answers questions without knowing what an editor is, and the same
version can be served by `mlflow models serve`. The weights travel as plain artifacts (the base
folder and the editors folder, safetensors + JSON); only the small `MRTEditorModel` class reference
is pickled, and it loads everything through `components.inference.load_model`, so the registry
answers exactly what `mrt predict` answers.

Input: a pandas DataFrame with a `prompt` column and an optional `image` column holding base64-encoded
PNG/JPEG bytes, raw bytes, or nothing (text-only question); a server-side file path only when the
model_config sets `allow_image_paths: true` and an `image_root` (the path must lie inside it).
Images pass the same guard as `mrt predict` (components.images). Output: one answer per row.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc

ARTIFACT_BASE = "base"
ARTIFACT_ADAPTER = "adapter"
# resumable training state (large, not part of the model) and interrupted writes' temporary files
_SKIP_IN_ADAPTER = ("checkpoints", "*.tmp", "*.tmp-*", "*.tmp.*")


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
    limits are those of `mrt predict` (components.images, the one input guard)."""
    from PIL import Image

    from components.batching import to_rgb
    from components.images import ImageRefused, decode_bytes, decode_file, request_path

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
        from components.inference import load_model

        base = context.artifacts[ARTIFACT_BASE]
        adapter = context.artifacts.get(ARTIFACT_ADAPTER)
        self._loaded = load_model(base, adapter)
        cfg = dict(getattr(context, "model_config", None) or {})
        self._max_new_tokens = int(cfg.get("max_new_tokens", 8))
        self._batch_size = int(cfg.get("batch_size", 16))
        from components.images import ImageLimits

        self._limits = ImageLimits.from_config(cfg)  # the params' validate limits, or their defaults
        self._image_root = cfg.get("image_root")  # paths in requests: only under it, only when allowed
        self._allow_paths = bool(cfg.get("allow_image_paths", False))

    def predict(self, context, model_input, params=None) -> list[str]:
        import pandas as pd

        from components.inference import generate

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


def input_example():
    """A one-row request (for docs and serving checks; not logged, see log_pyfunc)."""
    import pandas as pd

    return pd.DataFrame({"prompt": ["What color is the image?"], "image": [""]})


def pip_requirements() -> list[str]:
    """Pinned to what is installed here: explicit requirements keep log_model fast (no inference
    of the environment, ~0.05 s instead of ~2.5 s) and make the served environment match."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("mlflow", "torch", "transformers", "safetensors", "peft", "pillow", "pandas", "mrt-pipeline"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:  # pragma: no cover - a source checkout without install
            reqs.append(dist)
    return reqs


def stage_adapter(adapter_dir: str | os.PathLike, into: str | os.PathLike) -> Path:
    """A copy of the editors/adapter folder without resumable checkpoints, for logging."""
    src, dst = Path(adapter_dir), Path(into) / Path(adapter_dir).name
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: editors/adapter folder not found (run `mrt train` first)")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*_SKIP_IN_ADAPTER, ".*"))
    return dst


_ENTRY = """# Written by components.pyfunc_model.log_pyfunc: MLflow "models from code" entry point.
import mlflow.models

from components.pyfunc_model import MRTEditorModel

mlflow.models.set_model(MRTEditorModel())
"""


def log_pyfunc(run_id: str, base_dir: str | os.PathLike, adapter_dir: str | os.PathLike | None,
               name: str = "editor_model", model_config: dict | None = None):
    """Log the model into `run_id` (explicit run id: no reliance on the thread-local active run).
    Returns MLflow's ModelInfo.

    The model is logged "from code" (a three-line entry file that builds `MRTEditorModel`), so
    nothing is pickled. It carries a signature but no input example: MLflow validates an example
    by loading the whole model a second time, which for a real LLaVA costs minutes."""
    import tempfile
    import warnings

    from mlflow.models import Model

    base = Path(base_dir)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{base}: base model folder not found or has no config.json (run `mrt align`)")
    with tempfile.TemporaryDirectory(prefix="mrt-pyfunc-") as tmp:
        artifacts = {ARTIFACT_BASE: str(base)}
        if adapter_dir is not None:
            from components.inference import detect_kind

            detect_kind(adapter_dir)  # fails early, naming the folder, when it is not a training output
            artifacts[ARTIFACT_ADAPTER] = str(stage_adapter(adapter_dir, tmp))
        entry = Path(tmp) / "mrt_editor_model.py"
        entry.write_text(_ENTRY, encoding="utf-8")
        # Created here, in the run's experiment: Model.log alone files the model under the
        # process-wide "active experiment" (Default, with its own artifact root), not the run's.
        client = mlflow.MlflowClient()
        experiment_id = client.get_run(run_id).info.experiment_id
        model_id = client.create_logged_model(experiment_id, name=name, source_run_id=run_id).model_id
        with warnings.catch_warnings():  # the two choices above are deliberate (see the docstring)
            warnings.filterwarnings("ignore", message=".*(type hints|input example was not provided).*")
            return _log(Model, name, run_id, model_id, entry, artifacts, model_config)


def _log(Model, name, run_id, model_id, entry, artifacts, model_config):
    return Model.log(
        artifact_path=None,
        name=name,
        flavor=mlflow.pyfunc,
        run_id=run_id,
        model_id=model_id,
        python_model=str(entry),
        artifacts=artifacts,
        pip_requirements=pip_requirements(),
        signature=signature(),
        model_config=model_config or {"max_new_tokens": 8, "batch_size": 16},
    )
