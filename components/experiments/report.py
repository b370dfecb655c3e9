"""Tables, plots and the README results block, written from the ablation and comparison reports.

Why a module of its own: the numbers in README.md must come from the report files, never be typed
by hand, so one code path renders them for `mrt ablate`/`mrt compare` (ablation.md, comparison.md)
and for `mrt report` (README.md between the results markers). Every file is written atomically
(temporary file + rename): a crash never leaves half a table, and DVC never caches one.
Plots use matplotlib's object API with the Agg canvas, so nothing touches pyplot's global backend.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterable, Sequence
from components.core.files import write_bytes, write_text
from components.experiments.bars import bar_rows, separation
from components.core.markdown import ReportError, check_markers, fmt_int, fmt_pm, mean_std, md_table, produced_by, replace_marked_block, utc_now

RESULTS_START = "<!-- results:start -->"
RESULTS_END = "<!-- results:end -->"
METHOD_LABELS = {"frozen": "frozen base", "mrt": "MRT", "lora": "LoRA", "full": "full fine-tuning"}
# Fixed leading columns of ablation.csv; per-task columns `heldout/<task>` and `heldin/<task>` follow,
# then the tail. The baseline columns are the same on every row (one set of evaluated records).
ABLATION_HEAD = ["arm", "seed", "family", "groups", "layers", "ranks", "lengths", "trainable_params",
                 "heldout_mean", "heldout_chance_corrected_mean", "heldin_mean", "mme_total", "mme_perception",
                 "collapsed_heldout", "collapsed_heldin", "collapsed_mme"]
ABLATION_BASELINES = ["heldout_chance_mean", "heldout_majority_mean", "heldout_majority_chance_corrected_mean",
                      "heldin_chance_mean", "heldin_majority_mean", "mme_chance_total", "mme_majority_total"]
ABLATION_TAIL = ["train_wall_s", "wall_s", "status", "error", "out_dir"]
_TASK_PREFIXES = ("heldout/", "heldin/")
_INT_FIELDS = {"seed", "trainable_params", "collapsed_heldout", "collapsed_heldin", "collapsed_mme"}
_FLOAT_FIELDS = {"heldout_mean", "heldout_chance_corrected_mean", "heldin_mean", "mme_total", "mme_perception",
                 "train_wall_s", "wall_s", *ABLATION_BASELINES}
COLLAPSE_MARK = "†"  # beside a score: the model gave one answer to every record of that task
METHOD_COLORS = {"frozen": "#7f7f7f", "mrt": "#1f77b4", "lora": "#ff7f0e", "full": "#2ca02c"}
FAMILY_COLORS = {"reference": "#1f77b4", "only": "#ff7f0e", "leave-one-out": "#2ca02c", "depth": "#9467bd",
                 "length": "#8c564b", "rank": "#e377c2"}


# ---------------------------------------------------------------------------------------------
# atomic writes and small formatting helpers
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# placements, in words
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# ablation: CSV, Markdown, plot
# ---------------------------------------------------------------------------------------------
def ablation_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    fixed = ABLATION_HEAD + ABLATION_BASELINES + ABLATION_TAIL
    heldout = sorted({k for r in rows for k in r if k.startswith("heldout/")})
    heldin = sorted({k for r in rows for k in r if k.startswith("heldin/")})
    extra = [k for r in rows for k in r if k not in fixed and not k.startswith(_TASK_PREFIXES)]
    return ABLATION_HEAD + heldout + heldin + ABLATION_BASELINES + list(dict.fromkeys(extra)) + ABLATION_TAIL


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return round(v, 6)
    return v


def write_ablation_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """One row per arm x seed; missing values are empty cells."""
    cols = ablation_columns(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: _csv_value(r.get(c)) for c in cols})
    return write_text(path, buf.getvalue())


def read_ablation_csv(path: str | Path) -> list[dict[str, Any]]:
    """ablation.csv back into rows with numbers (empty cells → None)."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"{path}: ablation CSV not found (run `mrt ablate` first)")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("arm", "seed", "heldout_mean", "status") if c not in (reader.fieldnames or [])]
        if missing:
            raise ReportError(f"{path}: not an ablation CSV (missing columns {', '.join(missing)})")
        rows = []
        for line, raw in enumerate(reader, start=2):
            row: dict[str, Any] = {}
            for k, v in raw.items():
                try:
                    if v in ("", None):
                        row[k] = None if (k in _INT_FIELDS or k in _FLOAT_FIELDS or k.startswith(_TASK_PREFIXES)) else ""
                    elif k in _INT_FIELDS:
                        row[k] = int(float(v))
                    elif k in _FLOAT_FIELDS or k.startswith(_TASK_PREFIXES):
                        row[k] = float(v)
                    else:
                        row[k] = v
                except ValueError:
                    raise ReportError(f"{path}: line {line}, column '{k}': not a number: {v!r}") from None
            rows.append(row)
    return rows


