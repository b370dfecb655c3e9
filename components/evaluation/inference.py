"""Batched greedy generation with or without editors/adapters, and the held-out exact-match check.

Greedy (do_sample False) and left padding: evaluation must be deterministic (the reference code
sampled), and with left padding every row's next token sits at the last position, so a batch
answers exactly what each prompt answers alone. Only the prompt pass goes through the editors'
hooks; generated tokens are not edited (the KV cache carries the effect), as in the paper (docs/method.md).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from components.data.batching import ChatFormatter, Encoded, collate, pad_token_id
from components.data.images import load_image
from components.evaluation.outputs import output_kind

# One normalisation for the whole project: the benchmark's metric modules use the same functions.
from components.evaluation.metrics.text import exact_match


@dataclass
class LoadedModel:
    """A base plus what was trained on it. `kind`: base | mrt | lora | full | frozen
    (components/evaluation/outputs.py)."""

    model: Any
    processor: Any
    kind: str
    extra: Any = None  # the MRTEditors module for mrt (keeps its hooks alive)
    info: dict = field(default_factory=dict)


class BaseMismatchError(ValueError):
    """The base folder holds another model than the one the editors/adapter were trained on."""


def load_model(base_dir: str | Path, adapter_dir: str | Path | None = None,
               expect_fingerprint: str | None = None) -> LoadedModel:
    """The base (or a full fine-tune in its place) with editors/adapter applied, in eval mode.
    `expect_fingerprint`: the base's fingerprint the caller requires (a registered version records
    it); a different base raises BaseMismatchError before anything is applied to it."""
    from components.model.backbone import load_base

    kind = output_kind(adapter_dir)
    if kind.whole_model:
        model, processor = load_base(adapter_dir)
        loaded = LoadedModel(model, processor, kind.name)
    else:
        model, processor = load_base(base_dir)
        fingerprint = None
        if expect_fingerprint is not None or kind.checks_base:
            from components.editors import model_fingerprint

            fingerprint = model_fingerprint(model)
        if expect_fingerprint is not None and fingerprint != expect_fingerprint:
            raise BaseMismatchError(
                f"{base_dir}: base fingerprint {fingerprint} is not the {expect_fingerprint} this model was "
                f"trained on — its {kind.name} weights are meaningless on another base; point it at the base it "
                "was trained on (MRT_BASE_DIR for a registered version)"
            )
        folder = None if adapter_dir is None else Path(adapter_dir)
        run_model, extra, info = kind.apply(model, folder, fingerprint)
        loaded = LoadedModel(run_model, processor, kind.name, extra, info)
    loaded.model.eval()
    if loaded.extra is not None:
        loaded.extra.eval()
    return loaded


def _generation_config(model, max_new_tokens: int):
    import copy

    gc = copy.deepcopy(model.generation_config)
    gc.do_sample = False
    gc.num_beams = 1
    gc.max_new_tokens = max_new_tokens
    for attr in ("temperature", "top_p", "top_k"):
        if hasattr(gc, attr):
            setattr(gc, attr, None)
    return gc


def generate(
    model,
    processor,
    images: Sequence[Any],
    prompts: Sequence[str],
    max_new_tokens: int = 8,
    batch_size: int = 16,
    formatter: ChatFormatter | None = None,
) -> list[str]:
    """Greedy answers to `prompts` (one image — PIL, path or None — per prompt), batched, left-padded."""
    import torch

    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; give one (or None) per prompt")
    fmt = formatter or ChatFormatter(processor, max_length=10**9)
    tok = fmt.tokenizer
    pad = pad_token_id(processor)
    gc = _generation_config(model, max_new_tokens)
    if gc.pad_token_id is None:
        gc.pad_token_id = pad
    device = next(model.parameters()).device
    answers: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = range(start, min(start + batch_size, len(prompts)))
            examples = []
            for i in chunk:
                ids = fmt.encode_prompt(prompts[i], images[i] is not None)
                examples.append(Encoded(ids, ids, images[i], record=str(i)))
            batch = collate(examples, processor, pad, padding_side="left")
            batch.pop("labels")
            batch = {k: v.to(device) for k, v in batch.items()}
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(next(model.parameters()).dtype)
            with torch.no_grad():
                out = model.generate(**batch, generation_config=gc)
            new = out[:, batch["input_ids"].shape[1] :]
            answers.extend(s.strip() for s in tok.batch_decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return answers


def predict(base_dir, adapter_dir, images: Sequence[Any], prompts: Sequence[str], params=None,
            expect_fingerprint: str | None = None) -> list[str]:
    """`mrt predict`: load once, answer every prompt."""
    loaded = load_model(base_dir, adapter_dir, expect_fingerprint=expect_fingerprint)
    max_new = params.max_new_tokens if params is not None else 8
    bs = params.batch_size if params is not None else 16
    imgs = []
    for i, im in enumerate(images, 1):
        try:
            imgs.append(load_image(im) if im is not None else None)
        except ValueError as exc:  # name which --image it was, not only the file
            raise ValueError(f"--image #{i} (for --prompt #{i}): {exc}") from None
    return generate(loaded.model, loaded.processor, imgs, prompts, max_new_tokens=max_new, batch_size=bs)


# ---------------------------------------------------------------------------------------------
# exact match
# ---------------------------------------------------------------------------------------------


def pick_per_task(rows: Iterable[Any], per_task: int) -> list[Any]:
    """The first `per_task` rows of each task, in file order: the same records every run."""
    seen: dict[str, int] = defaultdict(int)
    picked = []
    for r in rows:
        if seen[r.task] < per_task:
            seen[r.task] += 1
            picked.append(r)
    return picked


def evaluate_exact_match(
    model,
    processor,
    rows: Sequence[Any],
    image_root: str | Path | None,
    max_new_tokens: int = 8,
    batch_size: int = 16,
) -> dict:
    """Per-task exact-match accuracy of greedy answers on `rows` (Row objects), plus the unweighted mean."""
    images = [resolve_row_image(image_root, r) for r in rows]
    preds = generate(model, processor, images, [r.instruction for r in rows], max_new_tokens, batch_size)
    hits: dict[str, list[bool]] = defaultdict(list)
    for r, pred in zip(rows, preds):
        hits[r.task].append(exact_match(pred, r.answer))
    per_task = {t: sum(h) / len(h) for t, h in sorted(hits.items())}
    mean = sum(per_task.values()) / len(per_task) if per_task else 0.0
    examples = [{"id": r.id, "task": r.task, "answer": r.answer, "prediction": p} for r, p in list(zip(rows, preds))[:20]]
    return {"per_task": per_task, "mean": mean, "n": len(rows), "examples": examples}


def resolve_row_image(image_root: str | Path | None, row: Any) -> Path | None:
    """The image file of a row (None for text-only rows), via the data package's resolver (which
    refuses paths escaping the root)."""
    if row.image is None:
        return None
    if image_root is None:
        raise ValueError(f"{row.source}: record {row.id}, field 'image': the row has an image but no image root")
    from components.data.paths import resolve_image
    from components.data.records import DataError, RecordError

    try:
        return resolve_image(Path(image_root), row.image)
    except ValueError as exc:
        raise DataError([RecordError(row.source, row.id, "image", f"{exc}; the file was not opened")]) from None
