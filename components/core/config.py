"""Typed models of params.yaml, and its defaults.

The defaults here are the only ones: params.yaml is them written out (`mrt params --defaults`
prints them; tests/test_config.py fails when the two differ). Every stage reads exactly one section. Unknown keys and bad values are errors that name the key
(``train.editors.prefix.rank``) and the type that was expected, so a typo in params.yaml can never
silently fall back to a default. Nothing happens at import time: call :func:`load_params`.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


def _beside(report: str, stage: str) -> str:
    """The default headline-metrics path of a stage: `metrics/<stage>.json` in its report's folder."""
    from pathlib import PurePosixPath

    return str(PurePosixPath(report).parent / "metrics" / f"{stage}.json")


class ParamsError(ValueError):
    """A params file or override is invalid. The message names the key and what was expected."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------
# data / validate
# ---------------------------------------------------------------------------------------------
class DataParams(_Section):
    source: Literal["embedded", "visionflan"] = "embedded"
    out_dir: str = "data/visionflan-mini"
    seed: int = 0
    image_size: int = Field(64, ge=16, le=1024)
    train_per_task: int = Field(120, ge=1)
    heldout_per_task: int = Field(40, ge=1)
    heldin_per_task: int = Field(20, ge=1)  # held-in test split: training task types on unseen images
    align_size: int = Field(3000, ge=1)
    text_per_type: int = Field(80, ge=1)
    mme_images_per_subtask: int = Field(20, ge=1)
    visionflan_annotation: str | None = None
    visionflan_images: str | None = None
    heldout_tasks: list[str] = Field(default_factory=list)
    mme_root: str | None = None

    @model_validator(mode="after")
    def _real_source_needs_paths(self) -> "DataParams":
        if self.source == "visionflan" and not (self.visionflan_annotation and self.visionflan_images):
            raise ValueError(
                "source 'visionflan' needs data.visionflan_annotation and data.visionflan_images"
            )
        return self


class ValidateParams(_Section):
    data_dir: str = "data/visionflan-mini"
    report: str = "reports/validation.json"
    metrics: str | None = None  # headline numbers (dvc metrics); null = report's folder/metrics/validate.json

    @model_validator(mode="after")
    def _metrics_beside_report(self):
        if self.metrics is None:
            self.metrics = _beside(self.report, "validate")
        return self
    min_answer_chars: int = Field(1, ge=0)
    max_answer_chars: int = Field(64, ge=1)
    max_caption_chars: int = Field(512, ge=1)  # align split: captions are whole scene descriptions
    min_image_side: int = Field(8, ge=1)
    max_image_side: int = Field(4096, ge=1)
    max_image_bytes: int = Field(20_000_000, ge=1)

    @model_validator(mode="after")
    def _bounds_ordered(self) -> "ValidateParams":
        if self.min_answer_chars > self.max_answer_chars:
            raise ValueError("min_answer_chars must not exceed max_answer_chars")
        if self.min_image_side > self.max_image_side:
            raise ValueError("min_image_side must not exceed max_image_side")
        return self


# ---------------------------------------------------------------------------------------------
# align (the frozen base)
# ---------------------------------------------------------------------------------------------
class TinyModelParams(_Section):
    """Shape of the embedded tiny LLaVA (CLIP-style vision tower + Llama LM), built from config."""

    patch_size: int = Field(16, ge=1)
    vision_hidden: int = Field(96, ge=8)
    vision_layers: int = Field(4, ge=2)
    vision_heads: int = Field(4, ge=1)
    lm_hidden: int = Field(128, ge=8)
    lm_layers: int = Field(4, ge=1)
    lm_heads: int = Field(4, ge=1)
    lm_intermediate: int = Field(384, ge=8)
    vocab_size: int = Field(1024, ge=64)

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinyModelParams":
        if self.vision_hidden % self.vision_heads:
            raise ValueError("vision_hidden must be divisible by vision_heads")
        if self.lm_hidden % self.lm_heads:
            raise ValueError("lm_hidden must be divisible by lm_heads")
        return self


class StagedParams(_Section):
    """`align.recipe: staged` — the tiny base built in LLaVA's stages (components/align/staged.py).
    The defaults are the recipe of the shipped base; the shape comes from `align.tiny`."""

    clip_text_hidden: int = Field(96, ge=8)  # the CLIP text encoder (used only in the vision stage)
    clip_text_layers: int = Field(2, ge=1)
    clip_steps: int = Field(4000, ge=0)
    clip_batch: int = Field(256, ge=2)
    clip_lr: float = Field(1e-3, gt=0)
    clip_budget_s: float = Field(0.0, ge=0)  # wall-clock cap per stage (0 = none)
    lm_steps: int = Field(12000, ge=0)
    lm_batch: int = Field(256, ge=1)
    lm_lr: float = Field(2e-3, gt=0)
    lm_budget_s: float = Field(0.0, ge=0)
    proj_steps: int = Field(4000, ge=0)
    proj_batch: int = Field(128, ge=1)
    proj_lr: float = Field(2e-3, gt=0)
    proj_budget_s: float = Field(0.0, ge=0)
    # stage one b: the tower trains beside the projector on the same captions (0 steps = off)
    tower_steps: int = Field(4000, ge=0)
    tower_lr: float = Field(1e-3, gt=0)
    tower_budget_s: float = Field(0.0, ge=0)
    workers: int = Field(7, ge=0)  # data-drawing processes per stage (part of the recipe: one stream each)
    tokenizer_rows: int = Field(20000, ge=10)
    eval_retrieval: int = Field(100, ge=2)
    eval_probe_train: int = Field(3000, ge=10)
    eval_probe_test: int = Field(1000, ge=10)
    eval_text_per_type: int = Field(40, ge=1)
    eval_captions: int = Field(200, ge=1)
    eval_image_per_type: int = Field(20, ge=1)


class AlignParams(_Section):
    backbone: Literal["tiny", "llava", "composed"] = "tiny"
    # tiny: staged = LLaVA's stages (CLIP, text-only LM, projector; shipped prebuilt) | joint = one loop from scratch
    recipe: Literal["staged", "joint"] = "staged"
    shipped: str | None = "builtin"  # staged: the prebuilt base (builtin = the one in the package, or a folder); null = build
    rebuild: bool = False  # staged: build the base here instead of using the shipped one
    staged: StagedParams = Field(default_factory=StagedParams)
    model: str | None = None  # llava: HF id or local folder of a LlavaForConditionalGeneration
    vision_model: str | None = None  # composed: a CLIP vision checkpoint (id or folder)
    language_model: str | None = None  # composed: a causal LM (id or folder)
    language_model_gguf: str | None = None  # composed: GGUF file name inside language_model
    language_model_cache: str | None = "models/lm-cache"  # composed GGUF: converted once to a folder here; null = dequantise every load
    data_dir: str = "data/visionflan-mini"
    out_dir: str = "models/base"
    report: str = "reports/align.json"
    metrics: str | None = None  # headline numbers (dvc metrics); null = report's folder/metrics/align.json

    @model_validator(mode="after")
    def _metrics_beside_report(self):
        if self.metrics is None:
            self.metrics = _beside(self.report, "align")
        return self
    tiny: TinyModelParams = Field(default_factory=TinyModelParams)
    seed: int = 0
    steps: int = Field(1800, ge=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    text_ratio: float = Field(0.5, ge=0, le=1)  # share of batches that are text-only instructions
    max_length: int = Field(128, ge=16)
    eval_size: int = Field(200, ge=1)  # held-back alignment images for caption accuracy
    save_every: int = Field(250, ge=1)  # checkpoints while aligning; dropped once the base is saved
    image_size: int | None = Field(None, ge=16)  # tiny base on data without a fixed size (real Vision-Flan)
    train_language_model: bool = True  # tiny: learns its language here; composed: keep False (frozen LM)
    # llava: the dtype the base is loaded in and saved as (auto = the checkpoint's own, e.g. fp16 for
    # llava-hf/llava-1.5-7b-hf). Later stages load the saved base as it is.
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # llava: false = out_dir holds a link to the checkpoint's folder (base_link.json), not a copy (a 7B
    # checkpoint is ~14 GB, and DVC would cache a second copy); true = a full copy in `dtype`.
    copy_base: bool = False

    @model_validator(mode="after")
    def _sources_named(self) -> "AlignParams":
        if self.backbone == "llava" and not self.model:
            raise ValueError("backbone 'llava' needs align.model (an HF id or a local folder)")
        if self.backbone == "composed" and not (self.vision_model and self.language_model):
            raise ValueError("backbone 'composed' needs align.vision_model and align.language_model")
        return self


# ---------------------------------------------------------------------------------------------
# train (editors and baselines)
# ---------------------------------------------------------------------------------------------
_LAYER_WORDS = ("all", "odd", "even", "none", "first_half", "second_half")
_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def _check_layer_spec(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("layers must be a list of ints, a range 'a-b' or one of " + ", ".join(_LAYER_WORDS))
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            raise ValueError("a layer list must hold non-negative ints")
        return sorted(set(value))
    if isinstance(value, str):
        m = _RANGE.match(value)
        if value in _LAYER_WORDS:
            return value
        if m and int(m.group(1)) <= int(m.group(2)):
            return f"{int(m.group(1))}-{int(m.group(2))}"
    raise ValueError("layers must be a list of ints, a range 'a-b' or one of " + ", ".join(_LAYER_WORDS))


LayerSpec = list[int] | str


class LayerGroupParams(_Section):
    layers: LayerSpec = "all"
    rank: int = Field(4, ge=1)

    @field_validator("layers", mode="before")
    @classmethod
    def _layers_valid(cls, value: Any) -> Any:
        return _check_layer_spec(value)


class ProjectorGroupParams(_Section):
    enabled: bool = True
    rank: int = Field(6, ge=1)


class PositionGroupParams(LayerGroupParams):
    length: int = Field(4, ge=1)


class EditorParams(_Section):
    """Where the editors sit (docs/method.md's four groups). `layers: none` switches a group off."""

    visual: LayerGroupParams = Field(default_factory=lambda: LayerGroupParams(layers="all", rank=6))
    projector: ProjectorGroupParams = Field(default_factory=ProjectorGroupParams)
    prefix: PositionGroupParams = Field(default_factory=PositionGroupParams)
    suffix: PositionGroupParams = Field(default_factory=PositionGroupParams)
    dropout: float = Field(0.0, ge=0, lt=1)
    # Which code applies them (components/editors/dispatch.py): "reference" (the plain hooks), "fast"
    # (banks, fused kernels on CUDA) or "auto" (= fast). Same function; saved files do not record it.
    impl: Literal["auto", "reference", "fast"] = "auto"


class LoraParams(_Section):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str = r".*language_model.*\.(q|k|v|o|gate|up|down)_proj"


# The training methods (components/train/methods.py: METHODS, which checks that it names the same).
MethodName = Literal["mrt", "lora", "full", "frozen"]


class TrainParams(_Section):
    method: MethodName = "mrt"
    base_dir: str = "models/base"
    data_dir: str = "data/visionflan-mini"
    out_dir: str = "models/editors"
    report: str = "reports/train.json"
    curve: str = "reports/train_curve.csv"
    metrics: str | None = None  # headline numbers (dvc metrics); null = report's folder/metrics/train.json

    @model_validator(mode="after")
    def _metrics_beside_report(self):
        if self.metrics is None:
            self.metrics = _beside(self.report, "train")
        return self
    seed: int = 0
    steps: int = Field(300, ge=1)  # 0 would save untrained editors as if trained
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    # One learning rate for every method, or one per method: 13k editor weights and 1M model weights
    # do not share a best step size (the defaults: each method's best held-in rate on the shipped
    # base, docs/experiments.md). `learning_rate` is the one the chosen method trains with.
    lr: float | dict[Literal["mrt", "lora", "full"], float] = Field(
        default_factory=lambda: {"mrt": 3e-3, "lora": 1.5e-3, "full": 6e-4})
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    save_every: int = Field(100, ge=1)
    # TEXT tokens of one example (prompt + answer); the image tokens (576 for LLaVA-1.5) come on top.
    # null = the base's position budget minus its image tokens.
    max_length: int | None = Field(128, ge=16)
    # Batches built this many steps ahead in a background thread (pinned memory on CUDA), so image
    # decoding and collation overlap the model's step; 0 = build each batch inside the loop. Changes
    # no result (the same rows in the same order): not part of a run's checkpoint fingerprint.
    loader_prefetch: int = Field(2, ge=0)
    eval_per_task: int = Field(20, ge=1)  # held-out records per task for the post-training check
    eval_batch_size: int = Field(32, ge=1)
    eval_max_new_tokens: int = Field(8, ge=1)
    # Replay the vision encoder's layers as CUDA graphs in training (components/editors/fast/graphs.py):
    # a speed knob for GPUs whose step is bound by the host (docs/performance.md, batch 8);
    # CPU runs ignore it. Not part of a run's checkpoint fingerprint: it changes no result.
    cuda_graphs: bool = False
    editors: EditorParams = Field(default_factory=EditorParams)
    lora: LoraParams = Field(default_factory=LoraParams)

    @field_validator("lr", mode="before")
    @classmethod
    def _lr_number_or_per_method(cls, v):
        """One finite number > 0, or a mapping of methods (mrt, lora, full) to one; checked here so a
        bad value gets one message instead of one per alternative of the union."""
        import math

        def number(value, where):
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError(f"learning rate{where} must be a number, got {value!r}")
            try:
                x = float(value)
            except ValueError:
                raise ValueError(f"learning rate{where} must be a number, got {value!r}") from None
            if not math.isfinite(x) or x <= 0:
                raise ValueError(f"learning rate{where} must be a finite number > 0, got {value!r}")
            return x

        if isinstance(v, dict):
            unknown = sorted(str(k) for k in v if k not in ("mrt", "lora", "full"))
            if unknown or not v:
                raise ValueError(f"per-method learning rates take the keys mrt, lora, full; got {sorted(map(str, v))}")
            return {k: number(x, f" for {k}") for k, x in v.items()}
        return number(v, "")

    @model_validator(mode="after")
    def _lr_for_the_method(self):
        if isinstance(self.lr, dict) and self.method != "frozen" and self.method not in self.lr:
            raise ValueError(f"lr has no entry for method {self.method!r} (has {sorted(self.lr)}); "
                             f"add lr.{self.method} or give one number for every method")
        return self

    def rate_for(self, method: str) -> float | None:
        """The learning rate `method` trains with (lr itself when it is one number); None for the
        frozen base, which trains nothing."""
        if method == "frozen":
            return None
        return self.lr[method] if isinstance(self.lr, dict) else self.lr

    @property
    def learning_rate(self) -> float | None:
        """The learning rate of this section's own `method`."""
        return self.rate_for(self.method)


Perturbation = Literal["noise", "blur", "jitter"]


class BenchmarkParams(_Section):
    """mrt benchmark: one model over the held-out tasks and the MME-format set."""

    data_dir: str = "data/visionflan-mini"
    base_dir: str = "models/base"
    model_dir: str | None = "models/editors"  # editors / LoRA / full / frozen output; null = the bare base
    report: str = "reports/benchmark.json"
    metrics: str | None = None  # headline numbers (dvc metrics); null = report's folder/metrics/benchmark.json

    @model_validator(mode="after")
    def _metrics_beside_report(self):
        if self.metrics is None:
            self.metrics = _beside(self.report, "benchmark")
        return self
    predictions: str = "reports/predictions.jsonl"
    mme_results_dir: str = "reports/mme_results"
    per_task: int | None = Field(None, ge=1)  # cap records per held-out task; null = all
    batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(8, ge=1)
    # robustness passes on top of the clean one (held-out tasks only)
    perturbations: list[Perturbation] = Field(default_factory=lambda: ["noise", "blur", "jitter"])
    perturb_seed: int = 0


class AblateParams(_Section):
    """mrt ablate: a sweep over editor placements; each arm trains (train section + overrides) and benchmarks."""

    grid: Literal["default", "full"] = "default"  # default is sized for 2 CPU cores; full = every variant
    arms: list[str] = Field(default_factory=list)  # run only these arm names; empty = the whole grid
    steps: int = Field(150, ge=1)  # half of train.steps: sized so the whole `mrt run` fits ~10 min on 2 cores
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    # More seeds for the group arms (all, only-*, no-*): whether removing a group matters is only
    # readable against the seed spread. [] = those arms run `seeds` only, like the others.
    group_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    workers: int = Field(2, ge=1)  # arms in parallel (local process pool)
    threads_per_worker: int = Field(1, ge=1)
    out_dir: str = "models/ablation"
    per_task: int | None = Field(20, ge=1)
    report_csv: str = "reports/ablation.csv"
    report_md: str = "reports/ablation.md"
    plot: str = "reports/ablation.png"
    metrics: str | None = None  # headline numbers (dvc metrics); null = report_csv's folder/metrics/ablate.json

    @model_validator(mode="after")
    def _metrics_beside_report(self):
        if self.metrics is None:
            self.metrics = _beside(self.report_csv, "ablate")
        return self
    executor: Literal["local", "ray"] = "local"  # local: process pool (workers); ray: one Ray task per arm (extra [ray])
    gpus_per_arm: float | None = Field(None, ge=0)  # ray: GPUs each arm asks for; null = 1 if the cluster has GPUs, else 0
    ray_address: str | None = None  # ray: null = start a local Ray; "auto" or "ray://host:10001" = join a cluster


class CompareParams(_Section):
    """mrt compare: MRT against LoRA, full fine-tuning and the frozen base on identical data, steps and seeds."""

    methods: list[MethodName] = Field(
        default_factory=lambda: ["frozen", "mrt", "lora", "full"], min_length=1
    )
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    steps: int = Field(300, ge=1)
    workers: int = Field(2, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    out_dir: str = "models/compare"
    per_task: int | None = Field(None, ge=1)
    report: str = "reports/comparison.json"
    table: str = "reports/comparison.md"
    plot: str = "reports/comparison.png"
    metrics: str | None = None  # headline numbers (dvc metrics); null = report's folder/metrics/compare.json

    @model_validator(mode="after")
    def _metrics_beside_report(self):
        if self.metrics is None:
            self.metrics = _beside(self.report, "compare")
        return self


class PredictParams(_Section):
    max_new_tokens: int = Field(8, ge=1)
    batch_size: int = Field(16, ge=1)


class TrackParams(_Section):
    """MLflow tracking and the registry (docs/orchestration.md). MLFLOW_TRACKING_URI overrides tracking_uri."""

    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "mrt"
    registered_model: str = "mrt-editors"
    system_metrics: bool = True  # CPU/memory/GPU samples on every training run
    system_metrics_interval_s: float = Field(2.0, gt=0)
    retries: int = Field(3, ge=0)  # tracking-server calls retried this many times before the run fails
    retry_delay_s: float = Field(2.0, ge=0)
    request_timeout_s: int = Field(30, ge=1)  # one HTTP call to a tracking server that does not answer


class PromoteParams(_Section):
    """mrt promote: register the candidate (alias candidate) and move `champion` only through the gate."""

    candidate_dir: str = "models/editors"  # the editors (or adapter) folder that becomes a model version
    benchmark_report: str = "reports/benchmark.json"  # the candidate's held-out and MME scores
    validation_report: str = "reports/validation.json"
    margin: float = Field(0.0, ge=0, le=1)  # held-out mean must beat the champion's by at least this
    max_task_drop: float = Field(0.05, ge=0, le=1)  # and no held-out task may drop by more than this
    # Baselines (noise guard): the held-out mean must beat the best constant answer (benchmark report) and
    # the frozen base (comparison report) by max(baseline_margin, spread_factor × the seed std of the
    # candidate's method in the comparison), measured over at least min_seeds seeds.
    comparison_report: str | None = "reports/comparison.json"  # `mrt compare`: frozen base + seed spread
    baseline_margin: float = Field(0.02, ge=0, le=1)
    spread_factor: float = Field(2.0, ge=0)
    min_seeds: int = Field(2, ge=1)
    enforce_baselines: bool = True  # false: the baseline conditions are recorded but do not block
    report: str = "reports/promotion.json"
    metrics: str | None = None  # headline numbers (dvc metrics); null = report's folder/metrics/promote.json

    @model_validator(mode="after")
    def _metrics_beside_report(self):
        if self.metrics is None:
            self.metrics = _beside(self.report, "promote")
        return self


class DeployParams(_Section):
    """mrt deploy: the scheduled retraining deployment of the mrt-pipeline flow."""

    name: str = "mrt-retrain"
    cron: str = "0 3 * * 1"  # Mondays 03:00
    timezone: str = "UTC"
    work_pool: str | None = None  # null: serve from this process; a pool name: deploy to that pool's workers
    params_file: str = "params.yaml"  # the profile each scheduled run reads

    @field_validator("cron")
    @classmethod
    def _cron_has_five_fields(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError("cron must have five fields (minute hour day month weekday), e.g. '0 3 * * 1'")
        return value


class RunParams(_Section):
    """mrt run: the whole pipeline as one Prefect flow (data → … → promote)."""

    ablation: bool = True  # run the placement ablation subflow
    baselines: bool = True  # benchmark LoRA / full / frozen beside the candidate (the compare section)
    promote: bool = True
    summary: str = "reports/run_summary.md"


class ReportParams(_Section):
    """mrt report: the results block (comparison + ablation tables), as a file and inside a README."""

    results: str = "reports/results.md"  # the block on its own (a DVC output)
    readme: str | None = "README.md"  # also written between this file's results markers; null = only `results`


class Params(_Section):
    data: DataParams = Field(default_factory=DataParams)
    validate_: ValidateParams = Field(default_factory=ValidateParams, alias="validate")
    align: AlignParams = Field(default_factory=AlignParams)
    train: TrainParams = Field(default_factory=TrainParams)
    predict: PredictParams = Field(default_factory=PredictParams)
    benchmark: BenchmarkParams = Field(default_factory=BenchmarkParams)
    ablate: AblateParams = Field(default_factory=AblateParams)
    compare: CompareParams = Field(default_factory=CompareParams)
    track: TrackParams = Field(default_factory=TrackParams)
    promote: PromoteParams = Field(default_factory=PromoteParams)
    deploy: DeployParams = Field(default_factory=DeployParams)
    run: RunParams = Field(default_factory=RunParams)
    report: ReportParams = Field(default_factory=ReportParams)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def section(self, name: str) -> _Section:
        return self.validate_ if name == "validate" else getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


# ---------------------------------------------------------------------------------------------
# loading and overrides
# ---------------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` (DVC's -S syntax) → (path, YAML-parsed value)."""
    if "=" not in text:
        raise ParamsError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ParamsError(f"override {text!r}: empty key")
    from components.core.safe_yaml import load as load_yaml

    try:
        value = load_yaml(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError) as exc:
        raise ParamsError(f"override {key}: value {raw!r} is not valid YAML ({exc})") from None
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    merged = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ParamsError(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return merged


def _expected(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """The annotation of the field at `loc`, for error messages ("expected int")."""
    current: Any = model
    ann: Any = None
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            break
        fields = {f.alias or n: f for n, f in current.model_fields.items()}
        fields.update(current.model_fields)
        field = fields.get(str(part))
        if field is None:
            return ""
        ann = field.annotation
        current = ann
    if ann is None:
        return ""
    name = getattr(ann, "__name__", None) or str(ann)
    return str(name).replace("typing.", "")


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not str(p).startswith("function-"))
        key = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
            continue
        exp = _expected(Params, loc)
        got = err.get("input")
        msg = err["msg"].removeprefix("Value error, ")
        exp_txt = f" (expected {exp})" if exp else ""
        lines.append(f"{source}: bad value for '{key}'{exp_txt}: {msg}; got {got!r}")
    return "\n".join(lines)


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read params.yaml (missing file → defaults), apply `-S` overrides, validate."""
    path = Path(path)
    raw: dict[str, Any] = {}
    if path.exists():
        from components.core.safe_yaml import YamlError, load as load_yaml

        try:
            loaded = load_yaml(path.read_text(encoding="utf-8"))
        except YamlError as exc:
            raise ParamsError(f"{path}: {exc}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ParamsError(f"{path}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ParamsError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    elif str(path) != "params.yaml":
        raise ParamsError(f"{path}: params file not found")
    raw = apply_overrides(raw, overrides or [])
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(format_validation_error(exc, str(path))) from None
