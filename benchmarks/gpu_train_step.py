"""What does an MRT training step cost on a GPU, at LLaVA-1.5-7B shape?

Question: step time, throughput and peak memory of MRT against the **floor** (the frozen model run
forward and backward to its pixel inputs, no trainable weights: the least any method whose editors
start at the second vision layer can pay), against peft's LoRA r128 on the LM's linear layers, and
against full fine-tuning of the LM and projector. The model is `llava_7b_config()` (CLIP
ViT-L/14-336 + Llama-7B) in bf16, built on the device with random weights (speed does not depend on
the values); the batch is `BOS USER: <image>×576 instruction ASSISTANT: answer EOS`, right-padded
text ≤ 128 tokens, answer-only labels. No gradient checkpointing anywhere.

Arms (one model; each arm starts from freed memory and reset peak statistics; `--cycles N` runs them
N times in turn so that drift hits every arm alike):
  floor, mrt (the paper's placement), lora (r128, bf16 adapters), lora_fp32 (peft's default fp32
  adapters), full; mrt_vision / mrt_lm (only the vision-side or LM-side editors);
  floor_graphed / mrt_graphed (the vision layers as CUDA graphs, `train.cuda_graphs`);
  mrt_reference / mrt_fast (`train.editors.impl`; skipped with a note where that key does not exist).
Two more questions, each its own mode:
  --loop: `mrt train`'s own loop (row encoding, JPEG decoding and preprocessing, accelerate, AdamW,
          checkpoint, quick held-out check) against the model-only MRT step, tokens/s each;
  --ddp:  1 against N processes under `accelerate launch` through the real CLI (`mrt data/align/train`):
          the same editors (losses, weights, held-out accuracy within tolerances) and the speed-up.

Run (GPU):  python benchmarks/gpu_train_step.py --cycles 3 --json out.json
            python benchmarks/gpu_train_step.py --loop --json loop.json
            python benchmarks/gpu_train_step.py --ddp --work /tmp/ddp --json ddp.json    (2 GPUs)
Check (CPU): the same with --smoke (tiny model; --ddp --smoke: 2 gloo processes).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run from anywhere: the repository root (parent of benchmarks/) must be importable, and tests/ for
# the llava-hf processor layout that --loop uses.
_ROOT = Path(__file__).resolve().parents[1]
for _path in (_ROOT, _ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

ARMS = ("floor", "mrt", "lora", "lora_fp32", "full")
EXTRA_ARMS = ("mrt_vision", "mrt_lm", "floor_graphed", "mrt_graphed", "mrt_reference", "mrt_fast")
# Implementation arms: overrides of EditorParams (train.editors); an arm whose key this version's
# EditorParams lacks is reported as skipped.
IMPL_ARMS = {"mrt_reference": {"impl": "reference"}, "mrt_fast": {"impl": "fast"}}
LORA_TARGETS = r".*language_model.*\.(q|k|v|o|gate|up|down)_proj"
ANSWER_TOKENS = 32  # supervised tokens at the end of each text (LLaVA-style short answers)
TARGETS = {"mrt_step_vs_floor_max": 1.03, "mrt_throughput_vs_lora_fp32_min": 1.45, "mrt_peak_vs_floor_max": 1.02}


# ---------------------------------------------------------------------------------------------
# model and data
# ---------------------------------------------------------------------------------------------
def tiny_config():
    """A LLaVA small enough for a CPU logic check, with the 7B config's structure."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
        image_size=56, patch_size=14, projection_dim=32, hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=256, vocab_size=512, max_position_embeddings=512, pad_token_id=501,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_token_id=500, image_seq_length=16,
        tie_word_embeddings=False,
    )


def tiny_placement():
    """The paper's placement scaled to `tiny_config()` (visual layers 1..n−2, all LM layers)."""
    from components.core.config import EditorParams

    return EditorParams.model_validate(
        {
            "visual": {"layers": "1-2", "rank": 6},
            "projector": {"enabled": True, "rank": 6},
            "prefix": {"layers": "all", "rank": 4, "length": 4},
            "suffix": {"layers": "all", "rank": 4, "length": 4},
        }
    )