def aggregate_arms(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per arm (grid order): its rows' stats over the seeds that finished."""
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_arm.setdefault(r["arm"], []).append(r)
    out = []
    for arm, rs in by_arm.items():
        ok = [r for r in rs if r.get("status") == "ok"]
        first = rs[0]
        out.append({
            "arm": arm,
            "family": first.get("family", ""),
            "groups": first.get("groups", ""),
            "layers": first.get("layers", ""),
            "ranks": first.get("ranks", ""),
            "lengths": first.get("lengths", ""),
            "trainable_params": next(
                (r["trainable_params"] for r in rs if r.get("trainable_params") is not None), None),
            "heldout_mean": mean_std(r.get("heldout_mean") for r in ok),
            "heldout_chance_corrected_mean": mean_std(r.get("heldout_chance_corrected_mean") for r in ok),
            "heldin_mean": mean_std(r.get("heldin_mean") for r in ok),
            "mme_total": mean_std(r.get("mme_total") for r in ok),
            "collapsed": {split: mean_std(r.get(f"collapsed_{split}") for r in ok)
                          for split in ("heldout", "heldin", "mme")},
            "wall_s": mean_std(r.get("wall_s") for r in ok),
            "n": len(rs),
            "failed": [r for r in rs if r.get("status") != "ok"],
        })
    return out


def _status(agg: dict[str, Any]) -> str:
    k = len(agg["failed"])
    return "ok" if k == 0 else "failed" if k == agg["n"] else f"{k}/{agg['n']} failed"


def _count(stat: dict[str, Any] | None) -> str:
    """Mean of a count over seeds: "3" or "2.5"; "—" when unknown."""
    if not stat or stat.get("mean") is None:
        return "—"
    m = stat["mean"]
    return f"{m:.0f}" if float(m).is_integer() else f"{m:.1f}"


def _collapsed_cell(collapsed: dict[str, dict[str, Any]]) -> str:
    return " · ".join(_count(collapsed.get(split)) for split in ("heldout", "heldin", "mme"))


def ablation_baselines(rows: Sequence[dict[str, Any]]) -> str:
    """One sentence: chance and best-constant scores of the records the arms were scored on."""
    first = next((r for r in rows if r.get("heldout_chance_mean") is not None), None)
    if first is None:
        return ""

    def num(key: str, digits: int = 3) -> str:
        v = first.get(key)
        return "—" if v is None else f"{v:.{digits}f}"

    return (f"Baselines of these records: chance (uniform guess) held-out {num('heldout_chance_mean')}, held-in "
            f"{num('heldin_chance_mean')}, MME {num('mme_chance_total', 1)}; best constant answer on the test set "
            f"held-out {num('heldout_majority_mean')} (chance-corrected "
            f"{num('heldout_majority_chance_corrected_mean')}), held-in {num('heldin_majority_mean')}, "
            f"MME {num('mme_majority_total', 1)}.")


# |Δ vs all| beyond twice the larger seed SD (both arms ≥ 2 seeds; — otherwise), on held-out · held-in
APART_HEAD = "apart > 2 SD (out · in)"


def ablation_table(rows: Sequence[dict[str, Any]], *, detailed: bool = True) -> str:
    aggs = aggregate_arms(rows)
    ref = next((a for a in aggs if a["arm"] == "all"), None)
    ref_mean = ref["heldout_mean"]["mean"] if ref else None

    def delta(a: dict[str, Any]) -> str:
        m = a["heldout_mean"]["mean"]
        if a is ref or m is None or ref_mean is None:
            return "—"
        return f"{round(m - ref_mean, 3) + 0.0:+.3f}"  # + 0.0: no "-0.000" from float noise

    def apart(a: dict[str, Any]) -> str:
        seps = [None if a is ref or ref is None else separation(a, ref, key) for key in ("heldout_mean", "heldin_mean")]
        return " · ".join("—" if sep is None else ("yes" if sep["apart"] else "no") for sep in seps)

    if detailed:
        header = ["arm", "groups", "layers", "ranks", "lengths", "trainable params", "held-out mean", "Δ vs all",
                  APART_HEAD, "held-out chance-corr.", "held-in mean", "MME total", "collapsed (out · in · MME)",
                  "wall s", "status"]
        body = [[a["arm"], a["groups"], a["layers"] or "—", a["ranks"] or "—", a["lengths"] or "—",
                 fmt_int(a["trainable_params"]), fmt_pm(a["heldout_mean"], 3), delta(a), apart(a),
                 fmt_pm(a["heldout_chance_corrected_mean"], 3), fmt_pm(a["heldin_mean"], 3),
                 fmt_pm(a["mme_total"], 1), _collapsed_cell(a["collapsed"]), fmt_pm(a["wall_s"], 0), _status(a)]
                for a in aggs]
        return md_table(header, body, "lllllrrrlrrrrrl")
    header = ["arm", "groups", "trainable params", "held-out mean", "Δ vs all", APART_HEAD, "held-out chance-corr.",
              "held-in mean", "MME total", "collapsed (out · in · MME)"]
    body = [[a["arm"], a["groups"], fmt_int(a["trainable_params"]), fmt_pm(a["heldout_mean"], 3), delta(a), apart(a),
             fmt_pm(a["heldout_chance_corrected_mean"], 3), fmt_pm(a["heldin_mean"], 3),
             fmt_pm(a["mme_total"], 1), _collapsed_cell(a["collapsed"])] for a in aggs]
    return md_table(header, body, "llrrrlrrrr")


def _failures(items: Iterable[tuple[str, str]]) -> str:
    lines = [f"- `{key}`: {(err or 'unknown error').splitlines()[0]}" for key, err in items]
    return ("\n\nFailed runs (the others are unaffected):\n\n" + "\n".join(lines)) if lines else ""


def _seeds_text(seeds: Sequence[int], group_seeds: Sequence[int]) -> str:
    """"seeds [0]", or "seeds [0] (group arms: [0, 1, 2])" when the group arms ran more."""
    return f"seeds {list(seeds)}" + (f" (group arms: {list(group_seeds)})" if list(group_seeds) != list(seeds) else "")


def ablation_markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    """ablation.md: what was swept, how, and the per-arm table (mean ± std over seeds)."""
    seeds = meta.get("seeds", [])
    group_seeds = meta.get("group_seeds") or seeds
    lines = [
        "# Editor placement ablation",
        "",
        f"Grid `{meta.get('grid')}`, {meta.get('steps')} training steps per arm"
        + (f" at learning rate {meta['lr']:g}" if meta.get("lr") else "") + f", {_seeds_text(seeds, group_seeds)}, "
        f"{meta.get('per_task') or 'all'} records per held-out task; base `{meta.get('base_dir')}`, "
        f"data `{meta.get('data_dir')}`; {meta.get('workers')} worker(s) × {meta.get('threads_per_worker')} "
        f"thread(s), sweep wall time {meta.get('wall_s')} s. Written by {produced_by('ablate')} on {utc_now()}.",
        "",
        "Held-out mean: exact match / option letter over the held-out tasks (zero-shot); "
        + ("mean ± sample std over seeds. " if len(group_seeds) > 1 else "")
        + "Δ vs all: difference to the reference placement (`train.editors`); apart: |Δ| is larger than "
        "twice the larger seed standard deviation of the two arms, on the held-out mean · on the held-in mean "
        "(— when either ran one seed). " + READING_NOTE,
        "",
        ablation_table(rows),
        "",
        ablation_baselines(rows),
    ]
    failed = [(f"{r['arm']}/seed-{r['seed']}", r.get("error", "")) for r in rows if r.get("status") != "ok"]
    return "\n".join(lines) + _failures(failed) + "\n"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return write_bytes(path, buf.getvalue())


def write_ablation_plot(path: str | Path, rows: Sequence[dict[str, Any]], meta: dict[str, Any] | None = None) -> Path:
    """Horizontal bars: held-out mean per arm (± std over seeds), trainable parameters written at
    each bar, a dashed line at the reference placement, colour by family."""
    meta = meta or {}
    aggs = aggregate_arms(rows)
    fig = _figure(8.0, 1.2 + 0.38 * max(len(aggs), 1))
    ax = fig.add_subplot(1, 1, 1)
    names = [a["arm"] for a in aggs]
    means = [a["heldout_mean"]["mean"] for a in aggs]
    stds = [a["heldout_mean"]["std"] if len(a["heldout_mean"]["values"]) > 1 else 0.0 for a in aggs]
    y = list(range(len(aggs)))
    colors = [FAMILY_COLORS.get(a["family"], "#7f7f7f") for a in aggs]
    ax.barh(y, [m or 0.0 for m in means], xerr=stds if any(stds) else None, color=colors, capsize=3)
    top = max([m + sd for m, sd in zip(means, stds) if m is not None] + [0.05])
    for yi, a, m, sd in zip(y, aggs, means, stds):
        label = "failed" if m is None else f"{m:.3f} · {fmt_int(a['trainable_params'])} params"
        ax.text((m or 0.0) + sd + top * 0.02, yi, label, va="center", fontsize=8)
    ref = next((a for a in aggs if a["arm"] == "all"), None)
    if ref and ref["heldout_mean"]["mean"] is not None:
        ax.axvline(ref["heldout_mean"]["mean"], color="black", linestyle="--", linewidth=0.8)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.45)
    ax.set_xlabel("held-out mean (zero-shot)")
    ax.set_title(f"Editor placement ablation — grid {meta.get('grid', '?')}, {meta.get('steps', '?')} steps, "
                 + _seeds_text(meta.get("seeds", []), meta.get("group_seeds") or meta.get("seeds", [])), fontsize=10)
    return _save_png(fig, path)


