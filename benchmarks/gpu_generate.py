"""Generation latency with and without MRT editors at LLaVA-1.5-7B scale (issue 7).

Why: MRT edits only the prompt pass (the KV cache carries the edit to generated tokens), so its
editors should cost next to nothing at inference — target: at most 2% added latency for a prompt
plus 8 generated tokens (the paper's decoding length). The hooks still run on every decode step
(to see that it is one and step aside), so both the prompt pass alone ("prefill") and the whole
generate() call are timed.

Same model as `gpu_train_step.py` (7B config in bf16, built and initialised on the device, eval
mode, SDPA attention, dynamic KV cache), prompts `BOS USER: <image>×576 instruction ASSISTANT:`
of ~96 text tokens, left-padded with varying lengths when batched. Greedy decoding with exactly
8 new tokens (min_new_tokens = max_new_tokens = 8). Base and MRT are timed in interleaved
rounds (base, mrt, base, mrt, …) so that clock drift hits both alike; medians are reported.
Latency is host wall-clock after a device synchronize: it is what a caller waits for.

Run (GPU):   python benchmarks/gpu_generate.py --json out.json --markdown out.md
Check (CPU): python benchmarks/gpu_generate.py --smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
sys.path.insert(0, str(_HERE.parent))

from gpu_train_step import (  # noqa: E402
    _sync,
    export_trace,
    profile_steps,
    load_editors_package,
    _write_json,
    build_model,
    environment,
    free_memory,
    only_groups,
    n_image_tokens,
    tiny_config,
    tiny_placement,
)

TARGET_MAX_OVERHEAD = 1.02


def make_prompts(config, batch: int, text_tokens: int, device, dtype, seed: int = 0) -> dict[str, Any]:
    """Left-padded prompts (text lengths text_tokens, −4, −8, −12, …) and their images."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n_img = n_image_tokens(config)
    image_id = config.image_token_id
    pad = config.text_config.pad_token_id if config.text_config.pad_token_id is not None else 0
    vocab_hi = min(image_id, config.text_config.vocab_size, pad if pad > 2 else config.text_config.vocab_size)
    seq = n_img + text_tokens
    ids = torch.full((batch, seq), pad, dtype=torch.long)
    mask = torch.zeros((batch, seq), dtype=torch.long)
    for i in range(batch):
        text_len = max(12, text_tokens - 4 * (i % 4))
        words = torch.randint(3, vocab_hi, (text_len - 1,), generator=g)
        row = torch.cat([torch.tensor([1]), words[:3], torch.full((n_img,), image_id), words[3:]])
        ids[i, seq - row.numel():] = row
        mask[i, seq - row.numel():] = 1
    size = config.vision_config.image_size
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "pixel_values": torch.randn((batch, 3, size, size), generator=g).to(device=device, dtype=dtype),
    }


def _timed(fn, device) -> tuple[float, Any]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3, out


