"""What the embedded benchmark must show before its numbers mean anything, checked on the reports.

Each bar is a threshold on the comparison report (and the ablation CSV): MRT must do the trained
tasks on new images, transfer to held-out tasks beyond what priors fake, answer MME-format pairs
that a constant answer cannot, keep up with LoRA and full fine-tuning, and the placement ablation
must separate its arms from seed noise. `mrt report` writes the table into the results block, so
whether a bar is met is computed, never typed.
"""

from __future__ import annotations

from typing import Any, Sequence

HELDIN_MIN = 0.85  # MRT held-in accuracy (the training task types on unseen images)
HELDOUT_CC_MIN = 0.40  # MRT held-out chance-corrected mean
MME_ACC_PLUS_MIN = 40.0  # MRT mean acc+ over the MME subtasks, in %
MME_TOTAL_FACTOR = 1.5  # MRT MME total over the constant answer's
FULL_SHARE_MIN = 0.95  # MRT held-out over full fine-tuning's
SEPARATION_SDS = 2.0  # an ablation group arm is apart from `all` when |Δ| exceeds this many seed SDs


def separation(arm: dict[str, Any], ref: dict[str, Any], key: str = "heldout_mean") -> dict[str, Any] | None:
    """Δ of an ablation arm's mean against the reference arm's, the 2-SD threshold (the larger of the
    two seed SDs) and whether |Δ| exceeds it; None unless both ran at least two seeds."""
    a, r = arm.get(key) or {}, ref.get(key) or {}
    if len(a.get("values") or []) < 2 or len(r.get("values") or []) < 2:
        return None
    delta = a["mean"] - r["mean"]
    threshold = SEPARATION_SDS * max(a["std"], r["std"])
    return {"delta": delta, "threshold": threshold, "apart": abs(delta) > threshold}


def _stat(m: dict[str, Any] | None, key: str) -> tuple[float | None, float | None, int]:
    s = (m or {}).get(key) or {}
    return s.get("mean"), s.get("std"), len(s.get("values") or [])


def _pm(mean: float | None, std: float | None, n: int, digits: int = 3) -> str:
    if mean is None:
        return "not measured"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 and std is not None else "")


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("yes" if ok else "no")


def bar_rows(comparison: dict[str, Any], ablation_aggs: Sequence[dict[str, Any]] | None = None) -> list[list[str]]:
    """[bar, measured, met] rows from the comparison report and the aggregated ablation arms."""
    methods = comparison.get("methods") or {}
    mrt, lora, full = methods.get("mrt"), methods.get("lora"), methods.get("full")
    rows: list[list[str]] = []

    m, s, n = _stat(mrt, "heldin_mean")
    rows.append([f"held-in accuracy of MRT ≥ {HELDIN_MIN}", _pm(m, s, n), _verdict(None if m is None else m >= HELDIN_MIN)])

    m, s, n = _stat(mrt, "heldout_chance_corrected_mean")
    rows.append([f"held-out chance-corrected mean of MRT ≥ {HELDOUT_CC_MIN:.2f}", _pm(m, s, n),
                 _verdict(None if m is None else m >= HELDOUT_CC_MIN)])

    collapsed = sorted(((mrt or {}).get("collapsed") or {}).get("heldout") or {})
    tasks = len((mrt or {}).get("per_task") or {})
    rows.append(["no held-out task collapsed to one answer (MRT, any seed)",
                 f"{len(collapsed)} of {tasks}" + (f" ({', '.join(collapsed)})" if collapsed else ""),
                 _verdict(None if mrt is None else not collapsed)])

    acc_plus, acc_plus_sd, n_ap = _stat(mrt, "mme_acc_plus_mean")
    total, total_sd, n_t = _stat(mrt, "mme_total")
    constant = ((comparison.get("baselines") or {}).get("mme") or {}).get("majority_total")
    need = None if constant is None else MME_TOTAL_FACTOR * constant
    ok = None if acc_plus is None or total is None or need is None else (acc_plus >= MME_ACC_PLUS_MIN and total >= need)
    rows.append([f"MME-format: MRT mean acc+ ≥ {MME_ACC_PLUS_MIN:.0f} and total ≥ {MME_TOTAL_FACTOR} × the constant "
                 f"answer's ({'—' if need is None else f'{need:.1f}'})",
                 f"acc+ {_pm(acc_plus, acc_plus_sd, n_ap, 1)}, total {_pm(total, total_sd, n_t, 1)}", _verdict(ok)])

    m, _, _ = _stat(mrt, "heldout_mean")
    f, _, _ = _stat(full, "heldout_mean")
    ratio = None if m is None or not f else m / f
    rows.append([f"MRT ≥ {FULL_SHARE_MIN:.0%} of full fine-tuning on held-out",
                 "not measured" if ratio is None else f"{m:.3f} / {f:.3f} = {ratio:.2f}",
                 _verdict(None if ratio is None else ratio >= FULL_SHARE_MIN)])

    lo, _, _ = _stat(lora, "heldout_mean")
    p_mrt, p_lora = (mrt or {}).get("trainable_params"), (lora or {}).get("trainable_params")
    ok = None if m is None or lo is None or p_mrt is None or p_lora is None else (m >= lo and p_mrt < p_lora)
    rows.append(["MRT ≥ LoRA on held-out, with fewer trainable parameters",
                 "not measured" if ok is None else f"{m:.3f} {'≥' if m >= lo else '<'} {lo:.3f}; "
                 f"{p_mrt:,} {'<' if p_mrt < p_lora else '≥'} {p_lora:,} parameters", _verdict(ok)])

    ref = next((a for a in ablation_aggs or () if a.get("arm") == "all"), None)
    groups = [a for a in ablation_aggs or () if ref is not None and a.get("family") in ("only", "leave-one-out")]

    def apart_on(key: str) -> tuple[list[str], int]:
        measured = [(a["arm"], sep) for a in groups if (sep := separation(a, ref, key)) is not None]
        return [name for name, sep in measured if sep["apart"]], len(measured)

    apart, n = apart_on("heldout_mean")
    apart_in, n_in = apart_on("heldin_mean")
    said = (f"held-out: {len(apart)} of {n} arms apart" + (f" ({', '.join(apart)})" if apart else "")
            + (f"; held-in: {len(apart_in)} of {n_in}" + (f" ({', '.join(apart_in)})" if apart_in else "")
               if n_in else ""))
    rows.append([f"ablation group arms (only-*, no-*) apart from `all` on held-out by more than "
                 f"{SEPARATION_SDS:.0f} seed SDs where they differ",
                 "not measured (group arms ran one seed)" if not n else said, _verdict(None if not n else bool(apart))])
    return rows