# ---------------------------------------------------------------------------------------------
# comparison: Markdown, plot
# ---------------------------------------------------------------------------------------------
def _trainable(m: dict[str, Any]) -> str:
    n = m.get("trainable_params")
    if n is None:
        return "—"
    pct = m.get("trainable_pct")
    return fmt_int(n) + (f" ({pct:.2f}%)" if pct is not None and n else "")


READING_NOTE = (
    "Chance-corrected: (accuracy − chance) / (1 − chance) per task, averaged (0 = chance, 1 = perfect). "
    "Held-in: the training task types on images no training split holds. Collapsed: tasks (held-out · "
    "held-in · MME subtasks) whose answers were one value for every record, mean over seeds.")


def _baseline_rows(summary: dict[str, Any]) -> list[list[str]]:
    """The rows a model without eyes earns: a uniform guess, the best constant answer on the test set,
    and the most common training answer (only where every task has training answers)."""
    base = summary.get("baselines") or {}
    out, inn, mme = base.get("heldout") or {}, base.get("heldin") or {}, base.get("mme") or {}
    if not (out or inn or mme):
        return []

    def num(d: dict[str, Any], key: str, digits: int = 3) -> str:
        v = d.get(key)
        return "—" if v is None else f"{v:.{digits}f}"

    rows = [
        ["chance (uniform guess)", "—", num(out, "chance_mean"), "0.000" if out else "—", num(inn, "chance_mean"),
         num(mme, "chance_total", 1), "—", "—", "—"],
        ["majority answer (best constant, test set)", "—", num(out, "majority_mean"),
         num(out, "majority_chance_corrected_mean"), num(inn, "majority_mean"), num(mme, "majority_total", 1),
         "all", "—", "—"],
    ]
    if out.get("train_majority_mean") is not None or inn.get("train_majority_mean") is not None:
        rows.append(["most common training answer", "—", num(out, "train_majority_mean"), "—",
                     num(inn, "train_majority_mean"), "—", "all", "—", "—"])
    return rows