def measure(model, prompts, device, new_tokens: int, rounds: int, warmup: int, placement,
            baseline_attach=None, profile_dir: Path | None = None, split: bool = False,
            compare_kernels: bool = False, profile_prefill_dir: Path | None = None,
            graphs: bool = False) -> dict[str, Any]:
    """Interleaved base/MRT rounds of (prefill, generate, warm prefill, decode), the arms' order
    rotated from round to round — and MRT with the
    baseline editors (`mrt_before`) when `baseline_attach` is given, MRT with the fused kernels
    (`mrt_kernels`) when `compare_kernels`, and with `graphs` the vision layers as CUDA graphs
    without editors (`base_graphed`) and with them (`mrt_graphed`; components/editors/graphs.py,
    captured in each round's first prompt pass). Returns medians and the ratios."""
    import os

    import torch

    from components.editors import attach

    def prefill():
        return model(**prompts, use_cache=True, logits_to_keep=1)

    def generate():
        return model.generate(
            **prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            use_cache=True, pad_token_id=model.config.text_config.pad_token_id,
        )

    def decode():
        """`new_tokens` greedy decode steps from a prefilled cache, timed alone (ms): the loop
        generate() runs after its prompt pass, without generate()'s own bookkeeping."""
        first = prefill()
        cache = first.past_key_values
        ids = first.logits[:, -1:].argmax(-1)
        mask = prompts["attention_mask"]
        ones = mask.new_ones(mask.shape[0], 1)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            mask = torch.cat([mask, ones], dim=1)
            out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            ids = out.logits[:, -1:].argmax(-1)
        _sync(device)
        return (time.perf_counter() - t0) * 1e3

    # One set of editor weights, hooked in for the MRT rounds only (attach/detach are hooks, not
    # weights); the base rounds run the stock model with no hook at all.
    editors = attach(model, placement)
    state = {k: v.clone() for k, v in editors.state_dict().items()}
    editors.detach()
    # arm → (attach, placement, MRT_FUSED_KERNELS for the arm: None = as the process has it)
    kernels_env = os.environ.get("MRT_FUSED_KERNELS")
    plain = "0" if compare_kernels else None
    arm_setup = {"mrt": (attach, placement, plain)}
    if compare_kernels:  # the same editors with the fused kernels, in the same rounds
        arm_setup["mrt_kernels"] = (attach, placement, "1")
    if baseline_attach is not None:  # the earlier editors as the process runs them (kernels on by default)
        arm_setup["mrt_before"] = (baseline_attach, placement, None)
    if split:  # cost decomposition: vision-side editors only, LM editors only
        arm_setup["mrt_vision"] = (attach, only_groups(placement, {"visual", "projector"}), None)
        arm_setup["mrt_lm"] = (attach, only_groups(placement, {"prefix", "suffix"}), None)
    if graphs:
        arm_setup["mrt_graphed"] = (attach, placement, None)
    arms = ("base", *(("base_graphed",) if graphs else ()), *arm_setup)
    kinds = ("prefill", "generate", "prefill_warm", "decode")
    times: dict[str, dict[str, list[float]]] = {a: {k: [] for k in kinds} for a in arms}
    tokens: dict[str, Any] = {}
    edits: dict[str, int] = {}
    graph_stats: dict[str, int] = {}
    with torch.no_grad():
        for i in range(warmup + rounds):
            # each round starts at the next arm: a bias by position in the round (clocks, allocator and
            # cache state after the previous arm) falls on every arm alike; pairs stay within a round
            shift = i % len(arms)
            for arm in arms[shift:] + arms[:shift]:
                plain_graphs = None
                if arm == "base_graphed":
                    from components.editors.graphs import LayerGraphs
                    from components.editors.sites import llava_modules

                    plain_graphs = LayerGraphs(llava_modules(model)[1], inference=True).install()
                if arm in arm_setup:
                    attach_fn, arm_placement, arm_kernels = arm_setup[arm]
                    if arm_kernels is not None:
                        os.environ["MRT_FUSED_KERNELS"] = arm_kernels
                    editors = attach_fn(model, arm_placement)
                    own = editors.state_dict()
                    editors.load_state_dict({k: v for k, v in state.items() if k in own})
                    editors.eval()
                    if arm == "mrt_graphed":
                        editors.use_cuda_graphs(inference=True)
                try:
                    t_pre, _ = _timed(prefill, device)  # the first pass after attach (MRT: builds its stacks)
                    t_gen, out = _timed(generate, device)
                    t_warm, _ = _timed(prefill, device)  # a later prompt pass: what every further request pays
                    t_dec = decode()
                finally:
                    if kernels_env is None:
                        os.environ.pop("MRT_FUSED_KERNELS", None)
                    else:
                        os.environ["MRT_FUSED_KERNELS"] = kernels_env
                    if plain_graphs is not None:
                        plain_graphs.remove()
                    if arm in arm_setup:
                        if arm == "mrt_graphed":
                            graph_stats = dict(editors.graphs.stats)
                        editors.detach()
                        if arm == "mrt":
                            edits = dict(editors.edit_counts)  # one round: 2 prefills + generate
                if i >= warmup:
                    times[arm]["prefill"].append(t_pre)
                    times[arm]["generate"].append(t_gen)
                    times[arm]["prefill_warm"].append(t_warm)
                    times[arm]["decode"].append(t_dec)
                tokens[arm] = out[:, prompts["input_ids"].shape[1]:].tolist()
    res: dict[str, Any] = {"batch": int(prompts["input_ids"].shape[0]), "seq": int(prompts["input_ids"].shape[1])}
    for arm in arms:
        for kind in kinds:
            res[f"{arm}_{kind}_ms"] = statistics.median(times[arm][kind])
            res[f"{arm}_{kind}_ms_min"] = min(times[arm][kind])
    res["prefill_ratio"] = res["mrt_prefill_ms"] / res["base_prefill_ms"]
    res["prefill_warm_ratio"] = res["mrt_prefill_warm_ms"] / res["base_prefill_warm_ms"]
    res["decode_ratio"] = res["mrt_decode_ms"] / res["base_decode_ms"]
    for arm in ("mrt_vision", "mrt_lm", "mrt_kernels"):
        if arm in arm_setup:
            res[f"{arm}_generate_ratio"] = res[f"{arm}_generate_ms"] / res["base_generate_ms"]
            res[f"{arm}_prefill_warm_ratio"] = res[f"{arm}_prefill_warm_ms"] / res["base_prefill_warm_ms"]
            res[f"{arm}_decode_ratio"] = res[f"{arm}_decode_ms"] / res["base_decode_ms"]
    res["generate_ratio"] = res["mrt_generate_ms"] / res["base_generate_ms"]
    if graphs:  # against the stock base, and against the base with the same graphs (the editors' own cost)
        for ref in ("base", "base_graphed"):
            for kind in ("generate", "prefill_warm"):
                res[f"mrt_graphed_{kind}_vs_{ref}"] = res[f"mrt_graphed_{kind}_ms"] / res[f"{ref}_{kind}_ms"]
            paired = [m / b for m, b in zip(times["mrt_graphed"]["generate"], times[ref]["generate"])]
            res[f"mrt_graphed_generate_vs_{ref}_paired"] = statistics.median(paired)
        res["base_graphed_generate_vs_base"] = res["base_graphed_generate_ms"] / res["base_generate_ms"]
        res["graphed_tokens_equal"] = tokens["mrt_graphed"] == tokens["mrt"]
        res["graph_stats_last_round"] = graph_stats
    # Per-round ratios (each MRT call against the base call just before it): slow clock or load
    # drift cancels within a round, so their median is steadier than the ratio of medians.
    for arm in ("mrt", "mrt_kernels"):
        if arm not in arms:
            continue
        paired = [m / b for m, b in zip(times[arm]["generate"], times["base"]["generate"])]
        key = "generate_ratio_paired" if arm == "mrt" else f"{arm}_generate_ratio_paired"
        res[key] = statistics.median(paired)
        res[f"{key}_iqr"] = [statistics.quantiles(paired, n=4)[0], statistics.quantiles(paired, n=4)[2]] \
            if len(paired) >= 2 else [paired[0], paired[0]]
    if "mrt_kernels" in arms:
        res["kernels_tokens_equal"] = tokens["mrt_kernels"] == tokens["mrt"]
    if "mrt_before" in arm_setup:
        res["before_prefill_ratio"] = res["mrt_before_prefill_ms"] / res["base_prefill_ms"]
        res["before_generate_ratio"] = res["mrt_before_generate_ms"] / res["base_generate_ms"]
        res["before_tokens_equal"] = tokens["mrt_before"] == tokens["mrt"]  # same editors, same answers (b1)
    res["met_generate"] = res["generate_ratio"] <= TARGET_MAX_OVERHEAD
    res["new_tokens"] = len(tokens["base"][0])
    res["outputs_differ"] = tokens["base"] != tokens["mrt"]  # random editors should change something
    res["edit_calls"] = edits
    if profile_dir is not None:
        res["profile"] = profile_generate(model, generate, device, placement, state, profile_dir, res["batch"])
    if profile_prefill_dir is not None:
        res["profile_prefill"] = profile_prefill(model, prompts, device, placement, state, profile_prefill_dir,
                                                 res["batch"])
    return res