def n_image_tokens(config) -> int:
    v = config.vision_config
    return (v.image_size // v.patch_size) ** 2


def init_weights_(model, std: float = 0.02) -> None:
    """Write every parameter in place on its device: matrices N(0, std), vectors of norms 1,
    biases 0. Speed does not depend on the values; finite, moderate values keep bf16 from
    overflowing (so the loss is a real number and NaN checks mean something)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def build_model(config, device, dtype):
    """LlavaForConditionalGeneration in `dtype`, allocated on `device` and initialised there."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    init_weights_(model)
    model.config.use_cache = False
    return model


def make_batch(config, batch: int, text_tokens: int, device, dtype, seed: int = 0, answer_tokens: int = ANSWER_TOKENS):
    """One LLaVA-1.5-style training batch: `BOS USER: <image>×576 \\n instruction ASSISTANT: answer EOS`.

    Text lengths vary across the batch (text_tokens, −4, −8, −12, …) and are right-padded to
    `text_tokens`, so padding and per-sample positions are exercised; labels are the answer
    tokens only (prompt and padding −100).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    n_img = n_image_tokens(config)
    image_id = config.image_token_id
    text_cfg = config.text_config
    pad = text_cfg.pad_token_id if text_cfg.pad_token_id is not None else 0
    vocab_hi = min(image_id, text_cfg.vocab_size, pad if pad > 2 else text_cfg.vocab_size)
    seq = n_img + text_tokens
    answer_tokens = min(answer_tokens, max(1, text_tokens // 4))
    ids = torch.full((batch, seq), pad, dtype=torch.long)
    mask = torch.zeros((batch, seq), dtype=torch.long)
    labels = torch.full((batch, seq), -100, dtype=torch.long)
    for i in range(batch):
        text_len = max(answer_tokens + 8, text_tokens - 4 * (i % 4))
        words = torch.randint(3, vocab_hi, (text_len - 2,), generator=g)
        # BOS + 3 "USER:" tokens before the image, the rest after it; EOS closes the answer.
        row = torch.cat([torch.tensor([1]), words[:3], torch.full((n_img,), image_id), words[3:], torch.tensor([2])])
        ids[i, : row.numel()] = row
        mask[i, : row.numel()] = 1
        labels[i, row.numel() - answer_tokens : row.numel()] = row[-answer_tokens:]
    size = config.vision_config.image_size
    pixels = torch.randn((batch, 3, size, size), generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
        "pixel_values": pixels.to(device=device, dtype=dtype),
    }


# ---------------------------------------------------------------------------------------------
# the arms: each returns (step function, trainable parameter count, cleanup)
# ---------------------------------------------------------------------------------------------
class ArmSkipped(Exception):
    """The arm cannot run in this version of the code (its reason is recorded as the arm's note)."""


def _optimizer(params, lr: float, device):
    import torch

    fused = getattr(device, "type", str(device)) == "cuda"
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=fused)


def _trainer_step(model, batch, params, opt) -> Callable[[], Any]:
    import torch

    def step():
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def setup_floor(model, batch, device, placement):
    model.requires_grad_(False)

    def step():
        inputs = dict(batch)
        inputs["pixel_values"] = batch["pixel_values"].detach().requires_grad_(True)
        loss = model(**inputs).loss
        loss.backward()
        if inputs["pixel_values"].grad is None:
            raise RuntimeError("floor arm: no gradient reached pixel_values")
        return loss.detach()

    return step, 0, lambda: None


def setup_mrt(model, batch, device, placement, graphs: bool = False):
    """The editors of `placement` attached by hooks, AdamW + clip 1.0; `graphs`: the vision layers,
    editors included, replayed as CUDA graphs (`MRTEditors.use_cuda_graphs`, `train.cuda_graphs`)."""
    from components.editors import attach

    editors = attach(model, placement)
    if graphs:
        editors.use_cuda_graphs()
    params = [p for p in editors.parameters() if p.requires_grad]
    opt = _optimizer(params, 6e-4, device)

    def cleanup():
        editors.detach()
        for p in params:
            p.grad = None

    return _trainer_step(model, batch, params, opt), sum(p.numel() for p in params), cleanup


def setup_lora(model, batch, device, placement, r: int = 128, fp32_adapters: bool = False):
    """LLaVA-1.5's LoRA recipe on the LM (r 128, alpha 256, dropout 0.05). By default the adapters
    stay in the model's bf16: the fastest LoRA, so the strongest baseline. `fp32_adapters` is peft's
    own default (autocast_adapter_dtype=True): each LoRA branch runs in fp32 (arm `lora_fp32`)."""
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=LORA_TARGETS, bias="none")
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=fp32_adapters)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = _optimizer(params, 2e-4, device)

    def cleanup():
        for p in params:
            p.grad = None
        peft_model.unload()  # puts the original Linear modules back into `model`
        model.requires_grad_(False)

    return _trainer_step(peft_model, batch, params, opt), sum(p.numel() for p in params), cleanup


def setup_full(model, batch, device, placement):
    """LM (embeddings, decoder, lm_head) + projector trainable, vision tower frozen; AdamW keeps its
    state in the parameters' bf16 (the leanest full fine-tune)."""
    model.requires_grad_(False)
    core = model.model
    for module in (core.language_model, core.multi_modal_projector, model.lm_head):
        module.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(params, 2e-5, device)

    def cleanup():
        for p in params:
            p.grad = None
        opt.state.clear()
        model.requires_grad_(False)

    return _trainer_step(model, batch, params, opt), sum(p.numel() for p in params), cleanup


def only_groups(placement, keep: set[str]):
    """The placement with every editor group outside `keep` switched off (cost decomposition)."""
    data = placement.model_dump()
    for group in ("visual", "prefix", "suffix"):
        if group not in keep:
            data[group]["layers"] = "none"
    if "projector" not in keep:
        data["projector"]["enabled"] = False
    return type(placement).model_validate(data)


def with_overrides(placement, overrides: dict[str, Any]):
    """The placement with EditorParams `overrides` applied; ArmSkipped when this version's
    EditorParams does not take one of the keys."""
    from pydantic import ValidationError

    try:
        return type(placement).model_validate({**placement.model_dump(), **overrides})
    except ValidationError as exc:
        raise ArmSkipped(f"EditorParams does not take {sorted(overrides)}: {exc.errors()[0]['msg']}") from None


