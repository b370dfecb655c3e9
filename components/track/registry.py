"""The model registry and the promotion gate: candidate → (gate) → champion.

Every evaluated model becomes a new version of track.registered_model with alias `candidate`; the
alias `champion` moves only when the pure :func:`gate` says so (validation passed, held-out
mean beats the champion's by at least `margin`, no held-out task drops by more than `max_task_drop`)
and the candidate is not noise: its held-out mean beats the best constant answer (the benchmark
report's `heldout/majority_mean`) and the frozen base (the comparison report) by more than the seed
spread — max(`baseline_margin`, `spread_factor` × the sample std over seeds of its method's held-out
mean, measured over at least `min_seeds` seeds). The decision lists every condition with its
numbers and whether it held (`Decision.conditions`).

No half states
    A version is created in ONE call that carries every tag the gate and the lineage need (metrics,
    data/params hashes, the promotion id) and a `mrt.state=pending` tag; only after its aliases are set
    does it become `mrt.state=complete`. Everything that can fail slowly (artifact upload, metrics)
    happens before the version exists. If a later step fails, the versions this promotion created are
    deleted; if even that fails (the server is gone), the next promotion deletes `pending` versions
    left behind, under the lock, before it reads the champion.

Concurrent promotion
    read champion → gate → set alias is a critical section, run under a lock:
    - local stores (sqlite:///file, file:/ paths, a bare folder): an OS file lock next to the store
      (`<store>.promote.lock`, `filelock`), so promotions on one machine are serialised: the second
      one gates against the first one's result, and the champion is the better one by the gate.
    - a shared server (http[s]://, databricks, a SQL URL): a lease stored as a registered-model tag
      (`mrt.promotion_lock`): write it, wait `_LEASE_SETTLE_S`, read it back; only the writer that
      reads its own token holds it. It is advisory (a client that ignores it is not stopped) and
      assumes the server applies a write within the settle time — good enough for pipeline runs
      that promote minutes apart, not a consensus protocol. Expired leases (a crashed holder) are
      taken over after `_LEASE_TTL_S`; a lease this same process failed to release (the server was
      down) is taken over at once.
    Either way the alias itself is a single row in the store, so readers always see one champion,
    and after setting it the promoter reads it back: if another writer moved it in between
    (possible only without a working lock) the decision reports the race instead of claiming a win.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from components.core.files import replace_folder, write_json
from components.track import tracking
from components.track.tracking import call, client
from components.track.store_init import ensure_local_store, local_store_path

if TYPE_CHECKING:  # pragma: no cover
    from components.core.config import Params, PromoteParams, TrackParams

CANDIDATE = "candidate"
CHAMPION = "champion"
MODEL_NAME_IN_RUN = "editor_model"
STATE_TAG = "mrt.state"
PROMOTION_ID_TAG = "mrt.promotion_id"
DECISION_TAG = "mrt.gate"
LOCK_TAG = "mrt.promotion_lock"
_BOOKKEEPING = {STATE_TAG, PROMOTION_ID_TAG, DECISION_TAG}
_EPS = 1e-9
_LEASE_TTL_S = 120.0  # the critical section is a handful of registry calls (model upload happens before it)
_LEASE_SETTLE_S = 1.0
_LOCK_TIMEOUT_S = 900.0
_held_tokens: set[str] = set()  # leases this process holds right now (threads may promote concurrently)


class PromotionError(RuntimeError):
    """Promotion could not complete; nothing half-registered was left behind (or it names what was)."""


# ---------------------------------------------------------------------------------------------
# the gate (pure)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    """What the noise guard compares a candidate with, besides its own benchmark report: the frozen
    base's held-out mean and the seed spread of the candidate's method (both from `mrt compare`)."""

    frozen_heldout_mean: float | None = None
    seed_std: float | None = None  # sample std over seeds of the method's held-out mean
    seeds: int = 0  # how many successful seeds that std is over
    method: str | None = None
    source: str | None = None  # the comparison report it was read from


@dataclass
class Condition:
    """One rule of the gate, with the numbers it was decided on."""

    name: str
    held: bool
    enforced: bool = True
    value: float | None = None  # e.g. the candidate's margin over the baseline
    threshold: float | None = None  # what `value` had to reach
    detail: str = ""

    @property
    def blocks(self) -> bool:
        return self.enforced and not self.held


@dataclass
class Decision:
    """What the gate decided and every number it used."""

    promote: bool
    reasons: list[str]
    validation_passed: bool
    margin: float
    max_task_drop: float
    candidate_heldout_mean: float | None = None
    champion_heldout_mean: float | None = None
    task_deltas: dict[str, float] = field(default_factory=dict)  # candidate − champion, per held-out task
    majority_heldout_mean: float | None = None  # the best constant answer's held-out mean (same records)
    frozen_heldout_mean: float | None = None
    seed_std: float | None = None
    seeds: int = 0
    required_margin: float | None = None  # over the baselines: max(baseline_margin, spread_factor × seed_std)
    conditions: list[Condition] = field(default_factory=list)
    candidate_version: int | None = None
    champion_version_before: int | None = None
    champion_version_after: int | None = None
    model_name: str | None = None
    model_uri: str | None = None
    run_id: str | None = None

    @property
    def mean_delta(self) -> float | None:
        if self.candidate_heldout_mean is None or self.champion_heldout_mean is None:
            return None
        return self.candidate_heldout_mean - self.champion_heldout_mean

    def condition(self, name: str) -> Condition | None:
        return next((c for c in self.conditions if c.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean_delta"] = self.mean_delta
        d["failed_conditions"] = [c.name for c in self.conditions if not c.held]
        return d

    def markdown(self) -> str:
        """A table for the `promotion-decision` flow artifact and the CLI."""

        def num(v: float | None, signed: bool = False) -> str:
            if v is None:
                return "—"
            return f"{v:+.4f}" if signed else f"{v:.4f}"

        verdict = "**promoted**" if self.promote else "**not promoted**"
        name = self.model_name or "model"
        cand = f"v{self.candidate_version}" if self.candidate_version is not None else "—"
        before = f"v{self.champion_version_before}" if self.champion_version_before is not None else "none"
        after = f"v{self.champion_version_after}" if self.champion_version_after is not None else "none"
        lines = [
            f"### Promotion decision: {verdict}",
            "",
            f"`{name}` candidate {cand}; champion before {before}, after {after}.",
            "",
            "| check | candidate | champion | delta | rule | result |",
            "|---|---|---|---|---|---|",
            f"| validation | {'passed' if self.validation_passed else 'failed'} | | | must pass | "
            f"{'ok' if self.validation_passed else 'blocks'} |",
        ]

        def result(c: Condition | None) -> str:
            if c is None:
                return "—"
            return "ok" if c.held else ("blocks" if c.enforced else "fails (not enforced)")

        need = "—" if self.required_margin is None else f"{self.required_margin:g}"
        for cname, label, base in (("beats_majority", "vs best constant answer", self.majority_heldout_mean),
                                   ("beats_frozen_base", "vs frozen base", self.frozen_heldout_mean)):
            c = self.condition(cname)
            if c is not None:
                lines.append(f"| heldout/mean {label} | {num(self.candidate_heldout_mean)} | {num(base)} | "
                             f"{num(c.value, True)} | > 0 and ≥ {need} | {result(c)} |")
        c = self.condition("seed_spread")
        if c is not None:
            lines.append(f"| seed spread | std {num(self.seed_std)} over {self.seeds} seed(s) | | | "
                         f"≥ {c.threshold:g} seeds | {result(c)} |")
        md = self.mean_delta
        c = self.condition("beats_champion")
        rule = f"≥ {c.threshold:g} and > 0" if c is not None and c.threshold is not None else f"≥ {self.margin:g} and > 0"
        ok = c.held if c is not None else (md is None or (md >= self.margin - _EPS and md > _EPS))
        lines.append(
            f"| heldout/mean | {num(self.candidate_heldout_mean)} | {num(self.champion_heldout_mean)} | "
            f"{num(md, True)} | {rule} | {'ok' if ok else 'blocks'} |"
        )
        for task, delta in sorted(self.task_deltas.items()):
            ok = delta >= -self.max_task_drop - _EPS
            lines.append(f"| heldout/{task} | | | {num(delta, True)} | drop ≤ {self.max_task_drop:g} | {'ok' if ok else 'blocks'} |")
        lines += ["", "Reasons:", *[f"- {r}" for r in self.reasons]]
        return "\n".join(lines) + "\n"


def heldout_scores(metrics: Mapping[str, float]) -> tuple[dict[str, float], float | None]:
    """(per-task held-out scores, held-out mean) from flat metric names (`heldout/<task>`, `heldout/mean`).
    Keys with a second level (`heldout/<task>/majority`) and the split's aggregates
    (`heldout/chance_mean`, `heldout/majority_mean`, …) are not tasks. The mean falls back to the
    unweighted mean of the tasks when absent."""
    from components.track.benchmark_runs import AGGREGATE_NAMES

    tasks = {}
    for k, v in metrics.items():
        if not k.startswith("heldout/") or v is None or not math.isfinite(float(v)):
            continue
        name = k.split("/", 1)[1]
        if "/" not in name and name not in AGGREGATE_NAMES:
            tasks[name] = float(v)
    mean = metrics.get("heldout/mean")
    if mean is None or not math.isfinite(float(mean)):
        mean = sum(tasks.values()) / len(tasks) if tasks else None
    return tasks, (float(mean) if mean is not None else None)


def _finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _baseline_conditions(d: Decision, candidate: Mapping[str, float], reference: Reference | None,
                         promote: "PromoteParams") -> None:
    """The noise guard: beat the best constant answer and the frozen base by more than the seed spread."""
    enforced = bool(promote.enforce_baselines)
    ref = reference or Reference()
    d.majority_heldout_mean = _finite(candidate.get("heldout/majority_mean"))
    d.frozen_heldout_mean = _finite(ref.frozen_heldout_mean)
    d.seed_std, d.seeds = _finite(ref.seed_std), int(ref.seeds or 0)
    where = f" ({ref.source})" if ref.source else ""

    spread_ok = d.seed_std is not None and d.seeds >= promote.min_seeds
    d.conditions.append(Condition(
        "seed_spread", spread_ok, enforced, d.seed_std, float(promote.min_seeds),
        f"seed spread of {ref.method or 'the candidate method'}'s held-out mean: std {d.seed_std:.4f} over "
        f"{d.seeds} seed(s){where}; min_seeds {promote.min_seeds}" if d.seed_std is not None else
        f"seed spread unknown: no comparison report with the candidate's method{where} "
        "(run `mrt compare` with several seeds)"))
    spread_margin = promote.spread_factor * d.seed_std if d.seed_std is not None else 0.0
    d.required_margin = max(float(promote.baseline_margin), spread_margin)
    need = (f"max(baseline_margin {promote.baseline_margin:g}, {promote.spread_factor:g} × seed std "
            f"{d.seed_std:.4f}) = {d.required_margin:.4f}" if d.seed_std is not None
            else f"baseline_margin {promote.baseline_margin:g}")
    cand = d.candidate_heldout_mean
    for name, label, base, missing in (
        ("beats_majority", "the best constant answer", d.majority_heldout_mean,
         "the benchmark report has no best-constant baseline (heldout/majority_mean)"),
        ("beats_frozen_base", "the frozen base", d.frozen_heldout_mean,
         f"the frozen base's held-out mean is unknown{where or ''} (run `mrt compare` with method frozen)"),
    ):
        if cand is None or base is None:
            d.conditions.append(Condition(name, False, enforced, None, d.required_margin,
                                          missing if base is None else "the candidate has no held-out mean"))
            continue
        delta = cand - base
        held = delta > _EPS and delta + _EPS >= d.required_margin
        d.conditions.append(Condition(
            name, held, enforced, delta, d.required_margin,
            f"heldout/mean {cand:.4f} vs {label} {base:.4f}: delta {delta:+.4f} "
            f"{'≥' if held else 'does not reach'} the required margin {need}"))


def gate(
    candidate: Mapping[str, float],
    champion: Mapping[str, float] | None,
    validation_passed: bool,
    promote: "PromoteParams",
    reference: Reference | None = None,
) -> Decision:
    """The promotion rule plus the noise guard, as a pure function of the numbers.

    - failed validation never promotes;
    - a candidate without held-out scores never promotes;
    - the candidate's held-out mean must beat the best constant answer (`heldout/majority_mean` of its
      own benchmark) and the frozen base (`reference`) by more than zero and by at least
      max(`baseline_margin`, `spread_factor` × seed std), the std measured over ≥ `min_seeds` seeds;
      with `enforce_baselines` false these conditions are recorded but do not block;
    - with no champion yet, the candidate becomes champion (if nothing above blocks);
    - otherwise the held-out mean must beat the champion's by at least `margin` — and, when the seed
      spread is known and enforced, by `spread_factor` × seed std — and by more than zero (an equal
      model is not a better one, so re-promoting the same model is a no-op), and no held-out task the
      champion was scored on may drop by more than `max_task_drop` (a task the candidate was not
      scored on counts as a block: its drop is unknown).
    Every condition is in `Decision.conditions` (held or not, enforced or not, with its numbers) and
    every failing one also in `Decision.reasons`.
    """
    cand_tasks, cand_mean = heldout_scores(candidate)
    d = Decision(
        promote=False,
        reasons=[],
        validation_passed=bool(validation_passed),
        margin=float(promote.margin),
        max_task_drop=float(promote.max_task_drop),
        candidate_heldout_mean=cand_mean,
    )
    d.conditions.append(Condition("validation", bool(validation_passed), True, detail=(
        "data validation passed" if validation_passed else
        "data validation failed: a model trained on data that failed validation is never promoted")))
    if not validation_passed:
        d.reasons.append("data validation failed: a model trained on data that failed validation is never promoted")
    d.conditions.append(Condition("heldout_scores", cand_mean is not None, True, cand_mean, detail=(
        f"held-out mean {cand_mean:.4f}" if cand_mean is not None else
        "the candidate has no held-out scores (heldout/<task>, heldout/mean)")))
    if cand_mean is None:
        d.reasons.append("the candidate has no held-out scores (heldout/<task>, heldout/mean)")
    _baseline_conditions(d, candidate, reference, promote)
    guard = [c.detail if c.held or c.enforced else f"{c.detail} (recorded, not enforced: enforce_baselines false)"
             for c in d.conditions[2:]]
    _champion_rules(d, champion, cand_tasks, promote, blocked=any(c.blocks for c in d.conditions))
    d.reasons += guard  # after the champion's verdict, so the first reasons say what decided
    return d


def _champion_rules(d: Decision, champion: Mapping[str, float] | None, cand_tasks: dict[str, float],
                    promote: "PromoteParams", blocked: bool) -> None:
    cand_mean = d.candidate_heldout_mean
    if champion is None:
        if not blocked:
            d.promote = True
            d.reasons.append(f"no champion yet: the first validated candidate becomes champion (heldout/mean {cand_mean:.4f})")
        return
    champ_tasks, champ_mean = heldout_scores(champion)
    d.champion_heldout_mean = champ_mean
    d.task_deltas = {t: cand_tasks[t] - s for t, s in champ_tasks.items() if t in cand_tasks}
    if cand_mean is None:
        return
    if champ_mean is None:
        d.reasons.append("the champion has no held-out scores to compare with; keeping it (promote by hand)")
        return
    need = d.margin
    spread = d.condition("seed_spread")
    if promote.enforce_baselines and spread is not None and spread.held and d.seed_std is not None:
        need = max(need, promote.spread_factor * d.seed_std)
    delta = cand_mean - champ_mean
    beats = not (delta + _EPS < need or delta <= _EPS)
    d.conditions.append(Condition("beats_champion", beats, True, delta, need,
                                  f"heldout/mean {cand_mean:.4f} vs champion {champ_mean:.4f}"))
    if not beats:
        blocked = True
        d.reasons.append(
            f"heldout/mean {cand_mean:.4f} vs champion {champ_mean:.4f}: delta {delta:+.4f} does not beat it "
            f"by the margin {need:g}"
        )
    else:
        d.reasons.append(
            f"heldout/mean {cand_mean:.4f} vs champion {champ_mean:.4f}: delta {delta:+.4f} ≥ margin {need:g}"
        )
    missing = sorted(set(champ_tasks) - set(cand_tasks))
    if missing:
        blocked = True
        d.reasons.append(f"held-out task(s) {', '.join(missing)} scored for the champion but not the candidate")
    drops = {t: -x for t, x in d.task_deltas.items() if -x > d.max_task_drop + _EPS}
    for t, drop in sorted(drops.items()):
        blocked = True
        d.reasons.append(
            f"heldout/{t} drops by {drop:.4f} ({champ_tasks[t]:.4f} → {cand_tasks[t]:.4f}) > max_task_drop {d.max_task_drop:g}"
        )
    d.conditions.append(Condition("task_drops", not drops and not missing, True,
                                  min(d.task_deltas.values()) if d.task_deltas else None, -d.max_task_drop,
                                  "worst held-out task delta vs the champion"))
    if not drops and not missing and d.task_deltas:
        worst = min(d.task_deltas.values())
        d.reasons.append(f"no held-out task drops by more than {d.max_task_drop:g} (worst delta {worst:+.4f})")
    d.promote = not blocked


def reference_from_comparison(path: str | os.PathLike | None, method: str | None) -> Reference | None:
    """The frozen base's held-out mean and the seed spread of `method` from a `mrt compare` report;
    None when there is no report (the gate then records both as unknown). A report that exists but
    cannot be read raises ValueError naming the file and field."""
    if not path or not Path(path).is_file():
        return None
    report = _read_json(path, "comparison report")
    methods = report.get("methods")
    if not isinstance(methods, dict):
        raise ValueError(f"{path}: field 'methods' missing or not a mapping — not a `mrt compare` report")

    def stat(name: str | None) -> dict:
        entry = methods.get(name) if name else None
        value = entry.get("heldout_mean") if isinstance(entry, dict) else None
        return value if isinstance(value, dict) else {}

    frozen, own = stat("frozen"), stat(method)
    values = [v for v in own.get("values") or [] if _finite(v) is not None]
    return Reference(
        frozen_heldout_mean=_finite(frozen.get("mean")),
        seed_std=_finite(own.get("std")) if values else None,
        seeds=len(values),
        method=method,
        source=str(path),
    )


# ---------------------------------------------------------------------------------------------
# registry reads
# ---------------------------------------------------------------------------------------------
def _not_found(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def _alias_missing(exc: BaseException) -> bool:
    """The SQL store reports a missing alias as INVALID_PARAMETER_VALUE ("alias … not found")."""
    from mlflow.exceptions import MlflowException

    text = str(exc).lower()
    return isinstance(exc, MlflowException) and "alias" in text and "not found" in text


def version_metrics(tags: Mapping[str, str]) -> dict[str, float]:
    """The gate's numbers from a version's tags — where versions registered by older releases kept
    them (`heldout/<task>`, `heldout/mean`, `mme/total`…) as strings. New versions keep them as
    metrics of their logged model (:func:`model_metrics`)."""
    out = {}
    for k, v in tags.items():
        if k.startswith(("heldout/", "mme/")) and "/" in k:
            try:
                out[k] = float(v)
            except (TypeError, ValueError):
                continue
    return out


def model_metrics(track: "TrackParams", model_id: str | None) -> dict[str, float]:
    """The latest value of every metric of a logged model (what a version's page shows), {} when
    there is no logged model behind the version."""
    if not model_id:
        return {}
    c = client(track)
    try:
        lm = call(track, f"read logged model {model_id}", c.get_logged_model, model_id)
    except Exception as exc:  # noqa: BLE001
        if _not_found(exc):
            return {}
        raise
    latest: dict[str, Any] = {}
    for m in lm.metrics or []:
        if m.key not in latest or (m.step, m.timestamp) >= (latest[m.key].step, latest[m.key].timestamp):
            latest[m.key] = m
    return {k: float(m.value) for k, m in latest.items()}


def _version_info(mv, track: "TrackParams | None" = None) -> dict[str, Any]:
    tags = dict(mv.tags or {})
    model_id = getattr(mv, "model_id", None) or _model_id(mv.source or "")
    metrics = model_metrics(track, model_id) if track is not None else {}
    return {
        "name": mv.name,
        "version": int(mv.version),
        "run_id": mv.run_id,
        "source": mv.source,
        "model_id": model_id,
        "metrics": metrics or version_metrics(tags),
        "tags": tags,
        "lineage": {k: v for k, v in tags.items() if k.startswith(tracking.TAG_PREFIX) and k not in _BOOKKEEPING},
    }


def alias_version(track: "TrackParams", alias: str) -> dict[str, Any] | None:
    """The version an alias points to, or None when the model or the alias does not exist."""
    c = client(track)
    try:
        mv = call(track, f"read alias {track.registered_model}@{alias}", c.get_model_version_by_alias,
                  track.registered_model, alias)
    except Exception as exc:  # noqa: BLE001
        if _not_found(exc) or _alias_missing(exc):
            return None
        raise
    return _version_info(mv, track)


def champion(track: "TrackParams") -> dict[str, Any] | None:
    """The current champion: {name, version, run_id, source, metrics, tags, lineage} (lineage holds
    `mrt.data_hash`, `mrt.params_hash`, … — what a scheduled retrain compares to skip work), or None."""
    return alias_version(track, CHAMPION)


# ---------------------------------------------------------------------------------------------
# registry writes
# ---------------------------------------------------------------------------------------------
def log_editor_model(run_id: str, track: "TrackParams", base_dir: str, adapter_dir: str | None,
                     base_fingerprint: str | None = None) -> str:
    """Log editors/adapter + a reference to the base (never its weights) into `run_id` as the
    pyfunc `editor_model`; returns its model URI (`models:/m-<id>`)."""
    from components.track.pyfunc_model import log_pyfunc

    tracking.configure(track)
    info = call(track, f"log the editor model of run {run_id}", log_pyfunc, run_id, base_dir, adapter_dir,
                MODEL_NAME_IN_RUN, None, base_fingerprint)
    return info.model_uri


def record_model_figures(track: "TrackParams", run_id: str, model_uri: str, metrics: Mapping[str, float],
                         params: Mapping[str, Any]) -> None:
    """The gate's figures on the logged model behind a version (the version links to it): numbers
    as metrics (listed on the logged model's page, read back as numbers), settings as params."""
    from mlflow.entities import Metric

    model_id = _model_id(model_uri)
    if model_id is None:
        raise ValueError(f"{model_uri}: expected a logged model URI models:/m-<id>")
    now = int(time.time() * 1000)
    items = [Metric(str(k), float(v), now, 0, model_id=model_id) for k, v in metrics.items()
             if v is not None and math.isfinite(float(v))]
    c = client(track)
    for i in range(0, len(items), tracking.METRIC_BATCH):
        call(track, f"log metrics on {model_uri}", c.log_batch, run_id, metrics=items[i : i + tracking.METRIC_BATCH])
    if params:
        call(track, f"log params on {model_uri}", c.log_model_params, model_id,
             {str(k): tracking._clip(str(v), tracking.MAX_PARAM_CHARS) for k, v in params.items()})


def _ensure_registered_model(track: "TrackParams") -> None:
    from mlflow.exceptions import MlflowException

    c = client(track)
    try:
        call(track, f"create registered model {track.registered_model}", c.create_registered_model,
             track.registered_model, description="MRT representation editors (aliases: candidate, champion)")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _model_id(model_uri: str) -> str | None:
    if model_uri.startswith("models:/m-") and "@" not in model_uri:
        return model_uri.split("/", 1)[1].strip("/")
    return None


def _create_version(track: "TrackParams", model_uri: str, run_id: str | None, tags: Mapping[str, Any]) -> int:
    """`mlflow.register_model`: the version records the logged model (`models:/m-<id>`) and its
    source run, and the logged model records the version (its page shows it registered).
    `run_id` is the logged model's source run (MLflow reads it from the logged model)."""
    import mlflow

    _ensure_registered_model(track)
    tracking.configure(track)
    mv = call(
        track,
        f"create a version of {track.registered_model}",
        mlflow.register_model,
        model_uri,
        track.registered_model,
        await_registration_for=0,
        tags={str(k): tracking._clip(str(v), tracking.MAX_TAG_CHARS) for k, v in tags.items()},
    )
    return int(mv.version)


def _finish_version(track: "TrackParams", version: int) -> None:
    c = client(track)
    call(track, f"mark {track.registered_model} v{version} complete", c.set_model_version_tag,
         track.registered_model, str(version), STATE_TAG, "complete")


def delete_versions(track: "TrackParams", promotion_id: str) -> list[int]:
    """Delete every version created by one promotion (by its id tag); returns what was deleted."""
    deleted = []
    for mv in _versions(track):
        if (mv.tags or {}).get(PROMOTION_ID_TAG) == promotion_id:
            call(track, f"delete {track.registered_model} v{mv.version}", client(track).delete_model_version,
                 track.registered_model, mv.version)
            deleted.append(int(mv.version))
    return deleted


def aliases(track: "TrackParams") -> dict[str, int]:
    """alias → version of track.registered_model ({} when it does not exist). Read from the registered
    model: version searches do not fill in aliases on every store."""
    c = client(track)
    try:
        rm = call(track, f"read {track.registered_model}", c.get_registered_model, track.registered_model)
    except Exception as exc:  # noqa: BLE001
        if _not_found(exc):
            return {}
        raise
    return {str(a): int(v) for a, v in (rm.aliases or {}).items()}


def cleanup_pending(track: "TrackParams", keep: str | None = None) -> list[int]:
    """Delete versions a crashed or cut-off promotion left `pending`. Call only under the lock.

    A pending version that holds only `candidate` (its promotion died between setting that alias and
    marking the version complete) goes too: it never finished, and this promotion moves `candidate`
    anyway. One holding any other alias (`champion`) stays: deleting it would drop the champion."""
    deleted = []
    aliased = {v for a, v in aliases(track).items() if a != CANDIDATE}
    for mv in _versions(track):
        tags = mv.tags or {}
        if tags.get(STATE_TAG) == "pending" and tags.get(PROMOTION_ID_TAG) != keep and int(mv.version) not in aliased:
            call(track, f"delete pending {track.registered_model} v{mv.version}", client(track).delete_model_version,
                 track.registered_model, mv.version)
            deleted.append(int(mv.version))
    return deleted


def _versions(track: "TrackParams") -> list:
    c = client(track)
    try:
        return list(call(track, f"list versions of {track.registered_model}", c.search_model_versions,
                         f"name='{track.registered_model}'"))
    except Exception as exc:  # noqa: BLE001
        if _not_found(exc):
            return []
        raise


def set_alias(track: "TrackParams", alias: str, version: int) -> None:
    c = client(track)
    call(track, f"set {track.registered_model}@{alias} → v{version}", c.set_registered_model_alias,
         track.registered_model, alias, str(version))


def register_candidate(
    track: "TrackParams", model_uri: str, run_id: str | None, tags: Mapping[str, Any]
) -> int:
    """A new version of track.registered_model from `model_uri`, created with all `tags` at once,
    aliased `candidate` and marked complete. On any failure after creation the version is deleted
    (best effort; see the module docstring). Returns the version number."""
    pid = str(tags.get(PROMOTION_ID_TAG) or uuid.uuid4().hex)
    all_tags = {**tags, PROMOTION_ID_TAG: pid, STATE_TAG: "pending"}
    version = None
    try:
        version = _create_version(track, model_uri, run_id, all_tags)
        set_alias(track, CANDIDATE, version)
        _finish_version(track, version)
    except BaseException as exc:
        _undo(track, pid, exc)
        raise
    return version


def _undo(track: "TrackParams", promotion_id: str, cause: BaseException) -> None:
    """Delete what a failed promotion created; never masks the original error."""
    import logging

    try:
        fast = track.model_copy(update={"retries": min(track.retries, 1), "retry_delay_s": min(track.retry_delay_s, 0.5)})
        deleted = delete_versions(fast, promotion_id)
        if deleted:
            logging.getLogger(__name__).warning("promotion failed (%s); deleted version(s) %s", cause, deleted)
    except Exception as exc:  # noqa: BLE001
        logging.getLogger(__name__).warning(
            "promotion failed (%s) and its pending version could not be deleted now (%s); the next "
            "promotion deletes it", cause, exc,
        )


def _rollback_champion(track: "TrackParams", promotion_id: str, before: dict | None, version: int,
                       cause: BaseException) -> None:
    """Setting `champion` failed — possibly after the server applied it (a lost response). Point the
    alias back at the previous champion (or drop it if there was none) BEFORE deleting the new
    version: deleting first could leave no champion at all. If the server cannot be reached for the
    restore, the new version is kept: it is complete and passed the gate, so either outcome
    (champion = previous or = new) is a consistent registry."""
    import logging

    fast = track.model_copy(update={"retries": min(track.retries, 1), "retry_delay_s": min(track.retry_delay_s, 0.5)})
    try:
        if before is not None:
            set_alias(fast, CHAMPION, before["version"])
        elif (aliases(fast).get(CHAMPION)) == version:
            call(fast, f"drop {track.registered_model}@{CHAMPION}", client(fast).delete_registered_model_alias,
                 track.registered_model, CHAMPION)
    except Exception as exc:  # noqa: BLE001
        logging.getLogger(__name__).warning(
            "setting champion → v%s failed (%s) and the previous champion could not be restored (%s); "
            "v%s is kept (complete, gate passed)", version, cause, exc, version,
        )
        return
    _undo(track, promotion_id, cause)


# ---------------------------------------------------------------------------------------------
# the lock
# ---------------------------------------------------------------------------------------------


@contextmanager
def promotion_lock(track: "TrackParams", timeout_s: float = _LOCK_TIMEOUT_S) -> Iterator[str]:
    """Serialise read-champion → gate → set-alias across processes. Yields the lock kind."""
    uri = tracking.tracking_uri(track)
    path = local_store_path(uri)
    if path is not None:
        from filelock import FileLock, Timeout

        lock_file = Path(str(path) + ".promote.lock")
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(lock_file), timeout=timeout_s)
        try:
            with lock:
                yield "file"
        except Timeout:
            raise PromotionError(f"{lock_file}: another promotion held the lock for over {timeout_s:.0f} s") from None
        return
    token = f"{uuid.uuid4().hex}{_owner()}"
    _acquire_lease(track, token, timeout_s)
    try:
        yield "lease"
    finally:
        _release_lease(track, token)


def _read_lease(track: "TrackParams") -> dict | None:
    c = client(track)
    try:
        rm = call(track, "read the promotion lease", c.get_registered_model, track.registered_model)
    except Exception as exc:  # noqa: BLE001
        if _not_found(exc):
            return None
        raise
    raw = (rm.tags or {}).get(LOCK_TAG)
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _stale(held: dict | None, token: str) -> bool:
    """Free to take: no lease, an expired one, or one this process left behind (its promotion failed
    while the server was down, so the release never arrived — and no thread of ours holds it now)."""
    if held is None or held.get("expires", 0) < time.time() or held.get("token") == token:
        return True
    other = str(held.get("token", ""))
    if other.endswith(_owner()):
        return other not in _held_tokens
    return _owner_gone(other)


def _owner_gone(token: str) -> bool:
    """A lease whose holder was a process on this host that no longer exists (killed mid-promotion)."""
    host, _, pid = token.rpartition("@")[2].partition(":")
    if host != os.uname().nodename or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _owner() -> str:
    """Lease tokens end with host and pid, so a process can recognise its own leftovers."""
    return f"@{os.uname().nodename}:{os.getpid()}"


def _acquire_lease(track: "TrackParams", token: str, timeout_s: float) -> None:
    _ensure_registered_model(track)
    c = client(track)
    deadline = time.monotonic() + timeout_s
    announced = False
    while True:
        held = _read_lease(track)
        if _stale(held, token):
            if held is not None and held.get("token") != token:
                why = "expired" if held.get("expires", 0) < time.time() else "its process is gone"
                print(f"breaking a stale promotion lease of {track.registered_model} held by "
                      f"{held.get('token')} ({why})", file=sys.stderr)
            lease = json.dumps({"token": token, "expires": time.time() + _LEASE_TTL_S})
            _held_tokens.add(token)  # before writing: our other threads must not take it as a leftover
            try:
                call(track, "write the promotion lease", c.set_registered_model_tag, track.registered_model,
                     LOCK_TAG, lease)
                time.sleep(_LEASE_SETTLE_S)
                held = _read_lease(track)
            except BaseException:
                _held_tokens.discard(token)
                raise
            if held is not None and held.get("token") == token:
                return
            _held_tokens.discard(token)
        if not announced and held is not None:
            left = max(0.0, float(held.get("expires", 0)) - time.time())
            print(f"waiting for the promotion lease of {track.registered_model} held by {held.get('token')} "
                  f"(expires in {left:.0f} s at the latest)", file=sys.stderr)
            announced = True
        if time.monotonic() > deadline:
            raise PromotionError(
                f"{track.registered_model}: promotion lease held by {held.get('token') if held else '?'} "
                f"for over {timeout_s:.0f} s"
            )
        time.sleep(_LEASE_SETTLE_S)


def _release_lease(track: "TrackParams", token: str) -> None:
    _held_tokens.discard(token)  # dead either way: a lease we fail to delete is stale for this process
    try:
        held = _read_lease(track)
        if held is not None and held.get("token") == token:
            call(track, "release the promotion lease", client(track).delete_registered_model_tag,
                 track.registered_model, LOCK_TAG)
    except Exception:  # noqa: BLE001 - an unreleased lease expires after _LEASE_TTL_S
        pass


# ---------------------------------------------------------------------------------------------
# the whole step
# ---------------------------------------------------------------------------------------------
def _read_json(path: str | os.PathLike, what: str) -> dict:
    return tracking._read_json(path, what)


def validation_status(path: str | os.PathLike) -> tuple[bool, str]:
    """(passed, why) from the validation report; a missing or unreadable report counts as failed."""
    p = Path(path)
    if not p.is_file():
        return False, f"{p}: validation report not found (run `mrt validate`)"
    try:
        report = _read_json(p, "validation report")
    except ValueError as exc:
        return False, str(exc)
    ok = report.get("success")
    if ok is True:
        return True, f"{p}: validation passed"
    if ok is False:
        failed = report.get("checks_failed")
        return False, f"{p}: validation failed ({failed} check(s) failed)" if failed is not None else f"{p}: validation failed"
    return False, f"{p}: field 'success' missing or not a boolean"


def promote(params: "Params", run_id: str | None = None, params_file: str = "params.yaml") -> Decision:
    """Register the benchmarked candidate and move `champion` if the gate passes.

    Reads promote.benchmark_report and promote.validation_report; logs the pyfunc model (the
    promote.candidate_dir folder + a reference to train.base_dir) into the run that trained those
    weights (found by their hash; else `run_id`) with the benchmark's figures as its metrics and the
    gate's settings as its params; `run_id` is the run the decision is recorded on (a new `promote`
    run, child of $MRT_PARENT_RUN_ID, when None). Then — under the promotion lock — deletes pending
    leftovers, reads the champion, gates, registers the version (alias candidate) and moves
    `champion` when the gate passes. Records the decision on the run (tags, metrics, promotion.json)
    and writes promote.report atomically.
    Raises TrackingError / PromotionError on failure, leaving no half-registered version."""
    from components.track.benchmark_runs import flat_metrics

    track, pp = params.track, params.promote
    bench = _read_json(pp.benchmark_report, "benchmark report")
    try:
        metrics = flat_metrics(bench)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{pp.benchmark_report}: benchmark report lacks field {exc}") from None
    passed, why = validation_status(pp.validation_report)
    method = (bench.get("model") or {}).get("method")
    reference = reference_from_comparison(pp.comparison_report, method)  # a bad report fails before anything

    ensure_local_store(tracking.tracking_uri(track))  # a brand-new store is created under the lock
    tracking.configure(track)
    lineage = tracking.lineage_tags(params, params_file)
    own_run = run_id is None
    if own_run:
        run_id = tracking.start_run(track, "promote", tags={**lineage, "mrt.stage": "promote", "mrt.role": "promote"},
                                    parent_run_id=tracking.parent_run_id())
    pid = uuid.uuid4().hex
    try:
        tracking.set_tags(run_id, lineage, track=track)
        tracking.log_metrics(run_id, metrics, track=track)
        # The model goes into the run that trained it (found by the weights' hash), so a version
        # links to its training curves and scores; the promote run when no such run is recorded.
        model_run = tracking.find_model_run(track, pp.candidate_dir) or run_id
        fp = tracking.base_fingerprint(params.train.base_dir, pp.candidate_dir, params.train.report)
        model_uri = log_editor_model(model_run, track, params.train.base_dir, pp.candidate_dir,
                                     None if fp == "unknown" else fp)
        record_model_figures(track, model_run, model_uri, metrics, {
            **{f"gate.{k}": v for k, v in pp.model_dump(mode="json").items() if k not in _PROMOTE_PATHS},
            "validation_passed": str(passed).lower(), "benchmark_report": pp.benchmark_report,
        })
        version_tags = {
            **lineage,
            "mrt.validation_passed": str(passed).lower(),
            "mrt.promote_run_id": run_id,
            PROMOTION_ID_TAG: pid,
        }
        with promotion_lock(track):
            cleanup_pending(track, keep=pid)
            before = champion(track)
            decision = gate(metrics, before["metrics"] if before else None, passed, pp, reference)
            decision.reasons.insert(0, why)
            decision.champion_version_before = before["version"] if before else None
            version = register_candidate(track, model_uri, run_id, version_tags)
            decision.candidate_version = version
            if decision.promote:
                try:
                    set_alias(track, CHAMPION, version)
                except BaseException as exc:
                    _rollback_champion(track, pid, before, version, exc)
                    raise
            after = champion(track)
            decision.champion_version_after = after["version"] if after else None
            if decision.promote and decision.champion_version_after != version:
                decision.promote = False
                decision.reasons.append(
                    f"lost a concurrent promotion: champion is v{decision.champion_version_after}, not v{version}"
                )
            record_model_figures(track, model_run, model_uri, decision_figures(decision), {})
            call(track, "tag the gate result", client(track).set_model_version_tag, track.registered_model,
                 str(version), DECISION_TAG, "promoted" if decision.promote else "rejected")
        decision.model_name, decision.model_uri, decision.run_id = track.registered_model, model_uri, run_id
        write_json(pp.report, decision.to_dict())  # the registry already holds the outcome
        _record(track, run_id, decision)
        if own_run:
            tracking.end_run(run_id, "FINISHED", track=track)
        return decision
    except BaseException:
        if own_run:
            try:
                tracking.end_run(run_id, "FAILED", track=track.model_copy(update={"retries": 0}))
            except Exception:  # noqa: BLE001 - the server may be the reason we are here
                pass
        raise


_PROMOTE_PATHS = ("candidate_dir", "benchmark_report", "validation_report", "report", "comparison_report")


def decision_figures(d: Decision) -> dict[str, float]:
    """The gate's outcome as numbers for the version's logged model: `gate/promote`, one
    `gate/<condition>` (1 held, 0 not) per rule, the margins and deltas it compared."""
    figures: dict[str, float] = {"gate/promote": 1.0 if d.promote else 0.0}
    for name, value in (("gate/mean_delta", d.mean_delta), ("gate/required_margin", d.required_margin)):
        if value is not None:
            figures[name] = float(value)
    for c in d.conditions:
        figures[f"gate/{c.name}"] = 1.0 if c.held else 0.0
        if c.value is not None:
            figures[f"gate/{c.name}/value"] = float(c.value)
    return figures


def _record(track: "TrackParams", run_id: str, d: Decision) -> None:
    import tempfile

    tracking.set_tags(run_id, {
        "mrt.promoted": str(d.promote).lower(),
        "mrt.candidate_version": d.candidate_version,
        "mrt.champion_version": d.champion_version_after if d.champion_version_after is not None else "none",
    }, track=track)
    tracking.log_metrics(run_id, {
        "promotion/promoted": 1.0 if d.promote else 0.0,
        "promotion/candidate_heldout_mean": d.candidate_heldout_mean,
        "promotion/champion_heldout_mean": d.champion_heldout_mean,
        **({"promotion/mean_delta": d.mean_delta} if d.mean_delta is not None else {}),
        **{f"promotion/task_delta/{t}": x for t, x in d.task_deltas.items()},
        **({"promotion/required_margin": d.required_margin} if d.required_margin is not None else {}),
        **{f"promotion/{c.name}": 1.0 if c.held else 0.0 for c in d.conditions},
        **{f"promotion/{c.name}/value": c.value for c in d.conditions
           if c.name in ("beats_majority", "beats_frozen_base") and c.value is not None},
    }, track=track)
    with tempfile.TemporaryDirectory(prefix="mrt-promotion-") as tmp:
        p = Path(tmp) / "promotion.json"
        p.write_text(json.dumps(d.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
        (Path(tmp) / "promotion.md").write_text(d.markdown(), encoding="utf-8")
        tracking.log_artifact(run_id, p, "promotion", track=track)
        tracking.log_artifact(run_id, Path(tmp) / "promotion.md", "promotion", track=track)


# ---------------------------------------------------------------------------------------------
# serving side
# ---------------------------------------------------------------------------------------------
def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/name@alias` → (name, None, alias); `models:/name/3` → (name, "3", None)."""
    if not uri.startswith("models:/"):
        raise ValueError(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        if name and alias:
            return name, None, alias
    elif "/" in rest:
        name, version = rest.split("/", 1)
        if name and version.isdigit():
            return name, version, None
    raise ValueError(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>")


def resolve_version(uri: str, cache_dir: str = "models/registry-cache", track: "TrackParams | None" = None) -> dict[str, Any]:
    """Download a registered version (editors/adapter + base reference; once per version) and find
    its base: {version, base_dir, adapter_dir, fingerprint}. The alias is resolved to a version
    first, so the cache never serves a stale champion. The base is looked up as the pyfunc model
    does ($MRT_BASE_DIR, then the recorded path); pass `fingerprint` on to `load_model` to check it."""
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model

    from components.track.pyfunc_model import ARTIFACT_ADAPTER, ARTIFACT_BASE_REF, read_base_ref, resolve_base

    track = tracking._track(track)
    tracking.configure(track)
    name, version, alias = parse_model_uri(uri)
    c = client(track)
    try:
        if alias is not None:
            mv = call(track, f"resolve {uri}", c.get_model_version_by_alias, name, alias)
        else:
            mv = call(track, f"resolve {uri}", c.get_model_version, name, version)
    except Exception as exc:  # noqa: BLE001
        if _not_found(exc) or _alias_missing(exc):
            raise ValueError(f"{uri}: no such registered model version ({exc})") from None
        raise
    dest = Path(cache_dir) / name / f"v{mv.version}"
    if not (dest / ".complete").is_file():
        with replace_folder(dest) as tmp:
            call(track, f"download {name} v{mv.version}", download_artifacts,
                 artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(tmp))
            (tmp / ".complete").write_text(json.dumps({"uri": uri, "version": int(mv.version)}), encoding="utf-8")
    mlmodel = next(dest.rglob("MLmodel"), None)
    if mlmodel is None:
        raise ValueError(f"{uri}: downloaded version {mv.version} has no MLmodel file ({dest})")
    root = mlmodel.parent
    arts = (Model.load(str(mlmodel)).flavors.get("python_function", {}) or {}).get("artifacts", {})

    def _path(key: str) -> str | None:
        entry = arts.get(key)
        if not entry:
            return None
        rel = entry.get("path") if isinstance(entry, dict) else entry
        return str(root / rel)

    ref_file = _path(ARTIFACT_BASE_REF)
    if ref_file is None:
        raise ValueError(f"{uri}: version {mv.version} is not an MRT editor model (no '{ARTIFACT_BASE_REF}' artifact)")
    ref = read_base_ref(ref_file)
    adapter = _path(ARTIFACT_ADAPTER)
    return {"version": int(mv.version), "base_dir": resolve_base(ref, adapter), "adapter_dir": adapter,
            "fingerprint": ref["fingerprint"]}
