"""What does an MRT training step cost on CPU, against the frozen floor, on the embedded default?

Question: an MRT step (forward, backward, clip, Adam on the editors) against the **floor**: the same
frozen model doing forward + backward to its pixel inputs with no editors. Everything above the floor
is the editors' own cost (position gather/scatter, orthonormalisation, the low-rank maths, Adam).
Target: at most 1.10x.

Arms: floor and mrt (params.yaml's `train.editors`), interleaved in blocks of --block steps (editors
attach by hooks, so they cannot alternate per step) so that noise from a shared machine hits both
alike; the ratio of medians is reported. The model is the default tiny LLaVA as `mrt align` builds it
(`align.tiny`, the data's image size, a tokenizer trained on the data); the batch is real training
rows of a small fresh copy of the embedded data, encoded by the trainer's own batching. Speed does
not depend on the weights, so the base is not aligned first.

Run:   python benchmarks/cpu_train_step.py --steps 60 --json out.json
Check: python benchmarks/cpu_train_step.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from components.core.offline import set_offline_env

TARGET = 1.10


def build(params_file: str, batch_size: int, data_dir: str | None, scratch: str):
    """(params, the tiny model, one training batch); without `data_dir`, a small copy of the default
    data is written into `scratch` (same generator, same image size: only a batch is needed)."""
    import torch

    from components.core.config import load_params
    from components.data.batching import ChatFormatter
    from components.data.generate import write_dataset
    from components.data.load import load_dataset_dir
    from components.model.backbone import (
        build_tiny_model,
        build_tiny_processor,
        tiny_corpus,
    )
    from components.train.training import batch_maker, encode_rows

    cfg = load_params(params_file)
    if data_dir is None:
        data_dir = scratch
        small = cfg.data.model_copy(update=dict(out_dir=data_dir, train_per_task=8, heldout_per_task=2,
                                                align_size=50, text_per_type=4, mme_images_per_subtask=1))
        write_dataset(small, progress=False)
    data = load_dataset_dir(data_dir)
    image_size = int(data.manifest["image_size"])
    train_rows = [r for r in data.rows if r.split == "train"]
    corpus_rows = [r for r in data.rows if r.split in ("train", "align", "text")]
    processor = build_tiny_processor(tiny_corpus(corpus_rows), image_size, cfg.align.tiny)
    model = build_tiny_model(processor, cfg.align.tiny, image_size, cfg.train.max_length, seed=0)
    model.eval()  # dropout off, as in MRT training of a frozen base
    model.requires_grad_(False)

    fmt = ChatFormatter(processor, cfg.train.max_length)
    # Mixed tasks in one batch, like the trainer's sampler draws them.
    rows = train_rows[:: max(1, len(train_rows) // batch_size)][:batch_size]
    encoded = encode_rows(fmt, rows, data.image_root)
    batch = batch_maker(processor, [encoded])(0, list(range(len(encoded))))
    torch.manual_seed(0)
    return cfg, model, batch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=str(_ROOT / "params.yaml"))
    ap.add_argument("--data-dir", default=None, help="an existing data dir (default: a small fresh copy)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per arm")
    ap.add_argument("--block", type=int, default=5, help="steps per arm before switching arms")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the summary here")
    ap.add_argument("--smoke", action="store_true", help="batch 2, 2 timed steps per arm: a logic check")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch_size, args.steps, args.block = 2, 2, 1

    set_offline_env()
    import torch

    from components.core.config import load_params
    from components.editors import attach

    torch.set_num_threads(args.threads)
    bs = args.batch_size or load_params(args.params).train.batch_size
    with tempfile.TemporaryDirectory(prefix="mrt-bench-") as scratch:
        cfg, model, batch = build(args.params, bs, args.data_dir, scratch)

    def floor_step():
        inputs = dict(batch)
        inputs["pixel_values"] = batch["pixel_values"].detach().clone().requires_grad_(True)
        loss = model(**inputs).loss
        loss.backward()
        assert inputs["pixel_values"].grad is not None
        return float(loss.detach())

    def timed(step) -> float:
        t0 = time.perf_counter()
        step()
        return (time.perf_counter() - t0) * 1e3

    # Arms alternate in short blocks (floor, mrt, floor, ...) so that noise from a shared machine hits
    # both alike. Each MRT block attaches fresh editors (what `mrt train` does once) and detaches them
    # after, so the floor really runs the bare model; the first step of every block is untimed.
    times: dict[str, list[float]] = {"floor": [], "mrt": []}
    n_params = 0
    blocks = max(1, args.steps // args.block)
    for b in range(blocks + 1):  # block 0 is warm-up
        timed(floor_step)
        for i in range(args.block):
            ms = timed(floor_step)
            if b:
                times["floor"].append(ms)
        editors = attach(model, cfg.train.editors)
        params = [p for p in editors.parameters() if p.requires_grad]
        n_params = sum(p.numel() for p in params)
        opt = torch.optim.Adam(params, lr=cfg.train.learning_rate)

        def mrt_step():
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        timed(mrt_step)
        for i in range(args.block):
            ms = timed(mrt_step)
            if b:
                times["mrt"].append(ms)
        editors.detach()

    med = {k: statistics.median(v) for k, v in times.items()}
    summary = {
        "benchmark": "cpu_train_step",
        "command": shlex.join(["python", "benchmarks/cpu_train_step.py", *(sys.argv[1:] if argv is None else argv)]),
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": "embedded tiny LLaVA (params.yaml align.tiny)",
        "batch_size": bs,
        "seq_len": int(batch["input_ids"].shape[1]),
        "editor_params": n_params,
        "threads": args.threads,
        "steps_per_arm": args.steps,
        "floor_ms_median": round(med["floor"], 2),
        "mrt_ms_median": round(med["mrt"], 2),
        "floor_ms_min": round(min(times["floor"]), 2),
        "mrt_ms_min": round(min(times["mrt"]), 2),
        "ratio_median": round(med["mrt"] / med["floor"], 4),
        "ratio_min": round(min(times["mrt"]) / min(times["floor"]), 4),
        "target": TARGET,
        "met": med["mrt"] / med["floor"] <= TARGET,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
