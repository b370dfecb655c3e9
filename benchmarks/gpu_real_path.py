"""End-to-end `mrt train` at LLaVA-1.5-7B shape against the model-only step: is data loading ever the bottleneck?

What runs: a Vision-Flan-format data set (annotation JSON + a folder of JPEGs of mixed sizes, written by
`mrt data`'s own `source: visionflan` path), llava-hf's processor layout at 336 px (576 image tokens,
the llava-hf chat template, a Llama-style tokenizer; tests/llava_hf_layout.py), and
`components.train.training.train` — the function behind `mrt train`: row encoding, the step sampler, the
batch loader (image decoding, CLIP preprocessing, collation), accelerate, editors at the paper's
placement, AdamW, checkpoint at the end, the quick held-out check. The base is LLaVA-1.5-7B's config
with random bf16 weights built on the GPU (benchmarks/gpu_train_step.py's `build_model`) and handed to
`train` in place of `load_base` (a 14 GB folder would only be written and read back).

Arms, one model, in this order: `model_only` (gpu_train_step.py's MRT step — forward, backward, clip,
AdamW — on one batch already on the GPU, CUDA-event timed), `loop_prefetch0` (`train.loader_prefetch=0`:
every batch built inside the loop), `loop_prefetch2` (the default: two steps ahead in a background
thread, pinned memory), `model_only` again. Loop tokens/s comes from train.json's `throughput` (wall
time per step, first 2 steps excluded); every count is all B × L positions, 576 image tokens included.

Run (GPU):   python benchmarks/gpu_real_path.py --json out.json
Check (CPU): python benchmarks/gpu_real_path.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
for p in (_ROOT, _ROOT / "tests", _ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

WORDS = ("red", "green", "blue", "yellow", "cat", "dog", "car", "tree", "house", "boat", "bird", "flower")


def write_visionflan(root: Path, n_images: int, seed: int = 0, size_range=(320, 640)) -> tuple[Path, Path, list[str]]:
    """A Vision-Flan-layout annotation + image folder: two training tasks, one held-out task; JPEGs of
    mixed sizes with noisy content (realistic decode cost)."""
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
        base = rng.integers(0, 255, 3)
        arr = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(images / task / f"{i}.jpg", quality=90)
        n_words = 6 + int(rng.integers(0, 10))
        question = "Look at the picture. " + " ".join(rng.choice(WORDS, n_words)) + "? Answer with one word."
        answer = str(rng.choice(WORDS))
        records.append({"id": f"{task}_{i}", "task_name": task, "image": f"{task}/{i}.jpg",
                        "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                          {"from": "gpt", "value": answer}]})
        corpus += [question, answer]
    ann = root / "annotation_191-task_1k.json"
    ann.write_text(json.dumps(records), encoding="utf-8")
    return ann, images, corpus


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=22, help="optimiser steps per loop arm (first 2 not timed)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--images", type=int, default=800, help="distinct images (more than steps x batch: no cache hits)")
    ap.add_argument("--prefetch", type=int, nargs="+", default=[0, 2], help="train.loader_prefetch of each loop arm")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--smoke", action="store_true", help="CPU check: tiny widths, 56 px, a few steps")
    args = ap.parse_args(argv)

    import torch

    import gpu_train_step as gts
    from components.core.config import DataParams, TrainParams
    from components.data.generate import write_dataset
    from components.editors.count import llava_7b_config, paper_placement_7b
    from llava_hf_layout import llama_style_tokenizer, llava_hf_config, llava_hf_processor

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    if args.smoke:
        args.steps, args.batch, args.images = min(args.steps, 5), min(args.batch, 4), min(args.images, 48)
    work = Path(tempfile.mkdtemp(prefix="mrt-real-path-"))
    t0 = time.time()
    ann, images, corpus = write_visionflan(work / "vf", args.images, size_range=(64, 96) if args.smoke else (320, 640))
    write_dataset(DataParams(source="visionflan", out_dir=str(work / "data"), visionflan_annotation=str(ann),
                             visionflan_images=str(images), heldout_tasks=["scene+heldout_kind"]), progress=False)
    data_s = time.time() - t0

    tok = llama_style_tokenizer(corpus)
    image_size = 56 if args.smoke else 336
    processor = llava_hf_processor(tok, image_size=image_size, patch_size=14)
    if args.smoke:
        config = llava_hf_config(tok, image_size=image_size, max_positions=512)
        placement = gts.tiny_placement().model_copy(update={})
        placement = placement.model_validate({**placement.model_dump(), "visual": {"layers": "all", "rank": 6}})
        dtype = torch.float32
    else:
        config = llava_7b_config()
        config.image_token_id = tok.convert_tokens_to_ids("<image>")  # our tokenizer's ids; vocab stays 32064
        config.text_config.pad_token_id = tok.pad_token_id
        placement = paper_placement_7b()
        dtype = torch.bfloat16
    t1 = time.time()
    model = gts.build_model(config, device, dtype)
    model.config.use_cache = True  # generation in the held-out check
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    build_s = time.time() - t1

    import components.model.backbone as backbone
    import components.train.training as training

    backbone.load_base = lambda *a, **k: (model, processor)  # the in-memory base stands for the folder
    made = {}
    prepare = training.prepare_method

    def capture(m, p):
        run_model, extra = prepare(m, p)
        made["extra"] = extra
        return run_model, extra

    training.prepare_method = capture

    def params(prefetch: int) -> TrainParams:
        out = work / f"editors-p{prefetch}"
        return TrainParams.model_validate({
            "method": "mrt", "base_dir": "in-memory", "data_dir": str(work / "data"), "out_dir": str(out),
            "report": str(out / "train.json"), "curve": str(out / "curve.csv"), "steps": args.steps,
            "batch_size": args.batch, "save_every": 10**6, "max_length": 128, "eval_per_task": 2,
            "eval_batch_size": 2, "eval_max_new_tokens": 2, "loader_prefetch": prefetch,
            "editors": placement.model_dump(),
        })

    def model_only(tag: str) -> dict:
        from components.data.batching import ChatFormatter
        from components.data.load import load_dataset_dir

        loaded = load_dataset_dir(work / "data", splits=("train",))
        rows = [r for r in loaded.rows if r.split == "train"][: args.batch]
        fmt = ChatFormatter(processor, 128)
        batch = training.batch_maker(processor, [training.encode_rows(fmt, rows, loaded.image_root)])(0, list(range(len(rows))))
        batch = {k: v.to(device) for k, v in batch.items()}
        gts.free_memory(device)
        step, n, cleanup = gts.setup_mrt(model, batch, device, placement)
        try:
            times, losses = gts.time_steps(step, device, warmup=2, steps=args.steps - 2)
        finally:
            cleanup()
        peak = peak_gib()
        gts.free_memory(device)
        med = statistics.median(times)
        tokens = int(batch["input_ids"].numel())
        return {"arm": tag, "tokens_per_step": tokens, "step_ms_median": round(med, 2),
                "tokens_per_s": round(tokens / (med / 1e3), 1), "peak_gib": peak, "trainable": n,
                "loss_last": float(losses[-1])}

    def peak_gib() -> float | None:
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None

    def loop(prefetch: int) -> dict:
        p = params(prefetch)
        gts.free_memory(device)  # also resets the peak
        report = training.train(p)
        peak = peak_gib()
        made.pop("extra").detach()
        gts.free_memory(device)
        tp = report["throughput"]
        return {"arm": f"loop_prefetch{prefetch}", **tp, "peak_gib": peak, "train_wall_s": report["train_wall_s"],
                "trainable": report["trainable_params"], "loss_final": report["loss_final"],
                "heldout_n": report["heldout_n"]}

    def safely(tag: str, fn, *a) -> dict:
        """One arm; a failure is recorded (with its traceback printed) and the other arms still run."""
        try:
            result = fn(*a)
        except Exception as exc:  # noqa: BLE001 - a benchmark reports every arm it can
            import traceback

            traceback.print_exc()
            result = {"arm": tag, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(result), flush=True)
        return result

    arms = [safely("model_only", model_only, "model_only")]
    for k in args.prefetch:
        arms.append(safely(f"loop_prefetch{k}", loop, k))
    arms.append(safely("model_only_again", model_only, "model_only_again"))
    refs = [a["tokens_per_s"] for a in arms if a["arm"].startswith("model_only") and "tokens_per_s" in a]
    ref = statistics.mean(refs) if refs else float("nan")
    for a in arms:
        if "tokens_per_s" in a:
            a["vs_model_only"] = round(a["tokens_per_s"] / ref, 4)
    summary = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "shape": "LLaVA-1.5-7B (CLIP-L/14-336 + Llama-7B), bf16, random weights" if not args.smoke else "tiny (smoke)",
        "batch": args.batch, "steps_per_arm": args.steps, "images": args.images, "cpu_count": os.cpu_count(),
        "data_write_s": round(data_s, 1), "model_build_s": round(build_s, 1),
        "model_only_tokens_per_s": round(ref, 1), "arms": arms,
    }
    text = json.dumps(summary, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n", encoding="utf-8")
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
