"""Shared setup for the tracking / registry / promotion tests: fast tracking params, a tiny base +
editors on disk, and benchmark/validation reports with chosen scores. The fixtures built on these
(`migrated_db`, `store`, `tiny_artifacts`) live in tests/conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

from components.core.config import Params, TrackParams

TASKS = ("hx_a", "hx_b", "hx_c")


def fast_track(**kw) -> TrackParams:
    """Test tracking params: no system-metrics thread, short retries."""
    return TrackParams(**{"system_metrics": False, "retries": 1, "retry_delay_s": 0.05, **kw})


def registered_versions(track: TrackParams) -> list:
    """Every version of `track.registered_model` as the registry `track` resolves to lists it ([] before
    the first)."""
    from components.track.tracking import client

    return list(client(track).search_model_versions(f"name='{track.registered_model}'"))


def build_model(root: Path, seed: int = 1) -> tuple[Path, Path, Path]:
    """(base_dir, editors_dir, an image) — a tiny LLaVA nudged off its init plus random editors, so
    answers depend on image, prompt and editors."""
    import torch

    from components.model.backbone import save_base
    from components.core.config import EditorParams
    from components.editors import attach
    from components.editors.io import model_fingerprint, save_editors
    from tiny_llava import nudge, tiny_model

    model, processor, _, images = tiny_model(root, seed=seed)
    gen = torch.Generator().manual_seed(seed)  # nudges the base, then draws the editors
    nudge(model, gen)
    base = root / "base"
    save_base(model, processor, base)
    editors = attach(model, EditorParams())
    with torch.no_grad():
        for p in editors.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    save_editors(editors, root / "editors", str(base), model_fingerprint(model))
    (root / "editors" / "checkpoints").mkdir()  # resumable state that must not travel with the model
    (root / "editors" / "checkpoints" / "state.pt").write_bytes(b"x" * 10)
    return base, root / "editors", images / "red.png"


def bench_report(heldout: dict[str, float], majority: float | None = None) -> dict:
    """The smallest benchmark report `components.track.benchmark_runs.flat_metrics` reads; `majority`: the
    best-constant held-out mean of its summary (None: no summary)."""
    mean = sum(heldout.values()) / len(heldout)
    summary = None if majority is None else {
        "tasks": {}, "mean": mean, "chance_mean": 0.4, "majority_mean": majority, "train_majority_mean": None,
        "chance_corrected_mean": (mean - 0.4) / 0.6, "majority_chance_corrected_mean": (majority - 0.4) / 0.6,
        "collapsed_tasks": []}
    return {
        "model": {"trainable_params": 100, "trainable_pct": 0.5, "method": "mrt"},
        "heldout": heldout,
        "heldout_mean": mean,
        "heldout_summary": summary,
        "mme": {"existence": {"acc": 50.0, "acc_plus": 0.0, "score": 50.0}},
        "mme_perception": 50.0,
        "mme_cognition": 0.0,
        "mme_total": 50.0,
        "robustness": {},
        "real_image_mean": None,
    }


def promote_params(root: Path, model: tuple[Path, Path, Path], heldout: dict[str, float], name: str = "run",
                   validation: bool | None = True, track: TrackParams | None = None, majority: float | None = None,
                   **promote_kw) -> Params:
    """Params for one promotion of `model` scored `heldout`; reports under root/name."""
    base, editors, _ = model
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "benchmark.json").write_text(json.dumps(bench_report(heldout, majority)))
    if validation is not None:
        (d / "validation.json").write_text(json.dumps({"success": validation, "checks_failed": 0 if validation else 2}))
    data = root / "data"
    data.mkdir(exist_ok=True)
    (data / "train.json").write_text("[]")
    return Params.model_validate({
        "train": {"base_dir": str(base), "out_dir": str(editors), "data_dir": str(data)},
        "track": (track or fast_track()).model_dump(),
        "promote": {
            "candidate_dir": str(editors),
            "benchmark_report": str(d / "benchmark.json"),
            "validation_report": str(d / "validation.json"),
            "report": str(d / "promotion.json"),
            # registry mechanics, not the noise guard (test_promotion_gate.py), unless a test asks for it
            "comparison_report": None,
            "enforce_baselines": False,
            **promote_kw,
        },
    })
