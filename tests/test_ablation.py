"""`mrt ablate`: grid expansion, arm filtering, the report writers, and a smoke sweep end to end."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from components.experiments.ablation import GROUPS, expand_grid, placement_variants, run_ablation
from components.core.config import AblateParams, EditorParams, ParamsError, TrainParams
from components.experiments.report import ablation_markdown, read_ablation_csv, write_ablation_csv, write_ablation_plot
from components.editors.placement import describe_placement

BASE = TrainParams().editors  # the params default: every group on
DEFAULT_NAMES = [
    "all", "only-visual", "only-projector", "only-prefix", "only-suffix",
    "no-visual", "no-projector", "no-prefix", "no-suffix",
    "depth-odd", "depth-first-half", "depth-second-half", "len-2", "len-6", "rank-x0.5", "rank-x2",
]


def _arm(arms, name):
    return next(a for a in arms if a.name == name)


def _same_except(a: EditorParams, b: EditorParams, groups: set[str]) -> bool:
    return all(getattr(a, g) == getattr(b, g) for g in GROUPS if g not in groups) and a.dropout == b.dropout


# ---------------------------------------------------------------------------------------------
# the grid
# ---------------------------------------------------------------------------------------------
def test_default_grid_has_the_planned_arms_in_order():
    arms = expand_grid(AblateParams(group_seeds=[]), BASE)
    assert [a.name for a in arms] == DEFAULT_NAMES
    assert all(a.seed == 0 for a in arms)
    assert _arm(arms, "all").editors == BASE
    assert len({a.editors.model_dump_json() for a in arms}) == len(arms)  # no two arms train the same thing


def test_only_group_switches_every_other_group_off():
    arms = expand_grid(AblateParams(), BASE)
    vis = _arm(arms, "only-visual").editors
    assert vis.prefix.layers == "none" and vis.suffix.layers == "none" and vis.projector.enabled is False
    assert vis.visual == BASE.visual
    proj = _arm(arms, "only-projector").editors
    assert proj.projector == BASE.projector
    assert proj.visual.layers == proj.prefix.layers == proj.suffix.layers == "none"


def test_leave_one_out_drops_exactly_one_group():
    arms = expand_grid(AblateParams(), BASE)
    no_prefix = _arm(arms, "no-prefix").editors
    assert no_prefix.prefix.layers == "none" and _same_except(no_prefix, BASE, {"prefix"})
    no_proj = _arm(arms, "no-projector").editors
    assert no_proj.projector.enabled is False and _same_except(no_proj, BASE, {"projector"})


def test_depth_length_and_rank_variants():
    arms = expand_grid(AblateParams(), BASE)
    odd = _arm(arms, "depth-odd").editors
    assert odd.visual.layers == odd.prefix.layers == odd.suffix.layers == "odd"
    assert odd.projector == BASE.projector and odd.prefix.rank == BASE.prefix.rank
    assert _arm(arms, "depth-first-half").editors.prefix.layers == "first_half"
    short = _arm(arms, "len-2").editors
    assert short.prefix.length == short.suffix.length == 2
    assert short.prefix.layers == BASE.prefix.layers and short.visual == BASE.visual
    half, double = _arm(arms, "rank-x0.5").editors, _arm(arms, "rank-x2").editors
    for g in GROUPS:
        assert getattr(half, g).rank == max(1, round(getattr(BASE, g).rank / 2))
        assert getattr(double, g).rank == 2 * getattr(BASE, g).rank


def test_seeds_multiply_arms_and_full_grid_extends_default():
    arms = expand_grid(AblateParams(seeds=[0, 1, 2, 1]), BASE)
    assert len(arms) == 3 * len(DEFAULT_NAMES)
    assert len({a.key for a in arms}) == len(arms)
    assert [a.seed for a in arms[:3]] == [0, 1, 2] and arms[0].name == arms[2].name == "all"
    full = [a.name for a in expand_grid(AblateParams(grid="full", group_seeds=[]), BASE)]
    assert set(DEFAULT_NAMES) < set(full) and len(full) == len(set(full))
    assert {"depth-even", "len-10", "rank-x4", "rank-v2-m8"} <= set(full)


def test_group_arms_run_the_group_seeds_too():
    arms = expand_grid(AblateParams(seeds=[0], group_seeds=[0, 1, 2]), BASE)
    seeds = {}
    for a in arms:
        seeds.setdefault(a.name, []).append(a.seed)
    assert list(seeds) == DEFAULT_NAMES
    for name, s in seeds.items():
        group_arm = name == "all" or name.startswith(("only-", "no-"))
        assert s == ([0, 1, 2] if group_arm else [0]), name
    assert len({a.key for a in arms}) == len(arms)


def test_arms_filter_keeps_grid_order_and_names_unknown_arms():
    arms = expand_grid(AblateParams(arms=["len-2", "all"], seeds=[3]), BASE)
    assert [(a.name, a.seed) for a in arms] == [("all", 3), ("all", 0), ("all", 1), ("all", 2), ("len-2", 3)]
    with pytest.raises(ParamsError) as err:
        expand_grid(AblateParams(arms=["all", "only-vision"]), BASE)
    msg = str(err.value)
    assert "ablate.arms" in msg and "'only-vision'" in msg and "only-visual" in msg and "rank-x2" in msg


def test_groups_off_in_the_base_are_not_swept():
    base = EditorParams.model_validate({"projector": {"enabled": False}, "suffix": {"layers": "none"}})
    names = [n for n, _, _ in placement_variants("default", base)]
    assert "only-projector" not in names and "no-projector" not in names and "no-suffix" not in names
    assert {"only-visual", "only-prefix", "len-2", "depth-odd"} <= set(names)
    assert "no-visual" not in names and "no-prefix" not in names  # two groups on: the same as only-prefix/visual
    assert placement_variants("default", base)[0][2].projector.enabled is False
    single = EditorParams.model_validate({"projector": {"enabled": False}, "visual": {"layers": "none"},
                                          "suffix": {"layers": "none"}})
    names = [n for n, _, _ in placement_variants("default", single)]
    assert "only-prefix" not in names and "no-prefix" not in names  # same as `all` / no editor at all
    off = EditorParams.model_validate({"projector": {"enabled": False}, "visual": {"layers": "none"},
                                       "prefix": {"layers": "none"}, "suffix": {"layers": "none"}})
    with pytest.raises(ParamsError, match="every group is off"):
        expand_grid(AblateParams(), off)


def test_grid_expansion_imports_no_torch():
    code = ("import sys; from components.experiments.ablation import expand_grid; from components.core.config import AblateParams, "
            "TrainParams; expand_grid(AblateParams(grid='full'), TrainParams().editors); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)


# ---------------------------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------------------------
def _rows():
    common = dict(family="reference", groups="visual+prefix", layers="visual=0-2;prefix=0-3", ranks="visual=6;prefix=4",
                  lengths="prefix=4", train_wall_s=10.0, out_dir="x", error="")
    return [
        dict(arm="all", seed=0, trainable_params=1000, heldout_mean=0.40, mme_total=100.0, mme_perception=100.0,
             **{"heldout/a": 0.5, "heldout/b": 0.3}, wall_s=20.0, status="ok", **common),
        dict(arm="all", seed=1, trainable_params=1000, heldout_mean=0.50, mme_total=110.0, mme_perception=110.0,
             **{"heldout/a": 0.6, "heldout/b": 0.4}, wall_s=22.0, status="ok", **common),
        dict(arm="no-prefix", seed=0, trainable_params=400, heldout_mean=0.30, mme_total=90.0, mme_perception=90.0,
             **{"heldout/a": 0.4, "heldout/b": 0.2}, wall_s=15.0, status="ok", **{**common, "family": "leave-one-out"}),
        dict(arm="no-prefix", seed=1, trainable_params=None, heldout_mean=None, mme_total=None, mme_perception=None,
             wall_s=None, status="failed", **{**common, "family": "leave-one-out", "error": "ValueError: boom\nmore"}),
    ]


def test_csv_round_trip_keeps_numbers_and_empty_cells(tmp_path):
    path = write_ablation_csv(tmp_path / "r" / "ablation.csv", _rows())
    with open(path, newline="") as fh:
        header = next(csv.reader(fh))
    assert header[:8] == ["arm", "seed", "family", "groups", "layers", "ranks", "lengths", "trainable_params"]
    assert header.index("heldout/a") > header.index("mme_total") and header[-3:] == ["status", "error", "out_dir"]
    back = read_ablation_csv(path)
    assert back[0]["heldout_mean"] == 0.4 and back[0]["seed"] == 0 and back[0]["heldout/b"] == 0.3
    assert back[3]["heldout_mean"] is None and back[3]["heldout/a"] is None and back[3]["status"] == "failed"
    assert not list(tmp_path.joinpath("r").glob(".*tmp"))  # the temporary file was renamed away


def test_markdown_aggregates_seeds_and_lists_failures():
    md = ablation_markdown(_rows(), {"grid": "default", "steps": 300, "seeds": [0, 1], "per_task": 20,
                                     "base_dir": "b", "data_dir": "d", "workers": 2, "threads_per_worker": 1,
                                     "wall_s": 60})
    line_all = next(line for line in md.splitlines() if line.startswith("| all |"))
    assert "0.450 ± 0.071" in line_all and "105.0 ± 7.1" in line_all and "1,000" in line_all
    line_np = next(line for line in md.splitlines() if line.startswith("| no-prefix |"))
    assert "0.300" in line_np and "-0.150" in line_np and "1/2 failed" in line_np
    assert "`no-prefix/seed-1`: ValueError: boom" in md and "more" not in md


def test_markdown_shows_chance_corrected_held_in_collapse_and_baselines(tmp_path):
    extra = dict(heldout_chance_corrected_mean=0.1, heldin_mean=0.8, collapsed_heldout=2, collapsed_heldin=0,
                 collapsed_mme=5, heldout_chance_mean=0.43, heldout_majority_mean=0.55,
                 heldout_majority_chance_corrected_mean=0.2, heldin_chance_mean=0.3, heldin_majority_mean=0.45,
                 mme_chance_total=375.0, mme_majority_total=250.0, **{"heldin/vf_a": 0.8})
    rows = [{**r, **extra} if r["status"] == "ok" else r for r in _rows()]
    rows[1]["collapsed_heldout"] = 3
    back = read_ablation_csv(write_ablation_csv(tmp_path / "a.csv", rows))
    assert back[0]["collapsed_heldout"] == 2 and back[0]["heldin/vf_a"] == 0.8 and back[0]["mme_majority_total"] == 250.0
    md = ablation_markdown(back, {"grid": "default", "steps": 3, "seeds": [0, 1]})
    line_all = next(line for line in md.splitlines() if line.startswith("| all |"))
    assert "| 0.100 ± 0.000 | 0.800 ± 0.000 |" in line_all and "| 2.5 · 0 · 5 |" in line_all
    assert ("chance (uniform guess) held-out 0.430, held-in 0.300, MME 375.0; best constant answer on the test "
            "set held-out 0.550 (chance-corrected 0.200), held-in 0.450, MME 250.0") in md
    assert "Chance-corrected: (accuracy − chance) / (1 − chance)" in md


def test_plot_is_a_png(tmp_path):
    from PIL import Image

    path = write_ablation_plot(tmp_path / "ablation.png", _rows(), {"grid": "default", "steps": 3, "seeds": [0, 1]})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.width > 300 and im.height > 100


def test_describe_placement_resolves_layers_against_the_model():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    cfg = LlavaConfig(vision_config=CLIPVisionConfig(num_hidden_layers=4),
                      text_config=LlamaConfig(num_hidden_layers=6), vision_feature_layer=-2)
    odd = _arm(expand_grid(AblateParams(), BASE), "depth-odd").editors
    d = describe_placement(odd, cfg)
    assert d["layers"] == "visual=1;prefix=1,3,5;suffix=1,3,5"
    assert d["groups"] == "visual+projector+prefix+suffix" and d["lengths"] == "prefix=4;suffix=4"
    assert describe_placement(odd)["layers"] == "visual=odd;prefix=odd;suffix=odd"


# ---------------------------------------------------------------------------------------------
# end to end on a tiny base
# ---------------------------------------------------------------------------------------------
def _check_outputs(ab: AblateParams, rows, names):
    assert [r["arm"] for r in rows] == names
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    back = read_ablation_csv(ab.report_csv)
    assert [r["arm"] for r in back] == names
    for r in back:
        assert r["trainable_params"] > 0 and 0 <= r["heldout_mean"] <= 1 and r["mme_total"] is not None
        assert any(k.startswith("heldout/") for k in r) and any(k.startswith("heldin/") for k in r)
        assert r["heldin_mean"] is not None and r["heldout_chance_corrected_mean"] is not None
        assert 0 < r["heldout_chance_mean"] <= r["heldout_majority_mean"] <= 1 and r["collapsed_heldout"] >= 0
        folder = Path(r["out_dir"])
        for name in ("editor_config.json", "train.json", "benchmark.json", "predictions.jsonl", "log.txt"):
            assert (folder / name).is_file(), folder / name
    assert back[0]["trainable_params"] > back[1]["trainable_params"]  # all groups > visual alone
    md = Path(ab.report_md).read_text()
    assert all(f"| {n} |" in md for n in names)
    assert Path(ab.plot).read_bytes()[:4] == b"\x89PNG"


def test_two_arms_end_to_end_in_process(tiny_setup, tmp_path):
    from tiny_sweep import ablate_params, bench_params, train_params

    data, base = tiny_setup
    ab = ablate_params(tmp_path, arms=["only-visual", "all"], workers=1)
    seen = []
    rows = run_ablation(ab, train_params(tmp_path, data, base), bench_params(tmp_path, data, base),
                        report=lambda done, total, res: seen.append((done, total, res["pid"])))
    _check_outputs(ab, rows, ["all", "only-visual"])
    assert [s[:2] for s in seen] == [(1, 2), (2, 2)] and {s[2] for s in seen} == {os.getpid()}
    bench = (Path(rows[0]["out_dir"]) / "benchmark.json").read_text()
    assert '"robustness": {}' in bench  # perturbation passes are skipped in a sweep


def test_two_arms_end_to_end_in_a_process_pool(tiny_setup, tmp_path):
    from tiny_sweep import ablate_params, bench_params, train_params

    data, base = tiny_setup
    ab = ablate_params(tmp_path, arms=["all", "only-visual"], workers=2)
    pids = []
    rows = run_ablation(ab, train_params(tmp_path, data, base), bench_params(tmp_path, data, base),
                        report=lambda done, total, res: pids.append(res["pid"]))
    _check_outputs(ab, rows, ["all", "only-visual"])
    assert len(pids) == 2 and os.getpid() not in pids  # the arms really ran in worker processes


def test_a_failing_arm_is_recorded_and_the_others_finish(tiny_setup, tmp_path):
    from tiny_sweep import SMALL_EDITORS, ablate_params, bench_params, train_params

    data, base = tiny_setup
    tp = train_params(tmp_path, data, base, lr={"mrt": 0.002, "lora": 0.0001})
    # Visual layer 7 does not exist in the 2-layer tiny tower: every arm with visual editors fails.
    tp = tp.model_copy(update={"editors": SMALL_EDITORS.model_copy(update={"visual": SMALL_EDITORS.visual.model_copy(
        update={"layers": [7]})})})
    ab = ablate_params(tmp_path, arms=["all", "only-prefix"], workers=1)
    rows = run_ablation(ab, tp, bench_params(tmp_path, data, base), report=None)
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert "editors.visual.layers" in rows[0]["error"] and "layer 7" in rows[0]["error"]
    assert rows[0]["heldout_mean"] is None and rows[1]["heldout_mean"] is not None
    md = Path(ab.report_md).read_text()
    assert "`all/seed-0`" in md and "| all |" in md
    assert "training steps per arm at learning rate 0.002," in md  # the arms train MRT: its own rate


def test_markdown_names_the_group_arms_seeds():
    rows = [{"arm": "all", "seed": s, "family": "reference", "status": "ok", "heldout_mean": v}
            for s, v in ((0, 0.5), (1, 0.52), (2, 0.51))]
    md = ablation_markdown(rows, {"grid": "default", "steps": 3, "seeds": [0], "group_seeds": [0, 1, 2]})
    assert "seeds [0] (group arms: [0, 1, 2])" in md and "mean ± sample std over seeds" in md
    plain = ablation_markdown(rows[:1], {"grid": "default", "steps": 3, "seeds": [0], "group_seeds": [0]})
    assert "seeds [0]," in plain and "group arms" not in plain and "mean ± sample std" not in plain