def comparison_table(summary: dict[str, Any]) -> str:
    """One row per method (mean ± std over seeds), then the chance and constant-answer rows."""
    header = ["method", "trainable params", "held-out mean ± std", "held-out chance-corr. ± std",
              "held-in mean ± std", "MME total ± std", "collapsed (out · in · MME)", "wall s", "runs"]
    body = []
    for name, m in summary["methods"].items():
        ok = len(m.get("heldout_mean", {}).get("values") or [])
        body.append([METHOD_LABELS.get(name, name), _trainable(m), fmt_pm(m.get("heldout_mean"), 3),
                     fmt_pm(m.get("heldout_chance_corrected_mean"), 3), fmt_pm(m.get("heldin_mean"), 3),
                     fmt_pm(m.get("mme_total"), 1), _method_collapsed(m), fmt_pm(m.get("wall_s"), 0),
                     f"{ok}/{len(m.get('runs', []))}"])
    return md_table(header, body + _baseline_rows(summary), "lrrrrrrrr")


def _method_collapsed(m: dict[str, Any]) -> str:
    """Mean over successful seeds of how many tasks collapsed, per split (held-out · held-in · MME)."""
    runs = [r for r in m.get("runs") or [] if r.get("status") == "ok" and isinstance(r.get("collapsed"), dict)]
    if not runs:
        return "—"
    return " · ".join(_count(mean_std(len(r["collapsed"].get(split) or []) for r in runs))
                      for split in ("heldout", "heldin", "mme"))


