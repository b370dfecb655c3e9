"""What do the MRT editors add to generation latency on a GPU, at LLaVA-1.5-7B shape?

Question: MRT edits only the prompt pass (the KV cache carries the edit to the generated tokens), so
its editors should cost next to nothing at inference; target ≤ 1.02× the base model for a prompt
plus 8 generated tokens. Same model as gpu_train_step.py (7B config, bf16, random weights, eval
mode, SDPA, dynamic KV cache); prompts `BOS USER: <image>×576 instruction ASSISTANT:` of ≤ 96 text
tokens, left-padded; greedy decoding of exactly 8 new tokens. Per arm and round: the first prompt
pass after attaching ("prefill"), a generate() call, a later prompt pass ("prefill_warm") and the 8
decode steps alone ("decode"). Arms run in interleaved rounds, their order rotated each round, so
drift hits every arm alike; medians, and for generate() also the median of per-round ratios to the
base. Latency is host wall-clock after a device synchronize: what a caller waits for.

Arms: base, mrt (the paper's placement); --split: mrt_vision, mrt_lm; --graphs: base_graphed,
mrt_graphed (the prompt pass's vision layers as CUDA graphs); --impl: mrt_reference, mrt_fast
(`train.editors.impl`; skipped with a note where that key does not exist).

Run (GPU):   python benchmarks/gpu_generate.py --rounds 30 --graphs --json out.json
Check (CPU): python benchmarks/gpu_generate.py --smoke
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
for _path in (_HERE, _HERE.parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from gpu_train_step import (
    IMPL_ARMS,
    ArmSkipped,
    _sync,
    build_model,
    environment,
    free_memory,
    n_image_tokens,
    only_groups,
    tiny_config,
    tiny_placement,
    with_overrides,
    write_json,
)

TARGET_MAX_OVERHEAD = 1.02
KINDS = ("prefill", "generate", "prefill_warm", "decode")
SAME_TOKENS = {"base_graphed": "base", "mrt_graphed": "mrt", "mrt_reference": "mrt", "mrt_fast": "mrt"}


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


def editor_arms(placement, split: bool, graphs: bool, impl: bool) -> tuple[dict[str, tuple[Any, bool]], dict[str, str]]:
    """arm → (its placement, whether its vision layers are graphed), and the arms skipped with why."""
    arms: dict[str, tuple[Any, bool]] = {"mrt": (placement, False)}
    skipped: dict[str, str] = {}
    if split:
        arms["mrt_vision"] = (only_groups(placement, {"visual", "projector"}), False)
        arms["mrt_lm"] = (only_groups(placement, {"prefix", "suffix"}), False)
    if graphs:
        arms["base_graphed"] = (only_groups(placement, set()), True)  # no editor: the graphs alone
        arms["mrt_graphed"] = (placement, True)
    if impl:
        for arm, overrides in IMPL_ARMS.items():
            try:
                arms[arm] = (with_overrides(placement, overrides), False)
            except ArmSkipped as exc:
                skipped[arm] = str(exc)
    return arms, skipped


def measure(model, prompts, device, new_tokens: int, rounds: int, warmup: int, arm_setup: dict[str, tuple[Any, bool]]
            ) -> dict[str, Any]:
    """Interleaved rounds of every arm (prefill, generate, warm prefill, decode). One set of editor
    weights serves every MRT arm (the groups an arm has); `base` runs the stock model with no hook."""
    import torch

    from components.editors import attach

    def prefill():
        return model(**prompts, use_cache=True, logits_to_keep=1)

    def generate():
        return model.generate(**prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              use_cache=True, pad_token_id=model.config.text_config.pad_token_id)

    def decode():
        """`new_tokens` greedy decode steps from a prefilled cache, timed alone (ms): the loop
        generate() runs after its prompt pass, without generate()'s own bookkeeping."""
        first = prefill()
        cache, ids, mask = first.past_key_values, first.logits[:, -1:].argmax(-1), prompts["attention_mask"]
        ones = mask.new_ones(mask.shape[0], 1)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            mask = torch.cat([mask, ones], dim=1)
            ids = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        _sync(device)
        return (time.perf_counter() - t0) * 1e3

    editors = attach(model, arm_setup["mrt"][0])
    state = {k: v.clone() for k, v in editors.state_dict().items()}
    editors.detach()
    arms = ("base", *arm_setup)
    times: dict[str, dict[str, list[float]]] = {a: {k: [] for k in KINDS} for a in arms}
    tokens: dict[str, Any] = {}
    edits: dict[str, int] = {}
    graph_stats: dict[str, int] = {}
    with torch.no_grad():
        for i in range(warmup + rounds):
            shift = i % len(arms)  # a bias by position in the round falls on every arm alike
            for arm in arms[shift:] + arms[:shift]:
                editors = None
                if arm != "base":
                    arm_placement, graphed = arm_setup[arm]
                    editors = attach(model, arm_placement)
                    own = editors.state_dict()
                    editors.load_state_dict({k: v for k, v in state.items() if k in own})
                    editors.eval()
                    if graphed:
                        editors.use_cuda_graphs(inference=True)
                try:
                    t_pre, _ = _timed(prefill, device)  # the first pass after attach
                    t_gen, out = _timed(generate, device)
                    t_warm, _ = _timed(prefill, device)  # a later prompt pass: what every further request pays
                    t_dec = decode()
                finally:
                    if editors is not None:
                        if arm == "mrt_graphed":
                            graph_stats = dict(editors.graphs.stats)
                        if arm == "mrt":
                            edits = dict(editors.edit_counts)
                        editors.detach()
                if i >= warmup:
                    for kind, t in zip(KINDS, (t_pre, t_gen, t_warm, t_dec)):
                        times[arm][kind].append(t)
                tokens[arm] = out[:, prompts["input_ids"].shape[1]:].tolist()
    res: dict[str, Any] = {"batch": int(prompts["input_ids"].shape[0]), "seq": int(prompts["input_ids"].shape[1])}
    for arm in arms:
        for kind in KINDS:
            res[f"{arm}_{kind}_ms"] = statistics.median(times[arm][kind])
            res[f"{arm}_{kind}_ms_min"] = min(times[arm][kind])
    for arm in arms[1:]:
        refs = ("base", "base_graphed") if arm == "mrt_graphed" else ("base",)
        for ref in refs:
            for kind in KINDS:
                res[f"{arm}_{kind}_vs_{ref}"] = res[f"{arm}_{kind}_ms"] / res[f"{ref}_{kind}_ms"]
            # each call against the reference call of the same round: drift cancels within a round
            paired = [a / b for a, b in zip(times[arm]["generate"], times[ref]["generate"])]
            res[f"{arm}_generate_vs_{ref}_paired"] = statistics.median(paired)
    for arm, ref in SAME_TOKENS.items():  # the same model computed another way: the same greedy tokens
        if arm in tokens:
            res[f"{arm}_tokens_equal_{ref}"] = tokens[arm] == tokens[ref]
    res["met_generate"] = res["mrt_generate_vs_base"] <= TARGET_MAX_OVERHEAD
    res["new_tokens"] = len(tokens["base"][0])
    res["edit_calls"] = edits  # of the last `mrt` round: prompt passes only
    if graph_stats:
        res["graph_stats_last_round"] = graph_stats
    return res


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        (f"Device: {summary['env'].get('device')}; prompt = {summary['image_tokens']} image + ≤{summary['text_tokens']} "
         f"text tokens, {summary['new_tokens']} new tokens, greedy; median of {summary['rounds']} interleaved rounds."),
        "",
        "| batch | arm | warm prefill ms | ratio | decode ms | ratio | generate ms | ratio | per-round ratio |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["results"]:
        arms = [k[: -len("_decode_ms")] for k in r if k.endswith("_decode_ms")]
        for arm in arms:
            ratio = [r.get(f"{arm}_{k}_vs_base", 1.0) for k in ("prefill_warm", "decode", "generate")]
            paired = r.get(f"{arm}_generate_vs_base_paired")
            lines.append(f"| {r['batch']} | {arm} | {r[f'{arm}_prefill_warm_ms']:.1f} | {ratio[0]:.3f} | "
                         f"{r[f'{arm}_decode_ms']:.1f} | {ratio[1]:.3f} | {r[f'{arm}_generate_ms']:.1f} | {ratio[2]:.3f} | "
                         + (f"{paired:.3f} |" if paired is not None else "– |"))
    for arm, note in summary["skipped"].items():
        lines.append(f"\n{arm}: skipped ({note})")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU (or GPU): a logic check, not a benchmark")
    ap.add_argument("--json", type=Path, default=None, help="write the summary here")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default 1 8 (smoke 1 3)")
    ap.add_argument("--text-tokens", type=int, default=None, help="prompt text length (default 96; smoke 24)")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10; smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 2; smoke 1)")
    ap.add_argument("--split", action="store_true", help="also the vision-side and the LM-side editors alone")
    ap.add_argument("--graphs", action="store_true", help="also the vision layers as CUDA graphs, without and with editors")
    ap.add_argument("--impl", action="store_true", help="also the editors' reference and fast implementations")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv=None) -> dict[str, Any]:
    from components.core.offline import set_offline_env

    set_offline_env()
    args = parse_args(argv)
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
    arm_setup, skipped = editor_arms(placement, args.split, args.graphs, args.impl)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_model(config, device, dtype)
    model.config.use_cache = True
    model.eval()
    summary: dict[str, Any] = {
        "benchmark": "gpu_generate", "command": shlex.join(["python", "benchmarks/gpu_generate.py", *args.argv]),
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "env": environment(device),
        "smoke": args.smoke, "build_s": time.perf_counter() - t0, "image_tokens": n_image_tokens(config),
        "text_tokens": text_tokens, "new_tokens": args.new_tokens, "rounds": rounds, "warmup": warmup,
        "skipped": skipped, "results": [],
    }
    for b in batch_sizes:
        prompts = make_prompts(config, b, text_tokens, device, dtype, seed=b)
        r = measure(model, prompts, device, args.new_tokens, rounds, warmup, arm_setup)
        summary["results"].append(r)
        print(json.dumps(r), flush=True)
        write_json(args.json, summary)
        del prompts
        free_memory(device)
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
