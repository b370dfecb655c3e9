"""Host cost the editors add to a prompt pass or a training step, on CPU, with the GPU code path and
no GPU (issue 7).

Why: a b1 generate() of LLaVA-7B on an H200 is bound by the host (benchmarks/RESULTS.md), and the
device hosts are too noisy to compare two versions of the editors' Python at the 0.5 ms level. Here a
LLaVA with the 7B model's depth (24 vision layers, 32 LM layers) at tiny widths runs no-grad prompt
passes (`--mode prefill`), 8 greedy decode steps after a prompt pass (`--mode decode`: only the
decode steps timed, where the editors edit nothing but their pass hooks still run), or training
steps (`--mode train`: forward with labels, backward, and for
the editors clipping and a fused-style AdamW step, as `gpu_train_step.py`; the base arm is its
frozen floor, backward to the pixels) on one CPU thread. Triton's interpreter switch makes the editors take their GPU path
(fused kernels, positions kernel), with every kernel launch stubbed out. What the editors then add to
the pass is their hooks, bookkeeping and dispatcher calls (not the launches themselves, which
`gpu_host_overhead.py` measures on the GPU host).

Arms, interleaved over `--rounds` rounds (each: `--passes` timed passes after 3 warm-up):
base (no editors), `now` (components/editors), and with `--baseline-editors DIR` a copy of older
editors (`before`). Reported: fastest pass and median per arm, and what each set of editors adds
(fastest pass − base's fastest).

Run: python benchmarks/cpu_host_cost.py [--mode prefill|decode|train] [--baseline-editors .before_s6] [--rounds 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent))
sys.path.insert(0, str(_HERE))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("prefill", "decode", "train"), default="prefill")
    ap.add_argument("--baseline-editors", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--passes", type=int, default=15)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    # the kernel path on CPU (set before Triton is imported; restored afterwards, so that a caller in
    # the same process — the tests — keeps its own setting)
    env_before = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "MRT_TRITON_INTERPRET")}
    os.environ.update({k: "1" for k in env_before})
    try:
        return _run(args)
    finally:
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run(args) -> dict:
    import torch

    from gpu_generate import make_prompts
    from gpu_train_step import build_model, load_editors_package, tiny_config

    from components.core.config import EditorParams
    from components.editors import attach, kernels

    kernels._triton.cache_clear()
    stubs = [sys.modules["components.editors.kernels"], sys.modules["components.editors.orthonormal_kernel"]]
    arms = {"now": attach}
    if args.baseline_editors:
        before = load_editors_package(args.baseline_editors)
        arms["before"] = before.attach
        stubs += [m for name in ("kernels", "orthonormal_kernel") if (m := sys.modules.get(f"{before.__name__}.{name}"))
                  and hasattr(m, "launch")]
    saved = [(m, m.launch) for m in stubs]
    for m in stubs:
        m.launch = lambda *a, **k: None  # no kernel runs: the interpreter would take seconds
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = tiny_config()
        cfg.vision_config.num_hidden_layers = 24
        cfg.text_config.num_hidden_layers = 32
        torch.manual_seed(0)
        model = build_model(cfg, torch.device("cpu"), torch.float32).eval()
        prompts = make_prompts(cfg, 1, 24, torch.device("cpu"), torch.float32, seed=1)
        placement = EditorParams.model_validate({
            "visual": {"layers": "1-22", "rank": 6}, "projector": {"enabled": True, "rank": 6},
            "prefix": {"layers": "all", "rank": 4, "length": 4}, "suffix": {"layers": "all", "rank": 4, "length": 4}})

        if args.mode == "train":
            from gpu_train_step import make_batch

            inputs = make_batch(cfg, 2, 24, torch.device("cpu"), torch.float32, seed=1)
            model.train()

        def step_fn(editors):
            """One pass (prefill) or training step (train) of the arm `editors` (None: base/floor)."""
            if args.mode == "prefill":
                def run():
                    with torch.no_grad():
                        model(**prompts, use_cache=True)
                return run
            if args.mode == "decode":
                def run() -> float:
                    """A prompt pass (not timed), then 8 greedy decode steps: their ms."""
                    with torch.no_grad():
                        first = model(**prompts, use_cache=True, logits_to_keep=1)
                        cache, mask = first.past_key_values, prompts["attention_mask"]
                        ids, ones = first.logits[:, -1:].argmax(-1), mask.new_ones(mask.shape[0], 1)
                        t0 = time.perf_counter()
                        for _ in range(8):
                            mask = torch.cat([mask, ones], dim=1)
                            ids = model(input_ids=ids, past_key_values=cache, attention_mask=mask,
                                        use_cache=True).logits[:, -1:].argmax(-1)
                        return (time.perf_counter() - t0) * 1e3
                return run
            if editors is None:  # the floor: frozen model, backward to the pixels
                def run():
                    batch = dict(inputs)
                    batch["pixel_values"] = inputs["pixel_values"].detach().requires_grad_(True)
                    model(**batch).loss.backward()
                return run
            params = [p for p in editors.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, foreach=True)

            def run():
                model(**inputs).loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
                opt.step()
                opt.zero_grad(set_to_none=True)
            return run

        def timed(run) -> list[float]:
            for _ in range(3):
                run()
            out = []
            for _ in range(args.passes):
                t0 = time.perf_counter()
                ms = run()  # a run that times only part of itself returns its ms
                out.append(ms if isinstance(ms, float) else (time.perf_counter() - t0) * 1e3)
            return out

        model.requires_grad_(False)
        times: dict[str, list[float]] = {"base": [], **{k: [] for k in arms}}
        for _ in range(args.rounds):
            times["base"] += timed(step_fn(None))
            for name, attach_fn in arms.items():
                editors = attach_fn(model, placement)
                try:
                    times[name] += timed(step_fn(editors))
                finally:
                    editors.detach()
    finally:
        for m, fn in saved:
            m.launch = fn
        torch.set_num_threads(threads)
        kernels._triton.cache_clear()
    result = {
        "mode": args.mode,
        "rounds": args.rounds, "passes": args.passes, "baseline_editors": str(args.baseline_editors or ""),
        "ms_min": {k: min(v) for k, v in times.items()},
        "ms_median": {k: statistics.median(v) for k, v in times.items()},
    }
    result["added_ms_min"] = {k: result["ms_min"][k] - result["ms_min"]["base"] for k in arms}
    for k in times:
        print(f"{k:>7}: fastest {result['ms_min'][k]:.2f} ms, median {result['ms_median'][k]:.2f} ms"
              + (f", editors add {result['added_ms_min'][k]:+.2f} ms" if k in arms else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