def _task_cell(stat: dict[str, Any] | None, collapsed_in: int, seeds: int) -> str:
    text = fmt_pm(stat, 3)
    if collapsed_in and text != "—":
        text += f" {COLLAPSE_MARK}" + (f"{collapsed_in}/{seeds}" if collapsed_in < seeds else "")
    return text


def per_task_table(summary: dict[str, Any], split: str = "heldout") -> str:
    """Per task of a split: chance, the best constant answer (and its score), then each method's
    mean ± std over seeds, marked † where its answers collapsed to one value (†k/n: in k of n seeds)."""
    methods = list(summary["methods"])
    key = "per_task" if split == "heldout" else f"{split}_per_task"
    tasks = sorted({t for m in summary["methods"].values() for t in (m.get(key) or {})})
    base = ((summary.get("baselines") or {}).get(split) or {}).get("per_task") or {}

    def baseline(t: str) -> list[str]:
        b = base.get(t) or {}
        chance = "—" if b.get("chance") is None else f"{b['chance']:.3f}"
        majority = "—" if b.get("majority") is None else f"{b['majority']:.3f} ({b.get('majority_answer')})"
        return [chance, majority]

    body = []
    for t in tasks:
        cells = []
        for name in methods:
            m = summary["methods"][name]
            seeds = len((m.get(key) or {}).get(t, {}).get("values") or [])
            cells.append(_task_cell((m.get(key) or {}).get(t), (m.get("collapsed") or {}).get(split, {}).get(t, 0),
                                    seeds))
        body.append([t, *baseline(t), *cells])
    label = {"heldout": "held-out task", "heldin": "held-in task"}.get(split, f"{split} task")
    return md_table([label, "chance", "majority (answer)"] + [METHOD_LABELS.get(m, m) for m in methods], body,
                    "lrr" + "r" * len(methods))