def profile_generate(model, generate, device, placement, state, out_dir: Path, batch: int) -> dict[str, Any]:
    """One profiled generate() call without and with editors (tables + Chrome traces in `out_dir`):
    host↔device syncs, kernel launches and device busy time per call, to tell host-bound overhead
    from GPU work."""
    import torch

    from components.editors import attach

    out: dict[str, Any] = {}
    with torch.no_grad():
        for arm in ("base", "mrt"):
            editors = None
            if arm == "mrt":
                editors = attach(model, placement)
                editors.load_state_dict(state)
                editors.eval()
                generate()  # the warm state the timed rounds measure (stacks built by the first pass)
            try:
                prof = profile_steps(generate, device, 1, out_dir, f"gen_{arm}_b{batch}")
                export_trace(generate, device, out_dir / f"trace_gen_{arm}_b{batch}.json.gz")
            finally:
                if editors is not None:
                    editors.detach()
            out[arm] = {k: prof[k] for k in ("wall_ms_per_step", "device_busy_ms_per_step", "kernel_launches_per_step",
                                             "syncs_per_step")}
            out[arm]["top_host_ops_us"] = sorted(prof["per_op_host_us"].items(), key=lambda kv: -kv[1])[:25]
    return out


def profile_prefill(model, prompts, device, placement, state, out_dir: Path, batch: int) -> dict[str, Any]:
    """The warm prompt pass of base, MRT (operator path) and MRT with the fused kernels: a Chrome
    trace and op tables each, plus host time to return vs. wall time over 10 unprofiled calls (a
    pass whose host time is close to its wall time is bound by the host)."""
    import os

    import torch

    from components.editors import attach

    def prefill():
        return model(**prompts, use_cache=True, logits_to_keep=1)

    out: dict[str, Any] = {}
    saved = os.environ.get("MRT_FUSED_KERNELS")
    with torch.no_grad():
        for arm, flag in (("base", None), ("mrt", "0"), ("mrt_kernels", "1")):
            editors = None
            if flag is not None:
                os.environ["MRT_FUSED_KERNELS"] = flag
                editors = attach(model, placement)
                editors.load_state_dict(state)
                editors.eval()
            try:
                for _ in range(3):
                    prefill()
                host, wall = [], []
                for _ in range(10):
                    _sync(device)
                    t0 = time.perf_counter()
                    prefill()
                    t1 = time.perf_counter()
                    _sync(device)
                    host.append((t1 - t0) * 1e3)
                    wall.append((time.perf_counter() - t0) * 1e3)
                prof = profile_steps(prefill, device, 3, out_dir, f"prefill_{arm}_b{batch}")
                export_trace(prefill, device, out_dir / f"trace_prefill_{arm}_b{batch}.json.gz")
            finally:
                if editors is not None:
                    editors.detach()
                if saved is None:
                    os.environ.pop("MRT_FUSED_KERNELS", None)
                else:
                    os.environ["MRT_FUSED_KERNELS"] = saved
            out[arm] = {k: prof[k] for k in ("wall_ms_per_step", "device_busy_ms_per_step", "kernel_launches_per_step",
                                             "syncs_per_step")}
            out[arm]["host_return_ms"] = statistics.median(host)
            out[arm]["wall_ms"] = statistics.median(wall)
            out[arm]["top_host_ops_us"] = sorted(prof["per_op_host_us"].items(), key=lambda kv: -kv[1])[:30]
    return out


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        *([f"Baseline editors (mrt_before): generate ratio "
           + ", ".join(f"b{r['batch']} {r['before_generate_ratio']:.3f}" for r in summary["results"]), ""]
          if summary["results"] and "before_generate_ratio" in summary["results"][0] else []),
        f"Device: {summary['env'].get('device')}; prompt = {summary['image_tokens']} image + ≤{summary['text_tokens']} "
        f"text tokens, {summary['new_tokens']} new tokens, greedy; median of {summary['rounds']} interleaved rounds.",
        "",
        "| batch | prefill base ms | prefill MRT ms | ratio | generate base ms | generate MRT ms | ratio | ≤1.02 |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in summary["results"]:
        lines.append(
            f"| {r['batch']} | {r['base_prefill_ms']:.1f} | {r['mrt_prefill_ms']:.1f} | {r['prefill_ratio']:.3f} | "
            f"{r['base_generate_ms']:.1f} | {r['mrt_generate_ms']:.1f} | {r['generate_ratio']:.3f} | "
            f"{'yes' if r['met_generate'] else 'no'} |"
        )
    lines += ["", "| batch | arm | warm prefill ms | ratio | 8 decode steps ms | ratio | generate ms | ratio |",
              "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in summary["results"]:
        for arm in ("base", "mrt", "mrt_kernels", "mrt_before", "mrt_vision", "mrt_lm", "base_graphed", "mrt_graphed"):
            if f"{arm}_decode_ms" not in r:
                continue
            ratios = [r[f"{arm}_{k}_ms"] / r[f"base_{k}_ms"] for k in ("prefill_warm", "decode", "generate")]
            lines.append(
                f"| {r['batch']} | {arm} | {r[f'{arm}_prefill_warm_ms']:.1f} | {ratios[0]:.3f} | "
                f"{r[f'{arm}_decode_ms']:.1f} | {ratios[1]:.3f} | {r[f'{arm}_generate_ms']:.1f} | {ratios[2]:.3f} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU (or GPU): a logic check, not a benchmark")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=None)
    ap.add_argument("--text-tokens", type=int, default=None, help="prompt text length (default 96; smoke 24)")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--label", default="")
    ap.add_argument("--baseline-editors", type=Path, default=None,
                    help="a copy of an earlier components/editors, timed as a third arm (mrt_before)")
    ap.add_argument("--operator-path", action="store_true",
                    help="MRT_FUSED_KERNELS=0: the editors without their Triton inference kernels (kernels.py)")
    ap.add_argument("--compare-kernels", action="store_true",
                    help="also time MRT with the fused kernels (mrt_kernels) against the operator path, same rounds")
    ap.add_argument("--split", action="store_true",
                    help="also time the vision-side editors alone and the LM editors alone (mrt_vision, mrt_lm)")
    ap.add_argument("--graphs", action="store_true",
                    help="also time the vision layers as CUDA graphs without and with editors (base_graphed, mrt_graphed)")
    ap.add_argument("--profile-prefill", type=Path, default=None,
                    help="folder for traces and op tables of the warm prompt pass: base, MRT, MRT with kernels")
    ap.add_argument("--profile", type=Path, default=None,
                    help="folder for a profiled generate() call without and with editors (tables and traces)")
    return ap.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    from components.core.offline import set_offline_env

    set_offline_env()
    args = parse_args(argv)
    if args.operator_path:
        import os

        os.environ["MRT_FUSED_KERNELS"] = "0"
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("gpu_generate.py: no CUDA device; use --smoke for a CPU logic check")
    if args.smoke:
        config, placement = tiny_config(), tiny_placement()
        batch_sizes, text_tokens = args.batch_sizes or [1, 3], args.text_tokens or 24
        rounds, warmup = args.rounds or 2, args.warmup if args.warmup is not None else 1
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        from components.editors import llava_7b_config, paper_placement_7b

        config, placement = llava_7b_config(), paper_placement_7b()
        batch_sizes, text_tokens = args.batch_sizes or [1, 8], args.text_tokens or 96
        rounds, warmup = args.rounds or 10, args.warmup if args.warmup is not None else 2
        dtype = torch.bfloat16
    baseline = load_editors_package(args.baseline_editors).attach if args.baseline_editors else None
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_model(config, device, dtype)
    model.config.use_cache = True
    model.eval()
    summary: dict[str, Any] = {
        "label": args.label,
        "env": environment(device),
        "smoke": args.smoke,
        "build_s": time.perf_counter() - t0,
        "image_tokens": n_image_tokens(config),
        "text_tokens": text_tokens,
        "new_tokens": args.new_tokens,
        "rounds": rounds,
        "warmup": warmup,
        "results": [],
    }
    for b in batch_sizes:
        prompts = make_prompts(config, b, text_tokens, device, dtype, seed=b)
        r = measure(model, prompts, device, args.new_tokens, rounds, warmup, placement, baseline, args.profile,
                    args.split, args.compare_kernels, args.profile_prefill, graphs=args.graphs)
        summary["results"].append(r)
        print(json.dumps(r), flush=True)
        if args.json:
            _write_json(args.json, summary)
        del prompts
        free_memory(device)
    if args.json:
        _write_json(args.json, summary)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(summary))
    print(markdown(summary))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
