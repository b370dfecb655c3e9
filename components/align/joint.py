"""The joint recipe (`align.recipe: joint`, and every `composed` base): one loop trains the tiny LLaVA
from scratch — or a composed one's projector — on caption batches alternating with text-only
instruction batches, then scores captions and text answers on held-back rows."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from components.core.config import AlignParams
from components.core.files import write_json
from components.core.threads import set_threads
from components.data.batching import ChatFormatter
from components.train.training import (
    CHECKPOINTS,
    TEXT_EVAL_MAX_NEW_TOKENS,
    LoopSpec,
    StepSampler,
    _count,
    _load_data,
    _split,
    batch_maker,
    code_hash,
    data_image_size,
    encode_rows,
    rows_hash,
    run_loop,
)


def run_align(p: AlignParams) -> dict:
    """Train the tiny (or composed) base on image→caption batches alternating with text-only
    instruction batches, save it as a LLaVA folder, and report caption/text accuracy on held-back rows."""
    from components.model.backbone import load_backbone, save_base
    from components.evaluation.inference import evaluate_exact_match

    set_threads()
    t0 = time.time()
    data = _load_data(p.data_dir)
    align_rows, text_rows = _split(data.rows, "align"), _split(data.rows, "text")
    if not align_rows:
        raise ValueError(f"{p.data_dir}: no 'align' rows (image→caption); run `mrt data` first")
    rng = np.random.default_rng(p.seed)
    a_perm = rng.permutation(len(align_rows))
    n_eval = min(p.eval_size, max(1, len(align_rows) // 5))
    a_eval = [align_rows[i] for i in sorted(a_perm[:n_eval])]
    a_train = [align_rows[i] for i in sorted(a_perm[n_eval:])]
    t_perm = rng.permutation(len(text_rows))
    nt_eval = min(p.eval_size, len(text_rows) // 5)
    t_eval = [text_rows[i] for i in sorted(t_perm[:nt_eval])]
    t_train = [text_rows[i] for i in sorted(t_perm[nt_eval:])]

    image_size = data_image_size(data, p.image_size) if p.backbone == "tiny" else None
    model, processor = load_backbone(p, rows=a_train + t_train, image_size=image_size)
    # What trains: the projector always; the vision tower only when it is ours (tiny, random init);
    # the LM when train_language_model (tiny: it learns its language here; composed: keep it False).
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    if p.backbone == "tiny":
        model.model.vision_tower.requires_grad_(True)
    if p.train_language_model:
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    fmt = ChatFormatter(processor, p.max_length)
    sources = [encode_rows(fmt, a_train, data.image_root)]
    weights = [1.0 - p.text_ratio]
    # Text-only batches teach only the LM: with a frozen LM they would carry no gradient at all.
    if t_train and p.text_ratio > 0 and p.train_language_model:
        sources.append(encode_rows(fmt, t_train, None))
        weights.append(p.text_ratio)
    if weights[0] <= 0:
        sources, weights = sources[1:], weights[1:]
    sampler = StepSampler([len(s) for s in sources], weights, p.batch_size, p.seed)
    ckpt = Path(p.out_dir) / CHECKPOINTS
    spec = LoopSpec(
        steps=p.steps,
        batch_size=p.batch_size,
        lr=p.lr,
        seed=p.seed,
        warmup_ratio=p.warmup_ratio,
        save_every=p.save_every,
        ckpt_dir=str(ckpt),
        desc="align",
        fingerprint={"stage": "align", "params": p.model_dump(mode="json", exclude={"out_dir", "report", "data_dir"}),
                     "seed": p.seed, "code": code_hash(),
                     "data": rows_hash(a_train, data.image_root) + rows_hash(t_train, None)},
    )
    model.train()
    result = run_loop(model, batch_maker(processor, sources), sampler, spec)
    model.eval()
    trainable, total = _count(model)
    model.requires_grad_(True)  # a saved base carries no training state
    meta = {"backbone": p.backbone, "align": p.model_dump(mode="json"), "steps": result.steps}
    save_base(model, processor, p.out_dir, meta=meta)
    shutil.rmtree(ckpt, ignore_errors=True)

    cap = evaluate_exact_match(model, processor, a_eval, data.image_root, max_new_tokens=_caption_tokens(fmt, a_eval), batch_size=p.batch_size)
    tok_acc = token_accuracy(model, processor, fmt, a_eval, data.image_root, p.batch_size)
    txt = evaluate_exact_match(model, processor, t_eval, None, TEXT_EVAL_MAX_NEW_TOKENS, p.batch_size) if t_eval else None
    report = {
        "backbone": p.backbone,
        "trained": p.steps > 0,
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "trainable_params": trainable,
        "total_params": total,
        "loss_first": result.losses[0] if result.losses else None,
        "loss_final": float(np.mean(result.losses[-20:])) if result.losses else None,
        "train_wall_s": round(result.wall_s, 2),
        "wall_s": round(time.time() - t0, 2),
        "caption_exact_match": cap["mean"],
        "caption_token_accuracy": tok_acc,
        "caption_eval_n": len(a_eval),
        "caption_examples": cap["examples"][:5],
        "text_exact_match": txt["mean"] if txt else None,
        "text_per_task": txt["per_task"] if txt else {},
        "text_eval_n": len(t_eval),
    }
    write_json(p.report, report)
    return report


def _caption_tokens(fmt: ChatFormatter, rows) -> int:
    longest = max(len(fmt.tokenizer(r.answer, add_special_tokens=False)["input_ids"]) for r in rows)
    return longest + 2


def token_accuracy(model, processor, fmt: ChatFormatter, rows, image_root, batch_size: int = 32) -> float:
    """Teacher-forced next-token accuracy on the answer tokens (a smoother signal than exact match)."""
    import torch

    enc = encode_rows(fmt, rows, image_root)
    make = batch_maker(processor, [enc])
    device = next(model.parameters()).device
    right = count = 0
    model.eval()
    with torch.no_grad():
        for s in range(0, len(enc), batch_size):
            batch = make(0, list(range(s, min(s + batch_size, len(enc)))))
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits
            pred = logits[:, :-1].argmax(-1)
            tgt = labels[:, 1:]
            m = tgt != -100
            right += int((pred[m] == tgt[m]).sum())
            count += int(m.sum())
    return right / max(count, 1)