def comparison_provenance(summary: dict[str, Any]) -> str:
    seeds = summary.get("seeds", [])
    rates = {m: e["lr"] for m, e in summary["methods"].items() if e.get("lr")}
    lr = ("" if not rates else f" at learning rate {next(iter(rates.values())):g}" if len(set(rates.values())) == 1
          else " at learning rates " + ", ".join(f"{METHOD_LABELS.get(m, m)} {v:g}" for m, v in rates.items()))
    return (f"Produced by `{summary.get('produced_by', 'mrt compare')}` on {summary.get('created', '?')}: "
            f"{len(summary['methods'])} methods on the same base, data and batches, {summary.get('steps')} "
            f"training steps{lr}, seeds {seeds}; mean ± sample std over seeds"
            + (" (the frozen base has no training, so it is benchmarked once)." if "frozen" in summary["methods"]
               else "."))


def comparison_markdown(summary: dict[str, Any]) -> str:
    failed = [(f"{name}/seed-{r['seed']}", r.get("error", "")) for name, m in summary["methods"].items()
              for r in m.get("runs", []) if r.get("status") != "ok"]
    parts = [
        "# MRT against LoRA, full fine-tuning and the frozen base",
        "",
        comparison_provenance(summary),
        "",
        comparison_table(summary),
        "",
        READING_NOTE,
        "",
        f"Per held-out task (mean ± std over seeds; {COLLAPSE_MARK}: answers collapsed to one value):",
        "",
        per_task_table(summary),
    ]
    if any(m.get("heldin_per_task") for m in summary["methods"].values()):
        parts += ["", "Per held-in task (training task types on unseen images):", "", per_task_table(summary, "heldin")]
    return "\n".join(parts) + _failures(failed) + "\n"


def _floors(summary: dict[str, Any], key: str) -> list[tuple[str, float, str]]:
    """The floors drawn across a panel: chance and the best constant answer of that split."""
    b = summary.get("baselines") or {}
    split, chance, constant = {"heldout_mean": ("heldout", "chance_mean", "majority_mean"),
                               "heldin_mean": ("heldin", "chance_mean", "majority_mean"),
                               "mme_total": ("mme", "chance_total", "majority_total")}[key]
    out = []
    for field, label, style in ((chance, "chance", ":"), (constant, "best constant answer", "--")):
        value = (b.get(split) or {}).get(field)
        if isinstance(value, (int, float)):
            out.append((label, float(value), style))
    return out


