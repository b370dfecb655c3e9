"""MRT editors on CUDA at LLaVA-1.5-7B's real shapes (random bf16 weights): correctness on the GPU and
the editors' cost. Skipped without a CUDA device (tests/conftest.py); run on a GPU machine with
`python -m pytest tests/test_editors_gpu.py -s` — it prints one JSON line of timings."""

from __future__ import annotations

import json
import statistics
import time

import pytest
import torch

from components.editors.count import llava_7b_config, paper_placement_7b
from components.editors.io import model_fingerprint
from components.editors.sites import attach

pytestmark = pytest.mark.gpu

BATCH, TEXT, ANSWER = 8, 48, 8


def _timed(fn, warmup: int = 2, reps: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@pytest.fixture(scope="module")
def model_7b():
    from transformers import LlavaForConditionalGeneration

    config = llava_7b_config()
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = LlavaForConditionalGeneration(config)
    model = model.to(torch.bfloat16).eval()
    return model, time.perf_counter() - t0


def _batch(config, with_answer: bool):
    g = torch.Generator().manual_seed(0)
    n_img = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    text = torch.randint(100, 30000, (BATCH, TEXT + (ANSWER if with_answer else 0)), generator=g)
    ids = torch.cat(
        [torch.ones(BATCH, 1, dtype=torch.long), torch.full((BATCH, n_img), config.image_token_id), text], dim=1
    )
    out = {
        "input_ids": ids.cuda(),
        "attention_mask": torch.ones_like(ids).cuda(),
        "pixel_values": torch.randn(BATCH, 3, 336, 336, generator=g).to("cuda", torch.bfloat16),
    }
    if with_answer:
        labels = torch.full_like(ids, -100)
        labels[:, -ANSWER:] = ids[:, -ANSWER:]
        out["labels"] = labels.cuda()
    return out


def test_editors_on_llava_7b_shapes(model_7b):
    model, init_s = model_7b
    config = model.config
    report = {"init_s": round(init_s, 2), "batch": BATCH, "seq": 1 + 576 + TEXT}
    t0 = time.perf_counter()
    model_fingerprint(model)
    report["fingerprint_s"] = round(time.perf_counter() - t0, 3)

    prompt = _batch(config, with_answer=False)
    with torch.no_grad():
        base = model(**prompt).logits
        report["prefill_base_ms"] = round(1e3 * _timed(lambda: model(**prompt)), 2)

    editors = attach(model, paper_placement_7b())
    try:
        assert editors.num_parameters() == 2_417_034
        assert all(p.is_cuda and p.dtype == torch.float32 for p in editors.parameters())
        with torch.no_grad():
            edited = model(**prompt).logits
            report["prefill_editors_ms"] = round(1e3 * _timed(lambda: model(**prompt)), 2)
        assert edited.dtype == torch.bfloat16 and torch.isfinite(edited).all()
        assert not torch.equal(edited, base)

        editors.edit_counts.clear()
        with torch.no_grad():
            model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert dict(editors.edit_counts) == {"visual": 22, "projector": 1, "prefix": 32, "suffix": 32}

        train = _batch(config, with_answer=True)
        editors.train()
        opt = torch.optim.Adam(editors.parameters(), lr=6e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            model(**train).loss.backward()
            opt.step()

        torch.cuda.reset_peak_memory_stats()
        report["train_step_ms"] = round(1e3 * _timed(step, warmup=1, reps=3), 2)
        report["train_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in editors.parameters())
        for ed in editors.editors():
            u = ed.basis()
            torch.testing.assert_close(u @ u.T, torch.eye(u.shape[0], device="cuda"), atol=1e-4, rtol=0)

        # the editors' own cost: orthonormalising all 87 bases, one QR each vs batched by shape
        report["qr_one_by_one_ms"] = round(
            1e3 * _timed(lambda: [ed.basis() for ed in editors.editors()], warmup=2, reps=10), 2
        )

        def batched():  # what a training pass prepares: one stack per shape, U orthonormal, A = W − U
            editors._build_stacks(True, True)

        report["qr_batched_ms"] = round(1e3 * _timed(batched, warmup=2, reps=10), 2)
    finally:
        editors.detach()
    with torch.no_grad():
        assert torch.equal(model(**prompt).logits, base)  # detach restores the base bit for bit
    print("EDITORS_GPU_REPORT " + json.dumps(report))