def setup_floor_graphed(model, batch, device, placement):
    """The floor with its vision layers replayed as CUDA graphs (an editor set with every group off,
    graphed): against it, `mrt_graphed` is the editors' own cost in a graphed tower."""
    from components.editors import attach

    step, n, _ = setup_floor(model, batch, device, placement)
    graphed = attach(model, only_groups(placement, set()))
    graphed.use_cuda_graphs()
    return step, n, graphed.detach


def setup_mrt_graphed(model, batch, device, placement):
    if getattr(device, "type", str(device)) != "cuda":
        raise SystemExit("arm mrt_graphed needs a CUDA device")
    return setup_mrt(model, batch, device, placement, graphs=True)


SETUP: dict[str, Callable] = {
    "floor": setup_floor,
    "mrt": setup_mrt,
    "lora": setup_lora,
    "lora_fp32": lambda m, b, d, p, r=128: setup_lora(m, b, d, p, r=r, fp32_adapters=True),
    "full": setup_full,
    "mrt_vision": lambda m, b, d, p: setup_mrt(m, b, d, only_groups(p, {"visual", "projector"})),
    "mrt_lm": lambda m, b, d, p: setup_mrt(m, b, d, only_groups(p, {"prefix", "suffix"})),
    "floor_graphed": setup_floor_graphed,
    "mrt_graphed": setup_mrt_graphed,
}


def _implementation_arm(overrides: dict[str, Any]) -> Callable:
    return lambda m, b, d, p: setup_mrt(m, b, d, with_overrides(p, overrides))


