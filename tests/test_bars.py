"""The benchmark's bars: computed from the reports, met only when the numbers say so."""

from __future__ import annotations

from components.experiments.bars import bar_rows, separation
from components.experiments.report import ablation_table, aggregate_arms


def _stat(*values):
    import statistics

    vals = list(values)
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "values": vals}


def _comparison(mrt_heldin=(0.9, 0.88, 0.9), mrt_cc=(0.45, 0.5, 0.41), mrt_out=(0.7, 0.72, 0.71), lora_out=(0.69,),
                full_out=(0.72,), acc_plus=(45.0, 50.0, 42.0), total=(420.0, 430.0, 425.0), collapsed=None):
    return {
        "methods": {
            "mrt": {"heldin_mean": _stat(*mrt_heldin), "heldout_chance_corrected_mean": _stat(*mrt_cc),
                    "heldout_mean": _stat(*mrt_out), "mme_acc_plus_mean": _stat(*acc_plus), "mme_total": _stat(*total),
                    "collapsed": {"heldout": collapsed or {}}, "per_task": {f"t{i}": {} for i in range(7)},
                    "trainable_params": 13_240},
            "lora": {"heldout_mean": _stat(*lora_out), "trainable_params": 81_920},
            "full": {"heldout_mean": _stat(*full_out), "trainable_params": 1_074_816},
        },
        "baselines": {"mme": {"majority_total": 250.0}},
    }



def test_bars_met_when_every_number_clears_its_threshold():
    rows = bar_rows(_comparison())
    assert [r[2] for r in rows[:6]] == ["yes"] * 6
    assert rows[-1][2] == "not measured"  # no ablation given


def test_each_bar_fails_on_its_own_number():
    assert bar_rows(_comparison(mrt_heldin=(0.84,)))[0][2] == "no"
    assert bar_rows(_comparison(mrt_cc=(0.39,)))[1][2] == "no"
    collapsed = bar_rows(_comparison(collapsed={"t3": 1}))[2]
    assert collapsed[2] == "no" and "1 of 7 (t3)" in collapsed[1]
    assert bar_rows(_comparison(acc_plus=(39.0,)))[3][2] == "no"
    assert bar_rows(_comparison(total=(374.0,)))[3][2] == "no"  # 1.5 × 250 = 375
    assert bar_rows(_comparison(mrt_out=(0.68,), full_out=(0.72,)))[4][2] == "no"  # 0.944 < 0.95
    lora = bar_rows(_comparison(mrt_out=(0.70,), lora_out=(0.71,)))[5]
    assert lora[2] == "no" and "0.700 < 0.710" in lora[1]


def test_separation_needs_two_seeds_and_twice_the_larger_sd():
    ref = {"heldout_mean": _stat(0.50, 0.52, 0.51)}  # sd 0.01
    assert separation({"heldout_mean": _stat(0.60)}, ref) is None
    far = separation({"heldout_mean": _stat(0.55, 0.56, 0.54)}, ref)
    assert far["apart"] and abs(far["threshold"] - 0.02) < 1e-9
    near = separation({"heldout_mean": _stat(0.525, 0.535, 0.53)}, ref)
    assert not near["apart"]


def _rows(arm, family, values, heldin=None):
    return [{"arm": arm, "family": family, "seed": i, "status": "ok", "heldout_mean": v,
             "heldin_mean": None if heldin is None else heldin[i]} for i, v in enumerate(values)]


def test_ablation_bar_counts_group_arms_apart_from_all():
    rows = (_rows("all", "reference", [0.50, 0.52, 0.51]) + _rows("only-visual", "only", [0.40, 0.41, 0.42])
            + _rows("no-prefix", "leave-one-out", [0.51, 0.50, 0.52]) + _rows("len-2", "length", [0.1]))
    bar = bar_rows(_comparison(), aggregate_arms(rows))[-1]
    assert bar[2] == "yes" and bar[1] == "held-out: 1 of 2 arms apart (only-visual)"
    # held-in is reported beside held-out; the verdict stays on held-out
    rows_in = (_rows("all", "reference", [0.50, 0.52, 0.51], heldin=[0.60, 0.61, 0.62])
               + _rows("no-prefix", "leave-one-out", [0.51, 0.50, 0.52], heldin=[0.50, 0.51, 0.52]))
    bar_in = bar_rows(_comparison(), aggregate_arms(rows_in))[-1]
    assert bar_in[2] == "no" and bar_in[1] == "held-out: 0 of 1 arms apart; held-in: 1 of 1 (no-prefix)"
    table = ablation_table(rows_in, detailed=False)
    assert "apart > 2 SD (out · in)" in table and "| no · yes |" in table
    one_seed = _rows("all", "reference", [0.5]) + _rows("only-visual", "only", [0.3])
    assert bar_rows(_comparison(), aggregate_arms(one_seed))[-1][2] == "not measured"