def write_comparison_plot(path: str | Path, summary: dict[str, Any]) -> Path:
    """One panel per score (held-out mean, held-in mean when measured, MME total): bars ± std, seeds
    as dots, and the floors no score means anything below — chance and the best constant answer."""
    methods = list(summary["methods"])
    panels = [("heldout_mean", "held-out mean (zero-shot)")]
    if any((summary["methods"][m].get("heldin_mean") or {}).get("mean") is not None for m in methods):
        panels.append(("heldin_mean", "held-in mean (training tasks, new images)"))
    panels.append(("mme_total", "MME total"))
    fig = _figure(4.4 * len(panels), 3.8)
    for k, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        stats = [summary["methods"][m].get(key) or {} for m in methods]
        means = [s.get("mean") or 0.0 for s in stats]
        stds = [s.get("std") or 0.0 for s in stats]
        x = list(range(len(methods)))
        colors = [METHOD_COLORS.get(m, "#9467bd") for m in methods]
        ax.bar(x, means, yerr=stds if any(stds) else None, capsize=4, color=colors)
        for xi, st, mean, sd in zip(x, stats, means, stds):
            vals = st.get("values") or []
            ax.plot([xi] * len(vals), vals, "k.", markersize=4)
            if st.get("mean") is not None:
                ax.text(xi, mean + sd, f"{mean:.0f}" if key == "mme_total" else f"{mean:.3f}", ha="center",
                        va="bottom", fontsize=8)
        floors = _floors(summary, key)
        for label, value, style in floors:
            ax.axhline(value, color="#444444", linestyle=style, linewidth=1, label=f"{label} {value:.3g}")
        top = max([m + sd for m, sd in zip(means, stds)] + [v for _, v, _ in floors] + [1e-3])
        ax.set_ylim(0, top * 1.25)
        ax.set_xticks(x, [METHOD_LABELS.get(m, m) for m in methods], rotation=15)
        ax.set_title(title, fontsize=10)
        if floors:
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{summary.get('steps')} steps, seeds {summary.get('seeds')}", fontsize=10, y=1.04)
    return _save_png(fig, path)


# ---------------------------------------------------------------------------------------------
# README
# ---------------------------------------------------------------------------------------------
def read_comparison(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"{path}: comparison report not found (run `mrt compare` first)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON (line {exc.lineno} col {exc.colno}: {exc.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("methods"), dict) or not data["methods"]:
        raise ReportError(f"{path}: field 'methods' missing or empty — not a `mrt compare` report")
    for name, m in data["methods"].items():
        for field in ("heldout_mean", "mme_total", "trainable_params", "wall_s"):
            if field not in m:
                raise ReportError(f"{path}: methods.{name}: field '{field}' missing")
    return data


def results_block(comparison: dict[str, Any], ablation_rows: Sequence[dict[str, Any]] | None = None,
                  sources: Sequence[str] = ()) -> str:
    parts = [
        "<!-- written by `mrt report` from " + (", ".join(sources) or "the reports")
        + "; re-run it instead of editing this block -->",
        "",
        comparison_provenance(comparison),
        "",
        comparison_table(comparison),
        "",
        READING_NOTE,
        "",
        f"Per held-out task (mean ± std over seeds; {COLLAPSE_MARK}: answers collapsed to one value; the held-in "
        "tasks are in the comparison Markdown report):",
        "",
        per_task_table(comparison),
    ]
    if ablation_rows:
        parts += ["", "Editor placement ablation (`mrt ablate`, `reports/ablation.md` has every column):", "",
                  ablation_table(ablation_rows, detailed=False)]
        note = ablation_baselines(ablation_rows)
        if note:
            parts += ["", note]
    parts += ["", "What this benchmark must show, checked on the reports above (`components/experiments/bars.py`):", "",
              md_table(["bar", "measured", "met"],
                       bar_rows(comparison, aggregate_arms(ablation_rows) if ablation_rows else None), "lll")]
    return "\n".join(parts)


def write_results(results_path: str | Path, comparison_json: str | Path, ablation_csv: str | Path | None = None,
                  readme_path: str | Path | None = None) -> tuple[str, list[str]]:
    """`mrt report`: the tables built from the comparison report (and the ablation CSV, if given)
    written to `results_path` and, when `readme_path` is given, between its results markers.
    Returns (the block, the reports it was built from). Nothing is written when anything is wrong
    (missing markers, unreadable reports)."""
    if readme_path is not None:
        check_markers(readme_path, RESULTS_START, RESULTS_END)  # before anything is written
    comparison = read_comparison(comparison_json)
    rows = read_ablation_csv(ablation_csv) if ablation_csv is not None else None
    sources = [str(comparison_json)] + ([str(ablation_csv)] if ablation_csv is not None else [])
    block = results_block(comparison, rows, sources)
    write_text(results_path, block + "\n")
    if readme_path is not None:
        replace_marked_block(readme_path, RESULTS_START, RESULTS_END, block)
    return block, sources