SETUP.update({arm: _implementation_arm(overrides) for arm, overrides in IMPL_ARMS.items()})


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------
def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def time_steps(step: Callable[[], Any], device, warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """(step times in ms, losses): CUDA events on a GPU, perf_counter on CPU, after `warmup` steps."""
    import torch

    losses = [step() for _ in range(warmup)]
    _sync(device)
    times = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            losses.append(step())
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(steps):
            t0 = time.perf_counter()
            losses.append(step())
            times.append((time.perf_counter() - t0) * 1e3)
    return times, [float(x) for x in losses]


def run_arm(arm, model, batch, device, placement, warmup, steps, lora_r=128) -> dict[str, Any]:
    """One arm at one batch size: setup, warm-up, timed steps, cleanup. Status ok, oom or skipped."""
    import torch

    free_memory(device)
    result: dict[str, Any] = {"arm": arm, "batch": int(batch["input_ids"].shape[0]), "seq": int(batch["input_ids"].shape[1])}
    cleanup = lambda: None
    try:
        kwargs = {"r": lora_r} if arm.startswith("lora") else {}
        step, trainable, cleanup = SETUP[arm](model, batch, device, placement, **kwargs)
        times, losses = time_steps(step, device, warmup, steps)
        median = statistics.median(times)
        result.update(
            status="ok", trainable_params=trainable, step_ms=median, step_ms_min=min(times), step_ms_max=max(times),
            tokens_per_s=result["batch"] * result["seq"] / (median / 1e3), loss_first=losses[0], loss_last=losses[-1],
            finite=all(math.isfinite(x) for x in losses),
        )
        if device.type == "cuda":
            result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    except ArmSkipped as exc:
        result.update(status="skipped", note=str(exc))
    except torch.OutOfMemoryError as exc:
        result.update(status="oom", error=str(exc).splitlines()[0][:300])
    finally:
        step = None
        try:
            cleanup()
        finally:
            cleanup = None
            free_memory(device)
    return result


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------
def combine_cycles(results: list[dict[str, Any]]) -> dict[tuple[int, str], dict[str, Any]]:
    """(batch, arm) → its result; an arm run in several cycles gets the median of its per-cycle
    medians (the per-cycle values in `step_ms_cycles`) and the highest peak."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in results:
        if r.get("status") == "ok":
            groups.setdefault((r["batch"], r["arm"]), []).append(r)
    by = {}
    for key, runs in groups.items():
        merged = dict(runs[0])
        merged["step_ms_cycles"] = [r["step_ms"] for r in runs]
        merged["step_ms"] = statistics.median(merged["step_ms_cycles"])
        merged["tokens_per_s"] = runs[0]["tokens_per_s"] * runs[0]["step_ms"] / merged["step_ms"]
        if all("peak_gib" in r for r in runs):
            merged["peak_gib"] = max(r["peak_gib"] for r in runs)
        by[key] = merged
    return by


def compare(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per batch size: every arm's step time and peak memory over the floor's (and per cycle),
    `mrt_graphed` over `floor_graphed`, MRT's throughput and peak over each LoRA's, and the targets."""
    by = combine_cycles(results)
    out = {}
    for b in sorted({r["batch"] for r in results}):
        row: dict[str, Any] = {}
        pairs = [(arm, "floor") for (bb, arm) in by if bb == b and arm != "floor"] + [("mrt_graphed", "floor_graphed")]
        for arm, ref in pairs:
            a, f = by.get((b, arm)), by.get((b, ref))
            if not (a and f):
                continue
            row[f"{arm}_step_vs_{ref}"] = a["step_ms"] / f["step_ms"]
            if len(a["step_ms_cycles"]) > 1 and len(a["step_ms_cycles"]) == len(f["step_ms_cycles"]):
                row[f"{arm}_step_vs_{ref}_cycles"] = [x / y for x, y in zip(a["step_ms_cycles"], f["step_ms_cycles"])]
            if "peak_gib" in a and "peak_gib" in f:
                row[f"{arm}_peak_vs_{ref}"] = a["peak_gib"] / f["peak_gib"]
        mrt = by.get((b, "mrt"))
        for lora_arm in ("lora", "lora_fp32"):
            lora = by.get((b, lora_arm))
            if mrt and lora:
                row[f"mrt_throughput_vs_{lora_arm}"] = mrt["tokens_per_s"] / lora["tokens_per_s"]
                if "peak_gib" in mrt and "peak_gib" in lora:
                    row[f"mrt_peak_vs_{lora_arm}"] = mrt["peak_gib"] / lora["peak_gib"]
        for target, bound in TARGETS.items():
            key = target.rsplit("_", 1)[0]
            if key in row:
                row[f"met_{key}"] = row[key] <= bound if target.endswith("_max") else row[key] >= bound
        out[str(b)] = row
    return out


def markdown(summary: dict[str, Any]) -> str:
    env = summary["env"]
    lines = [
        f"Device: {env.get('device')}; torch {env.get('torch')}, transformers {env.get('transformers')}, "
        f"peft {env.get('peft')}; L = {summary['seq']} tokens ({summary['image_tokens']} image + "
        f"{summary['text_tokens']} text), median of {summary['steps']} steps after {summary['warmup']} warm-up"
        + (f", {summary['cycles']} cycles." if summary["cycles"] > 1 else "."),
        "",
        "| batch | arm | step ms (min–max) | tokens/s | peak GiB | trainable params |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in summary["results"]:
        cycle = f" (cycle {r['cycle'] + 1})" if summary["cycles"] > 1 else ""
        if r.get("status") != "ok":
            lines.append(f"| {r['batch']} | {r['arm']}{cycle} | {r['status'].upper()}: {r.get('note', r.get('error', ''))} | – | – | – |")
            continue
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "–"
        lines.append(f"| {r['batch']} | {r['arm']}{cycle} | {r['step_ms']:.1f} ({r['step_ms_min']:.1f}–{r['step_ms_max']:.1f}) | "
                     f"{r['tokens_per_s']:,.0f} | {peak} | {r['trainable_params']:,} |")
    lines += ["", "| batch | ratio | value (per cycle) |", "|---:|---|---|"]
    for b, row in summary["compare"].items():
        for key, value in row.items():
            if isinstance(value, float):
                cycles = row.get(f"{key}_cycles")
                lines.append(f"| {b} | {key} | {value:.3f}" + (f" ({', '.join(f'{x:.3f}' for x in cycles)})" if cycles else "") + " |")
    return "\n".join(lines) + "\n"


def environment(device) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "python": platform.python_version(), "device": "cpu", "cpus": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, cuda=torch.version.cuda, memory_gib=props.total_memory / 2**30)
    return env


def write_json(path: Path | None, summary: dict[str, Any]) -> None:
    """Write `summary` atomically (a run rewrites it after every arm, so a cut-off run keeps its arms)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def step_benchmark(args) -> dict[str, Any]:
    """The arms at each batch size (the default mode)."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("gpu_train_step.py: no CUDA device; use --smoke for a CPU logic check")
    if args.smoke:
        config, placement = tiny_config(), tiny_placement()
        batch_sizes, text_tokens = args.batch_sizes or [2, 4], args.text_tokens or 24
        warmup, steps = args.warmup if args.warmup is not None else 1, args.steps or 2
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        from components.editors import llava_7b_config, paper_placement_7b

        config, placement = llava_7b_config(), paper_placement_7b()
        batch_sizes, text_tokens = args.batch_sizes or [8, 16], args.text_tokens or 128
        warmup, steps = args.warmup if args.warmup is not None else 3, args.steps or 10
        dtype = torch.bfloat16
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 stays fp32 (the editors compute in fp32)
    arms = args.arms or list(ARMS)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_model(config, device, dtype)
    model.train()
    summary: dict[str, Any] = {
        "benchmark": "gpu_train_step", "command": shlex.join(["python", "benchmarks/gpu_train_step.py", *args.argv]),
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "env": environment(device),
        "smoke": args.smoke, "build_s": time.perf_counter() - t0, "base_params": sum(p.numel() for p in model.parameters()),
        "image_tokens": n_image_tokens(config), "text_tokens": text_tokens, "seq": n_image_tokens(config) + text_tokens,
        "warmup": warmup, "steps": steps, "cycles": args.cycles, "gradient_checkpointing": False, "results": [],
    }
    print(f"built {summary['base_params'] / 1e9:.2f} B params in {summary['build_s']:.1f} s on {summary['env']['device']}",
          flush=True)
    for b in batch_sizes:
        batch = make_batch(config, b, text_tokens, device, dtype, seed=b)
        for cycle, arm in ((c, a) for c in range(args.cycles) for a in arms):
            r = run_arm(arm, model, batch, device, placement, warmup, steps, args.lora_r)
            r["cycle"] = cycle
            summary["results"].append(r)
            print(json.dumps(r), flush=True)
            summary["compare"] = compare(summary["results"])
            write_json(args.json, summary)
        del batch
    summary["compare"] = compare(summary["results"])
    write_json(args.json, summary)
    print(markdown(summary))
    return summary


# ---------------------------------------------------------------------------------------------
# --loop: `mrt train`'s own loop against the model-only step
# ---------------------------------------------------------------------------------------------
WORDS = ("red", "green", "blue", "yellow", "cat", "dog", "car", "tree", "house", "boat", "bird", "flower")


def write_visionflan(root: Path, n_images: int, seed: int = 0, size_range=(320, 640)) -> tuple[Path, Path, list[str]]:
    """A Vision-Flan-layout annotation + image folder: two training tasks, one held-out task; JPEGs of
    mixed sizes with noisy content (a realistic decode cost). Returns (annotation, images, text corpus)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = root / "images_191task_1k"
    records, corpus = [], []
    tasks = ("scene+describe_object", "scene+object_color", "scene+heldout_kind")
    for i in range(n_images):
        task = tasks[0] if i % 8 < 4 else tasks[1] if i % 8 < 7 else tasks[2]
        (images / task).mkdir(parents=True, exist_ok=True)
        w, h = (int(x) for x in rng.integers(size_range[0], size_range[1], 2))
        arr = np.clip(rng.integers(0, 255, 3) + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(images / task / f"{i}.jpg", quality=90)
        question = "Look at the picture. " + " ".join(rng.choice(WORDS, 6 + int(rng.integers(0, 10)))) + "? Answer with one word."
        answer = str(rng.choice(WORDS))
        records.append({"id": f"{task}_{i}", "task_name": task, "image": f"{task}/{i}.jpg",
                        "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                          {"from": "gpt", "value": answer}]})
        corpus += [question, answer]
    ann = root / "annotation_191-task_1k.json"
    ann.write_text(json.dumps(records), encoding="utf-8")
    return ann, images, corpus


def loop_benchmark(args) -> dict[str, Any]:
    """Arms, one model, in this order: `model_only` (the `mrt` arm's step on one batch already on the
    device), `loop_prefetch0` (`train.loader_prefetch=0`: every batch built inside the loop),
    `loop_prefetch2` (the default: two steps ahead in a background thread), `model_only_again`. The
    base is handed to `components.train.training.train` in place of `load_base` (a 14 GB folder would
    only be written and read back). Loop tokens/s is train.json's `throughput` (first 2 steps untimed)."""
    import torch
    from llava_hf_layout import (
        llama_style_tokenizer,
        llava_hf_config,
        llava_hf_processor,
    )

    from components.core.config import DataParams, TrainParams
    from components.data.generate import write_dataset
    from components.editors import llava_7b_config, paper_placement_7b
    from components.model import backbone
    from components.train import training

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        raise SystemExit("gpu_train_step.py --loop: no CUDA device; use --smoke for a CPU logic check")
    device = torch.device("cuda" if cuda else "cpu")
    batch_size = (args.batch_sizes or [4 if args.smoke else 16])[0]
    steps = args.steps or (5 if args.smoke else 22)
    n_images = 48 if args.smoke else 800  # more than steps × batch: no image is decoded twice
    work = Path(tempfile.mkdtemp(prefix="mrt-train-loop-"))
    t0 = time.time()
    ann, images, corpus = write_visionflan(work / "vf", n_images, size_range=(64, 96) if args.smoke else (320, 640))
    write_dataset(DataParams(source="visionflan", out_dir=str(work / "data"), visionflan_annotation=str(ann),
                             visionflan_images=str(images), heldout_tasks=["scene+heldout_kind"]), progress=False)
    data_s = time.time() - t0
    tok = llama_style_tokenizer(corpus)
    image_size = 56 if args.smoke else 336
    processor = llava_hf_processor(tok, image_size=image_size, patch_size=14)
    if args.smoke:
        config = llava_hf_config(tok, image_size=image_size, max_positions=512)
        placement = tiny_placement().model_validate({**tiny_placement().model_dump(), "visual": {"layers": "all", "rank": 6}})
        dtype = torch.float32
    else:
        config = llava_7b_config()
        config.image_token_id = tok.convert_tokens_to_ids("<image>")  # our tokenizer's ids; vocab stays 32064
        config.text_config.pad_token_id = tok.pad_token_id
        placement = paper_placement_7b()
        dtype = torch.bfloat16
    t1 = time.time()
    model = build_model(config, device, dtype)
    model.config.use_cache = True  # generation in the held-out check
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    build_s = time.time() - t1

    load_base = backbone.load_base
    backbone.load_base = lambda *a, **k: (model, processor)  # the in-memory base stands for the folder
    made: dict[str, Any] = {}
    prepare = training.prepare_method

    def capture(m, p):
        run_model, extra = prepare(m, p)
        made["extra"] = extra
        return run_model, extra

    training.prepare_method = capture

    def peak_gib() -> float | None:
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None

    def model_only(tag: str) -> dict:
        from components.data.batching import ChatFormatter
        from components.data.load import load_dataset_dir

        loaded = load_dataset_dir(work / "data", splits=("train",))
        rows = [r for r in loaded.rows if r.split == "train"][:batch_size]
        fmt = ChatFormatter(processor, 128)
        batch = training.batch_maker(processor, [training.encode_rows(fmt, rows, loaded.image_root)])(0, list(range(len(rows))))
        batch = {k: v.to(device) for k, v in batch.items()}
        free_memory(device)
        step, n, cleanup = setup_mrt(model, batch, device, placement)
        try:
            times, losses = time_steps(step, device, warmup=2, steps=steps - 2)
        finally:
            cleanup()
        peak = peak_gib()
        free_memory(device)
        med, tokens = statistics.median(times), int(batch["input_ids"].numel())
        return {"arm": tag, "tokens_per_step": tokens, "step_ms_median": round(med, 2),
                "tokens_per_s": round(tokens / (med / 1e3), 1), "peak_gib": peak, "trainable": n,
                "loss_last": float(losses[-1])}

    def loop(prefetch: int) -> dict:
        out = work / f"editors-p{prefetch}"
        p = TrainParams.model_validate({
            "method": "mrt", "base_dir": "in-memory", "data_dir": str(work / "data"), "out_dir": str(out),
            "report": str(out / "train.json"), "curve": str(out / "curve.csv"), "steps": steps,
            "batch_size": batch_size, "save_every": 10**6, "max_length": 128, "eval_per_task": 2,
            "eval_batch_size": 2, "eval_max_new_tokens": 2, "loader_prefetch": prefetch,
            "editors": placement.model_dump(),
        })
        free_memory(device)  # also resets the peak
        report = training.train(p)
        peak = peak_gib()
        made.pop("extra").detach()
        free_memory(device)
        return {"arm": f"loop_prefetch{prefetch}", **report["throughput"], "peak_gib": peak,
                "train_wall_s": report["train_wall_s"], "trainable": report["trainable_params"],
                "loss_final": report["loss_final"], "heldout_n": report["heldout_n"]}

    def safely(tag: str, fn, *a) -> dict:
        """One arm; a failure is recorded (its traceback printed) and the other arms still run."""
        try:
            result = fn(*a)
        except Exception as exc:  # noqa: BLE001 - a benchmark reports every arm it can
            import traceback

            traceback.print_exc()
            result = {"arm": tag, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(result), flush=True)
        return result

    try:
        arms = [safely("model_only", model_only, "model_only")]
        arms += [safely(f"loop_prefetch{k}", loop, k) for k in (0, 2)]
        arms.append(safely("model_only_again", model_only, "model_only_again"))
    finally:
        training.prepare_method, backbone.load_base = prepare, load_base
        shutil.rmtree(work, ignore_errors=True)
    refs = [a["tokens_per_s"] for a in arms if a["arm"].startswith("model_only") and "tokens_per_s" in a]
    ref = statistics.mean(refs) if refs else float("nan")
    for a in arms:
        if "tokens_per_s" in a:
            a["vs_model_only"] = round(a["tokens_per_s"] / ref, 4)
    summary = {
        "benchmark": "gpu_train_step --loop", "command": shlex.join(["python", "benchmarks/gpu_train_step.py", *args.argv]),
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "env": environment(device),
        "shape": "tiny (smoke)" if args.smoke else "LLaVA-1.5-7B (CLIP-L/14-336 + Llama-7B), bf16, random weights",
        "batch": batch_size, "steps_per_arm": steps, "images": n_images, "data_write_s": round(data_s, 1),
        "model_build_s": round(build_s, 1), "model_only_tokens_per_s": round(ref, 1), "arms": arms,
    }
    write_json(args.json, summary)
    print("| arm | tokens/s | vs model-only |\n|---|---:|---:|")
    for a in arms:
        print(f"| {a['arm']} | {a.get('tokens_per_s', 'error')} | {a.get('vs_model_only', '–')} |")
    return summary


# ---------------------------------------------------------------------------------------------
# --ddp: 1 against N processes through the real CLI
# ---------------------------------------------------------------------------------------------
# Stage overrides (DVC -S syntax, on top of params.yaml). The base is larger than the default
# (LM hidden 1024, 8 layers) so that a step is GPU work rather than Python overhead.
DDP_SIZES = {
    "data": ["data.train_per_task=120", "data.heldout_per_task=40", "data.align_size=1500", "data.text_per_type=40"],
    "align": ["align.recipe=joint", "align.tiny.patch_size=8", "align.tiny.vision_hidden=256", "align.tiny.vision_layers=4",
              "align.tiny.vision_heads=4", "align.tiny.lm_hidden=1024", "align.tiny.lm_layers=8", "align.tiny.lm_heads=16",
              "align.tiny.lm_intermediate=2752", "align.steps=150", "align.batch_size=32", "align.eval_size=50",
              "align.save_every=10000"],
    "train": ["train.steps=60", "train.batch_size=128", "train.save_every=10000", "train.eval_per_task=20",
              "train.eval_batch_size=64"],
}
DDP_SMOKE_SIZES = {
    "data": ["data.train_per_task=8", "data.heldout_per_task=4", "data.align_size=60", "data.text_per_type=4",
             "data.mme_images_per_subtask=1", "data.image_size=32"],
    "align": ["align.recipe=joint", "align.tiny.patch_size=8", "align.tiny.vision_hidden=32", "align.tiny.vision_layers=3",
              "align.tiny.vision_heads=2", "align.tiny.lm_hidden=64", "align.tiny.lm_layers=2", "align.tiny.lm_heads=2",
              "align.tiny.lm_intermediate=128", "align.tiny.vocab_size=400", "align.steps=4", "align.batch_size=8",
              "align.eval_size=8", "align.save_every=10000"],
    "train": ["train.steps=6", "train.batch_size=8", "train.save_every=10000", "train.eval_per_task=2",
              "train.eval_batch_size=8"],
}


def _ddp_env() -> dict[str, str]:
    from components.core.offline import set_offline_env

    set_offline_env()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (shared hosts); harmless elsewhere
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    env.setdefault("NVIDIA_TF32_OVERRIDE", "0")  # fp32 stays fp32 in cuBLAS: the tolerances assume it
    return env


def _run_logged(cmd: list[str], log: Path, env: dict[str, str]) -> float:
    """Run `cmd` with its output in `log`; returns wall seconds; exits naming the log on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"gpu_train_step.py --ddp: {shlex.join(cmd)} failed (exit {proc.returncode}); log {log}:\n"
                         + log.read_text(errors="replace")[-3000:])
    return time.perf_counter() - t0


def _mrt(stage: str, params: Path, sets: list[str]) -> list[str]:
    return ["-m", "flows.cli", stage, "--params", str(params), *[x for s in sets for x in ("-S", s)]]


def launch(nproc: int, cpu: bool, main_port: int) -> list[str]:
    """`accelerate launch` on GPUs. On CPU accelerate's launcher runs several processes only through
    MPI, so the smoke check uses torchrun, whose RANK/WORLD_SIZE accelerate reads the same way (gloo)."""
    if cpu:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(main_port)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(main_port)]
    return cmd + (["--multi_gpu"] if nproc > 1 else [])


def read_curve(path: Path) -> list[float]:
    with path.open(newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def editors_diff(a: Path, b: Path) -> dict[str, Any]:
    """Max |Δ| over every tensor of two editors.safetensors, and the tensor where it is largest."""
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    if set(ta) != set(tb):
        raise SystemExit(f"gpu_train_step.py --ddp: {a} and {b} hold different tensors: {sorted(set(ta) ^ set(tb))[:5]}")
    diffs = {k: float((ta[k].double() - tb[k].double()).abs().max()) for k in ta}
    worst = max(diffs, key=diffs.get)
    return {"max_abs": diffs[worst], "worst_tensor": worst, "n_tensors": len(ta),
            "max_abs_weight": max(float(t.double().abs().max()) for t in ta.values())}


def compare_runs(one: dict, two: dict, c1: list[float], c2: list[float], loss_tol: float, acc_slack: float) -> dict:
    """Per-step losses within `loss_tol` and every held-out task within `acc_slack` (one record)."""
    step_diff = [abs(x - y) for x, y in zip(c1, c2)]
    tasks = sorted(set(one["heldout"]) | set(two["heldout"]))
    task_diff = {t: abs(one["heldout"].get(t, float("nan")) - two["heldout"].get(t, float("nan"))) for t in tasks}
    return {
        "steps_compared": min(len(c1), len(c2)),
        "loss_max_abs_diff": max(step_diff) if step_diff else None,
        "loss_max_abs_diff_step": (step_diff.index(max(step_diff)) + 1) if step_diff else None,
        "loss_final": [one["loss_final"], two["loss_final"]],
        "heldout_mean": [one["heldout_mean"], two["heldout_mean"]],
        "heldout_task_max_abs_diff": max(task_diff.values()) if task_diff else 0.0,
        "heldout_within_slack": all(v <= acc_slack + 1e-12 for v in task_diff.values()),
        "losses_within_tol": bool(step_diff) and max(step_diff) <= loss_tol and len(c1) == len(c2),
    }


def ddp_benchmark(args) -> dict[str, Any]:
    """`mrt data` and `mrt align` once, then `mrt train` (MRT, same params, global batch and seed) under
    `accelerate launch --num_processes 1` and `--multi_gpu --num_processes N`. Both compute in fp32 (TF32
    off), so they differ only in reduction order (~1e-7 relative per step, compounded by Adam); a
    systematic difference, e.g. a loss averaged per process instead of per token of the global batch,
    is far above the tolerances (every step's loss within --loss-tol, every editor weight within
    --weight-tol, held-out accuracy within one record per task)."""
    if args.work is None:
        raise SystemExit("gpu_train_step.py --ddp needs --work (a folder for data, base, runs and logs)")
    sizes = DDP_SMOKE_SIZES if args.smoke else DDP_SIZES
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = _ddp_env()
    params = work / "params.yaml"  # one snapshot for every stage and both runs
    shutil.copyfile(_ROOT / "params.yaml", params)
    data, base = (args.data.resolve() if args.data else work / "data"), work / "base"
    common = [f"data.out_dir={data}", f"align.data_dir={data}", f"align.out_dir={base}",
              f"align.report={work / 'align.json'}", f"align.metrics={work / 'align.metrics.json'}",
              f"train.data_dir={data}", f"train.base_dir={base}", "train.method=mrt"]
    walls: dict[str, float] = {}
    if args.data is None:
        walls["data"] = _run_logged([sys.executable, *_mrt("data", params, common + sizes["data"])], work / "data.log", env)
    elif not (data / "manifest.json").is_file():
        raise SystemExit(f"gpu_train_step.py --ddp: --data {data}: no manifest.json (write it with `mrt data`)")
    walls["align"] = _run_logged([sys.executable, *_mrt("align", params, common + sizes["align"])], work / "align.log", env)
    if args.smoke:
        env["MRT_NUM_THREADS"] = "1"  # two CPU processes on a small machine
        env["ACCELERATE_USE_CPU"] = "1"  # with torchrun's RANK/WORLD_SIZE: accelerate's MULTI_CPU (gloo)
    reports = {}
    for n, port in ((1, 29511), (args.nproc, 29512)):
        out = work / f"run_np{n}"
        shutil.rmtree(out, ignore_errors=True)  # a checkpoint left there would be resumed from, not retrained
        sets = common + sizes["train"] + [f"train.out_dir={out}", f"train.report={out}.json", f"train.curve={out}.csv",
                                         f"train.metrics={out}.metrics.json"]
        walls[f"train_np{n}"] = _run_logged(launch(n, args.smoke, port) + _mrt("train", params, sets),
                                            work / f"train_np{n}.log", env)
        reports[n] = json.loads(Path(f"{out}.json").read_text())
    one, two = reports[1], reports[args.nproc]
    per_task = max(1, one["heldout_n"] // max(1, len(one["heldout"])))
    cmp = compare_runs(one, two, read_curve(work / "run_np1.csv"), read_curve(work / f"run_np{args.nproc}.csv"),
                       args.loss_tol, acc_slack=1.0 / per_task)
    cmp["editors"] = editors_diff(work / "run_np1" / "editors.safetensors",
                                  work / f"run_np{args.nproc}" / "editors.safetensors")
    cmp["weights_within_tol"] = cmp["editors"]["max_abs"] <= args.weight_tol
    ms = [1e3 * r["train_wall_s"] / r["steps"] for r in (one, two)]
    import torch

    summary = {
        "benchmark": "gpu_train_step --ddp", "command": shlex.join(["python", "benchmarks/gpu_train_step.py", *args.argv]),
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "smoke": args.smoke, "nproc": args.nproc,
        "env": {"torch": torch.__version__, "cuda_devices": torch.cuda.device_count(),
                "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"},
        "overrides": sizes, "loss_tol": args.loss_tol, "weight_tol": args.weight_tol, "walls": walls, "compare": cmp,
        "ms_per_step": ms, "speedup": one["train_wall_s"] / two["train_wall_s"] if two["train_wall_s"] else None,
        "passed": bool(cmp["losses_within_tol"] and cmp["weights_within_tol"] and cmp["heldout_within_slack"]),
    }
    write_json(args.json, summary)
    print(f"| processes | ms/step | final loss | held-out mean |\n|---:|---:|---:|---:|\n"
          f"| 1 | {ms[0]:.1f} | {one['loss_final']:.5f} | {one['heldout_mean']:.4f} |\n"
          f"| {args.nproc} | {ms[1]:.1f} | {two['loss_final']:.5f} | {two['heldout_mean']:.4f} |")
    print(f"max |Δloss| {cmp['loss_max_abs_diff']:.2e}; max |Δw| {cmp['editors']['max_abs']:.2e}; passed={summary['passed']}")
    return summary


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Arms: " + ", ".join((*ARMS, *EXTRA_ARMS)) + ".")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU (or GPU): a logic check, not a benchmark")
    ap.add_argument("--json", type=Path, default=None, help="write the summary here")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--loop", action="store_true", help="`mrt train`'s loop against the model-only MRT step")
    mode.add_argument("--ddp", action="store_true", help="1 against --nproc processes under accelerate launch")
    ap.add_argument("--arms", nargs="+", default=None, choices=(*ARMS, *EXTRA_ARMS), metavar="ARM",
                    help=f"default: {' '.join(ARMS)} (every arm: below)")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                    help="default 8 16 (smoke 2 4); --loop takes the first (default 16, smoke 4)")
    ap.add_argument("--text-tokens", type=int, default=None, help="padded text length (default 128; smoke 24)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per arm (default 3; smoke 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per arm (default 10, --loop 22; smoke 2, 5)")
    ap.add_argument("--cycles", type=int, default=1, help="run the arms this many times in turn per batch size")
    ap.add_argument("--lora-r", type=int, default=128)
    ap.add_argument("--work", type=Path, default=None, help="--ddp: folder for data, base, runs and logs")
    ap.add_argument("--data", type=Path, default=None, help="--ddp: an existing `mrt data` folder instead of a new one")
    ap.add_argument("--nproc", type=int, default=2, help="--ddp: processes of the data-parallel run")
    ap.add_argument("--loss-tol", type=float, default=1e-3, help="--ddp: max |Δ loss| at any step")
    ap.add_argument("--weight-tol", type=float, default=1e-3, help="--ddp: max |Δ| of any editor weight")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv=None) -> dict[str, Any]:
    from components.core.offline import set_offline_env

    set_offline_env()
    args = parse_args(argv)
    if args.ddp:
        return ddp_benchmark(args)
    if args.loop:
        return loop_benchmark(args)
    return step_benchmark(args)


if __name__ == "__main__":
    summary = main()
    sys.exit(0 if summary.get("passed", True) else 1)
