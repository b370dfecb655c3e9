"""One trainer for every method — mrt | lora | full | frozen — and for stage-one alignment.

Read it top to bottom like nanoGPT: `train` (and `run_align`) build a model, decide what trains, and
hand a batch source to `run_loop`, the one optimisation loop. The loop runs on `accelerate`, so
`accelerate launch --num_processes N -m flows.cli train` gives DDP unchanged.

Batches: `p.batch_size` is the GLOBAL micro-batch; each process takes `batch_size // num_processes`
rows of it (the rest, if it does not divide, are dropped — say so in params). One optimiser step sees
`batch_size * grad_accum` rows. Which rows form step s is a pure function of (seed, s), so a resumed
run sees exactly the batches an uninterrupted run sees.

Checkpoints (components/train/checkpoints.py): every `save_every` steps under out_dir/checkpoints/step-N,
written atomically and fsynced; the last two are kept. A run resumes from the newest valid one whose
fingerprint matches — params, data content, the code of the training stage, the base and the seed —
and says which input changed when it starts fresh instead; a corrupt newest checkpoint is named and
the previous one is used. A finished run removes its checkpoints once its output is saved. A
non-finite loss stops training at that step (exit non-zero, nothing saved for it).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from components.train import checkpoints as ckpts
from components.train.methods import method_of
from components.data.batching import ChatFormatter, Encoded, collate, pad_token_id
from components.core.config import TrainParams
from components.core.files import write_json
from components.core.threads import set_threads

CHECKPOINTS = "checkpoints"
# The code whose change changes what training produces (a checkpoint of other code is not resumed).
TRAINING_CODE = ("train/training.py", "data/batching.py", "model/backbone.py", "model/tokenizer.py", "editors")
TEXT_EVAL_MAX_NEW_TOKENS = 8  # text-only answers are a word, a number, yes/no or a letter
TINY_IMAGE_SIZE_FALLBACK = 64  # tiny base on data without a fixed image size and no align.image_size


# ---------------------------------------------------------------------------------------------
# batches: a step-addressable sampler over one or more sources
# ---------------------------------------------------------------------------------------------
class StepSampler:
    """Yields (source, global row indices) per micro-step; a pure function of (seed, micro-step).

    Each source is walked in seeded per-epoch permutations; at each micro-step source k is chosen
    with probability weights[k] (one seeded draw per step), so e.g. half the align batches are
    text-only. `skip(n)` replays n micro-steps without building batches (resume).
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], batch_size: int, seed: int):
        if not sizes or any(n <= 0 for n in sizes):
            raise ValueError(f"every batch source needs at least one row; got sizes {list(sizes)}")
        total = float(sum(weights))
        self.cum = np.cumsum([w / total for w in weights])
        self.sizes, self.batch_size, self.seed = list(sizes), batch_size, seed
        self.cursor = [0] * len(sizes)
        self.epoch = [0] * len(sizes)
        self.perm = [self._perm(k) for k in range(len(sizes))]
        self.step = 0

    def _perm(self, k: int) -> np.ndarray:
        return np.random.default_rng([self.seed, k, self.epoch[k]]).permutation(self.sizes[k])

    def _source(self) -> int:
        if len(self.sizes) == 1:
            return 0
        u = np.random.default_rng([self.seed, 7919, self.step]).random()
        return int(min(np.searchsorted(self.cum, u, side="right"), len(self.sizes) - 1))

    def next(self) -> tuple[int, list[int]]:
        k = self._source()
        out: list[int] = []
        while len(out) < self.batch_size:
            if self.cursor[k] >= self.sizes[k]:
                self.epoch[k] += 1
                self.perm[k] = self._perm(k)
                self.cursor[k] = 0
            take = min(self.batch_size - len(out), self.sizes[k] - self.cursor[k])
            out.extend(int(i) for i in self.perm[k][self.cursor[k] : self.cursor[k] + take])
            self.cursor[k] += take
        self.step += 1
        return k, out

    def skip(self, n: int) -> None:
        for _ in range(n):
            self.next()


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
@dataclass
class LoopSpec:
    steps: int
    batch_size: int
    lr: float
    seed: int
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    save_every: int = 100
    ckpt_dir: str | None = None  # None: no checkpoints
    curve: str | None = None
    desc: str = "train"
    fingerprint: dict = field(default_factory=dict)  # named inputs a resumed checkpoint must share
    prefetch: int = 0  # steps' batches built ahead in a background thread (0: inside the loop)
    on_step: Callable[[int, float, float], None] | None = None  # (step, loss, lr) after each step, main process


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite: training stops at that step and saves nothing of it."""


@dataclass
class LoopResult:
    steps: int
    losses: list[float]
    wall_s: float
    resumed_from: int | None
    step_s: list[float] = field(default_factory=list)  # wall time of each step run here (loader + model)
    step_tokens: list[int] = field(default_factory=list)  # padded positions (B x L, image tokens included) per step

    def throughput(self, warmup: int = 2) -> dict | None:
        """Tokens/s and the median step time over the steps after `warmup` (first-call compilation,
        allocator growth); None with too few steps. Tokens are all padded positions of this process."""
        n = len(self.step_s)
        if n <= warmup:
            return None
        t, k = self.step_s[warmup:], self.step_tokens[warmup:]
        return {"tokens_per_s": round(sum(k) / sum(t), 1), "step_s_median": round(float(np.median(t)), 5),
                "steps_timed": n - warmup, "warmup_steps": warmup}


def _wrapper_class():
    import torch

    class _Wrapper(torch.nn.Module):
        """Holds the model and any side modules (editors) so DDP sees and syncs every trainable tensor."""

        def __init__(self, model, extra=None):
            super().__init__()
            self.model = model
            self.extra = extra
            # MRT editors' U/W/b buffers are views of their banks (the trainable tensors): DDP must
            # sync the banks only, not broadcast the views on every forward.
            views = getattr(extra, "view_buffer_names", None)
            if callable(views):
                self._ddp_params_and_buffers_to_ignore = [f"extra.{n}" for n in views()]

        def forward(self, **batch):
            return self.model(**batch)

    return _Wrapper


def _fingerprint_hash(fp: dict) -> str:
    return ckpts.fingerprint_hash(fp)


def save_checkpoint(ckpt_dir: Path, step: int, named: dict, optimizer, scheduler, fp_hash: str, losses,
                    parts: dict | None = None) -> Path:
    """Write step-N atomically and durably and prune to the last checkpoints.KEEP (checkpoints.save)."""
    return ckpts.save(ckpt_dir, step, named, optimizer, scheduler, fp_hash, losses, parts)


def code_hash(names: Sequence[str] = TRAINING_CODE) -> str:
    """sha256 over the source of the named modules/packages of `components` (relative path + bytes)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for name in names:
        path = root / name
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            if f.is_file():
                digest.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def rows_hash(rows: Sequence[Any], image_root) -> str:
    """Content hash of the rows a stage trains on: each record's text and its image file's bytes, so an
    answer edited in place or an image replaced under the same name is a different input."""
    from components.core.hashing import file_hash
    from components.evaluation.inference import resolve_row_image

    digest = hashlib.sha256()
    seen: dict[str, str] = {}
    for r in rows:
        digest.update(json.dumps([r.id, r.task, r.instruction, r.answer, r.image]).encode() + b"\0")
        image = resolve_row_image(image_root, r) if r.image is not None else None
        if image is not None:
            key = str(image)
            if key not in seen:
                try:
                    seen[key] = file_hash(image)
                except OSError:
                    seen[key] = "unreadable"  # named by the image checks before any step runs
            digest.update(seen[key].encode())
    return digest.hexdigest()[:16]


def check_writable(*paths: str | os.PathLike | None) -> None:
    """Each output folder can be written — checked in its nearest existing ancestor, before training
    starts and without creating anything, so a read-only target is not found only after all the steps."""
    import tempfile

    for target in paths:
        if not target:
            continue
        folder = Path(target).absolute()
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            if not probe.is_dir():
                raise NotADirectoryError(f"{probe} is not a folder")
            with tempfile.NamedTemporaryFile(dir=probe, prefix=".mrt-write-check-"):
                pass
        except OSError as exc:
            raise OSError(f"{folder}: output folder is not writable ({exc.strerror or exc}); "
                          "nothing was trained") from None


def run_loop(
    model,
    make_batch: Callable[[int, list[int]], dict],
    sampler: StepSampler,
    spec: LoopSpec,
    extra=None,
    accelerator=None,
) -> LoopResult:
    """Optimise every parameter of (model, extra) with requires_grad for `spec.steps` optimiser steps.

    `make_batch(source, row_indices)` builds a model batch (with `labels`) for this process's rows.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from transformers import get_linear_schedule_with_warmup

    # Text-only batches leave the vision side (and visual editors) without gradients: DDP must allow it.
    acc = accelerator or Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(spec.seed)
    world, rank = acc.num_processes, acc.process_index
    per_proc = spec.batch_size // world
    if per_proc < 1:
        raise ValueError(f"batch_size {spec.batch_size} is smaller than the {world} processes")
    wrapper = _wrapper_class()(model, extra)
    named = {n: p for n, p in wrapper.named_parameters() if p.requires_grad}
    if not named:
        raise ValueError("nothing to train: no parameter requires grad")
    params = list(named.values())
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    warmup = math.ceil(spec.warmup_ratio * spec.steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, max(spec.steps, 1))

    fp_parts = {**spec.fingerprint, "world": world, "names": sorted(named)}
    fp_hash = _fingerprint_hash(fp_parts)
    parts = ckpts.part_hashes(fp_parts)
    ckpt_dir = Path(spec.ckpt_dir) if spec.ckpt_dir else None
    start, losses, resumed = 0, [], None
    found = ckpts.resume(ckpt_dir, fp_hash, parts, named, optimizer, scheduler, acc.print)
    if found is not None:
        start, losses, where = found
        resumed = start
        acc.print(f"resuming from {where} (step {start})")
    sampler.skip(start * spec.grad_accum)

    wrapped, optimizer = acc.prepare(wrapper, optimizer)
    device = acc.device
    curve_rows = _read_curve(spec.curve, start) if spec.curve and acc.is_main_process else []

    t0 = time.time()
    bar = _progress(spec, start, acc.is_main_process)
    pin = device.type == "cuda"

    def step_batches() -> list[dict]:
        out = []
        for _ in range(spec.grad_accum):
            source, idx = sampler.next()
            out.append(make_batch(source, idx[rank * per_proc : (rank + 1) * per_proc]))
        if pin:
            out = [{k: v.pin_memory() for k, v in b.items()} for b in out]
        return out

    loader = _Prefetcher(step_batches, spec.steps - start, spec.prefetch)
    step_s: list[float] = []
    step_tokens: list[int] = []
    try:
        for step in range(start, spec.steps):
            t_step = time.perf_counter()
            micro_batches = loader.next()
            loss_total = _one_step(wrapped, micro_batches, acc, device, spec, step, params, optimizer, scheduler)
            step_loss = (float(acc.reduce(loss_total.reshape(1), reduction="mean").item()) if world > 1
                         else float(loss_total))
            step_s.append(time.perf_counter() - t_step)
            step_tokens.append(sum(int(b["input_ids"].numel()) for b in micro_batches))
            if not math.isfinite(step_loss):
                bar.close()
                raise TrainingDiverged(
                    f"{spec.desc}: loss is {step_loss} at step {step + 1} of {spec.steps} (lr {spec.lr}); training "
                    f"stopped, nothing of this step was saved — lower the learning rate or check the data")
            losses.append(step_loss)
            lr = scheduler.get_last_lr()[0]
            if acc.is_main_process:
                curve_rows.append((step + 1, step_loss, lr))
                bar.update(step + 1, step_loss, lr)
                if spec.on_step is not None:
                    spec.on_step(step + 1, step_loss, lr)
            done = step + 1
            if done == spec.steps or (ckpt_dir is not None and done % spec.save_every == 0):
                _check_finite(params, done, spec)
            if ckpt_dir is not None and (done % spec.save_every == 0 or done == spec.steps):
                acc.wait_for_everyone()
                if acc.is_main_process:
                    save_checkpoint(ckpt_dir, done, named, optimizer, scheduler, fp_hash, losses, parts)
                    if spec.curve:  # the curve survives a crash up to the checkpoint a resume starts from
                        _write_curve(spec.curve, curve_rows)
    finally:
        loader.close()
    bar.close()
    if spec.curve and acc.is_main_process:
        _write_curve(spec.curve, curve_rows)
    acc.wait_for_everyone()
    return LoopResult(steps=spec.steps, losses=losses, wall_s=time.time() - t0, resumed_from=resumed,
                      step_s=step_s, step_tokens=step_tokens)


def _one_step(wrapped, micro_batches, acc, device, spec: LoopSpec, step: int, params, optimizer, scheduler):
    """Forward/backward over the step's micro-batches, clip, optimiser and scheduler step; returns the
    summed loss (a device tensor)."""
    total = 0.0
    items = _answer_tokens(micro_batches, acc, device)
    for micro, host_batch in enumerate(micro_batches):
        batch = {k: v.to(device, non_blocking=True) for k, v in host_batch.items()}
        sync = micro == spec.grad_accum - 1
        ctx = contextlib.nullcontext() if sync else acc.no_sync(wrapped)
        with ctx:
            loss = wrapped(**batch, num_items_in_batch=items).loss
            if not loss.requires_grad:
                raise ValueError(
                    f"step {step + 1}: this batch reaches no trainable tensor (e.g. a text-only batch when "
                    "only vision-side parameters train); its loss has no gradient"
                )
            acc.backward(loss)
        total += loss.detach()
    acc.clip_grad_norm_(params, spec.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total


class _Prefetcher:
    """Builds the next steps' batches in a background thread, `depth` steps ahead, while the model
    runs the current one (image decoding and the processor release the GIL for most of their work).
    The thread calls `make` strictly in order, so the batches — and a resumed run's — are exactly those
    of building them inline. depth 0: `make` is called inline. An error in the thread is raised by the
    `next()` that would have returned its batch."""

    _DONE = object()

    def __init__(self, make: Callable[[], Any], count: int, depth: int):
        import queue
        import threading

        self.make, self.depth = make, depth
        self.stop = threading.Event()
        self.thread = None
        if depth > 0 and count > 0:
            self.q: "queue.Queue" = queue.Queue(maxsize=depth)
            self.thread = threading.Thread(target=self._run, args=(count,), name="mrt-batches", daemon=True)
            self.thread.start()

    def _put(self, item) -> bool:
        import queue

        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, count: int) -> None:
        for _ in range(count):
            try:
                item = self.make()
            except BaseException as exc:  # handed to the consumer, raised there
                self._put((self._DONE, exc))
                return
            if not self._put((None, item)):
                return

    def next(self):
        if self.thread is None:
            return self.make()
        flag, item = self.q.get()
        if flag is self._DONE:
            raise item
        return item

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)


def _check_finite(params, done: int, spec: LoopSpec) -> None:
    """Weights that went NaN/inf (a huge lr can do that while the step's loss still looks finite) are
    never checkpointed or saved."""
    import torch

    with torch.no_grad():
        if all(bool(torch.isfinite(p).all()) for p in params):
            return
    raise TrainingDiverged(f"{spec.desc}: trainable weights are not finite after step {done} of {spec.steps} "
                           f"(lr {spec.lr}); training stopped, nothing was saved — lower the learning rate")


def _answer_tokens(micro_batches: list[dict], acc, device):
    """Supervised tokens of one optimiser step over every micro-batch and process, divided by the
    process count. Passed to the model as `num_items_in_batch`, each micro-batch's loss is its token
    sum over this, so after DDP averages the gradients over N processes the step minimises the mean
    over every answer token of the global batch — as one process with the whole batch does. (Averaging
    per-process means instead weights a token by 1/its process's count: 2 processes then train other
    editors than 1; `benchmarks/gpu_train_step.py --ddp` checks it.) Labels are shifted by one inside the loss."""
    import torch

    n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
    count = torch.tensor([float(n)], device=device)
    if acc.num_processes > 1:
        count = acc.reduce(count, reduction="sum")
    return (count / acc.num_processes).clamp_min(1e-6).reshape(())


class _progress:
    """A rich progress bar with loss and lr on a terminal; plain periodic lines otherwise (CI, DVC
    logs), since a bar that never redraws would show nothing until the end. Main process only."""

    def __init__(self, spec: LoopSpec, start: int, enabled: bool):
        self.prog = None
        self.plain = False
        self.spec, self.t0 = spec, time.time()
        self.every = max(1, spec.steps // 20)
        if not enabled or spec.steps <= start:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        if not console.is_terminal:
            self.plain = True
            return
        self.prog = Progress(
            TextColumn(f"[bold]{spec.desc}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f} lr {task.fields[lr]:.2e}"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = self.prog.add_task(spec.desc, total=spec.steps, completed=start, loss=float("nan"), lr=0.0)
        self.prog.start()

    def update(self, step: int, loss: float, lr: float) -> None:
        if self.prog is not None:
            self.prog.update(self.task, completed=step, loss=loss, lr=lr)
        elif self.plain and (step % self.every == 0 or step == self.spec.steps):
            import sys

            print(f"{self.spec.desc} step {step}/{self.spec.steps} loss {loss:.4f} lr {lr:.2e} "
                  f"({time.time() - self.t0:.0f} s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.prog is not None:
            self.prog.stop()


def _read_curve(path: str, upto: int) -> list[tuple]:
    p = Path(path)
    if upto == 0 or not p.is_file():
        return []
    with p.open(newline="", encoding="utf-8") as f:
        return [(int(r["step"]), float(r["loss"]), float(r["lr"])) for r in csv.DictReader(f) if int(r["step"]) <= upto]


def _write_curve(path: str, rows: list[tuple]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "lr"])
        w.writerows(rows)


# ---------------------------------------------------------------------------------------------
# data → encoded examples
# ---------------------------------------------------------------------------------------------
def encode_rows(fmt: ChatFormatter, rows: Sequence[Any], image_root) -> list[Encoded]:
    """Tokenize every row once (templates render once per row, not once per step)."""
    from components.evaluation.inference import resolve_row_image

    out = []
    for r in rows:
        image = resolve_row_image(image_root, r)
        if image is not None:
            _check_image_file(image, r)
        out.append(fmt.encode(r.instruction, r.answer, image is not None, record=r.id, image=image))
    return out


def _check_answers(rows: Sequence[Any]) -> None:
    """Answers outside `validate`'s length rule stop training before anything is written, each named
    by file, record and field (the same rule `mrt validate` applies)."""
    from components.data.records import DataError, RecordError
    from components.data.images import answer_limits

    lim = answer_limits()
    bad = [RecordError(r.source, r.id or f"#{r.index}", "conversations[1].value",
                       f"answer has {len(r.answer)} characters; expected {lim.min_chars}–{lim.max_chars} "
                       "(validate.min_answer_chars / max_answer_chars)")
           for r in rows if not lim.min_chars <= len(r.answer or "") <= lim.max_chars]
    if bad:
        raise DataError(bad[:20])


def _check_image_file(path: Path, row) -> None:
    """A missing, empty or oversized image, or one of a refused mode, stops training before anything
    is written (a stat and a header read, no decode: images are decoded lazily, batch by batch); a
    corrupt one is named by `PixelCache` when first read."""
    from components.data.records import DataError, RecordError
    from components.data.images import check_file

    try:
        size = path.stat().st_size if path.is_file() else None
    except OSError:
        size = None
    if size is None:
        raise DataError([RecordError(row.source, row.id, "image", f"image file not found: {path}")])
    if size == 0:
        raise DataError([RecordError(row.source, row.id, "image", f"image file is empty (0 bytes): {path}")])
    try:  # the input guard's size, side and mode limits, from the header (the pixels decode per batch)
        check_file(path)
    except ValueError as exc:  # ImageRefused or an unreadable header
        raise DataError([RecordError(row.source, row.id, "image", str(exc))]) from None


class PixelCache:
    """Processed pixel tensors per image path, least recently used first out once they hold more than
    `max_bytes` (MRT_PIXEL_CACHE_MB, default 2048): the embedded align split (64 px) is revisited every
    few hundred steps and fits whole; real Vision-Flan at 336 px (1.35 MB a tensor, 186k images) would
    need 250 GB, so there only the recent images stay."""

    def __init__(self, processor, max_bytes: int | None = None):
        from collections import OrderedDict

        self.processor = processor
        self.cache: "OrderedDict[str, Any]" = OrderedDict()
        self.max_bytes = max_bytes if max_bytes is not None else int(os.environ.get("MRT_PIXEL_CACHE_MB", "2048")) << 20
        self.bytes = 0

    def _add(self, key: str, tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if size > self.max_bytes:
            return
        self.cache[key] = tensor.clone()  # not a view: a view would keep its whole batch alive
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.cache.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def __call__(self, images: Sequence[Any], records: Sequence[str] = ()):
        import torch

        from components.data.images import load_image

        keyed = [str(im) for im in images if im is not None]
        if not keyed:
            return None
        todo = [k for k in dict.fromkeys(keyed) if k not in self.cache]
        fresh: dict[str, Any] = {}
        if todo:
            pil = []
            for k in todo:
                try:
                    pil.append(load_image(k))
                except ValueError as exc:  # name the record too, not only the file
                    from components.data.records import DataError, RecordError

                    who = [r for im, r in zip(images, records) if im is not None and str(im) == k][:1]
                    raise DataError([RecordError(k, who[0] if who else "", "image", str(exc).removeprefix(f"{k}: "))]) from None
            pv = self.processor.image_processor(images=pil, return_tensors="pt")["pixel_values"]
            fresh = dict(zip(todo, pv))
        out = []
        for k in keyed:
            t = fresh.get(k)
            if t is None:
                t = self.cache[k]
                self.cache.move_to_end(k)
            out.append(t)
        for k, t in fresh.items():
            self._add(k, t)
        return torch.stack(out)


def batch_maker(processor, sources: Sequence[Sequence[Encoded]]) -> Callable[[int, list[int]], dict]:
    pad = pad_token_id(processor)
    pixels = PixelCache(processor)

    def make(source: int, idx: list[int]) -> dict:
        examples = [sources[source][i] for i in idx]
        batch = collate([Encoded(e.input_ids, e.labels, None, e.record) for e in examples], processor, pad, "right")
        pv = pixels([e.image for e in examples], [e.record for e in examples])
        if pv is not None:
            batch["pixel_values"] = pv
        return batch

    return make


def _load_data(data_dir: str):
    """Every split but MME (the benchmark's business); record errors stop training before it starts."""
    from components.data.load import load_dataset_dir
    from components.data.records import DataError

    loaded = load_dataset_dir(data_dir, splits=("train", "heldout", "align", "text"))
    if loaded.errors:
        raise DataError(list(loaded.errors))
    return loaded


def _split(rows, name: str) -> list:
    return [r for r in rows if r.split == name]


def data_image_size(loaded, override: int | None = None) -> int:
    """The tiny base's square input size: align.image_size if set, else the data's size from its
    manifest; real data (no fixed size) falls back to TINY_IMAGE_SIZE_FALLBACK, to which the
    processor resizes every image."""
    if override:
        return int(override)
    manifest = getattr(loaded, "manifest", None) or {}
    size = manifest.get("image_size") if isinstance(manifest, dict) else None
    return int(size) if size else TINY_IMAGE_SIZE_FALLBACK


def _count(model, extra=None) -> tuple[int, int]:
    seen = {}
    for mod in (model, extra):
        if mod is None:
            continue
        for p in mod.parameters():
            seen[id(p)] = p
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, total


# ---------------------------------------------------------------------------------------------
# stage one: align
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# stage two: train (mrt | lora | full | frozen)
# ---------------------------------------------------------------------------------------------
def prepare_method(model, p: TrainParams):
    """Freeze/unfreeze for `p.method` (methods.py); returns (model_to_train, extra_module_or_None)."""
    return method_of(p).prepare(model, p)


def graph_vision_layers(model, extra=None):
    """`train.cuda_graphs`: the vision encoder's layers replayed as CUDA graphs (graphs.py) — with
    their editors for MRT (`extra`, the MRTEditors), plain for LoRA and full fine-tuning (their
    vision tower is frozen). Calls on CPU tensors run eagerly, so the embedded default is unchanged.
    Returns the `LayerGraphs`."""
    if extra is not None and hasattr(extra, "use_cuda_graphs"):
        extra.use_cuda_graphs()
        return extra.graphs
    from components.editors.fast.graphs import LayerGraphs
    from components.editors.hooks import llava_modules

    return LayerGraphs(llava_modules(model)[1]).install()


def _release_graphs(graphs, extra) -> dict | None:
    """Restore the layers and free the graphs' memory before evaluation (which runs without
    gradients, eagerly); returns what they did (replays, eager calls, captures) for the report."""
    if graphs is None:
        return None
    stats = {k: int(v) for k, v in graphs.stats.items()}
    if extra is not None and hasattr(extra, "use_cuda_graphs"):
        extra.use_cuda_graphs(False)
    else:
        graphs.remove()
    return stats


def train(p: TrainParams, on_step: Callable[[int, float, float], None] | None = None) -> dict:
    """Train `p.method` on the base in p.base_dir with the train split; evaluate on held-out tasks.
    `on_step(step, loss, lr)` is called after every optimiser step (live tracking)."""
    from components.model.backbone import load_base
    from components.evaluation.inference import evaluate_exact_match, pick_per_task

    set_threads()
    t0 = time.time()
    check_writable(p.out_dir, Path(p.report).parent, Path(p.curve).parent)
    data = _load_data(p.data_dir)
    model, processor = load_base(p.base_dir)
    base_fp = _base_fingerprint(model)
    heldout = pick_per_task(_split(data.rows, "heldout"), p.eval_per_task)
    out = Path(p.out_dir)

    method = method_of(p)
    if not method.trains:
        run_model, extra = prepare_method(model, p)
        trainable, total = _count(run_model, extra)
        method.save(run_model, extra, processor, p, base_fp)
        result = LoopResult(steps=0, losses=[], wall_s=0.0, resumed_from=None)
        _write_curve(p.curve, [])
        graph_stats = None
    else:
        train_rows = _split(data.rows, "train")
        if not train_rows:
            raise ValueError(f"{p.data_dir}: no 'train' rows")
        import torch

        # The new weights' init (editors, LoRA) belongs to the run's seed: without it every run —
        # and every DDP rank count — started from different editors (`gpu_train_step.py --ddp` checks it).
        torch.manual_seed(p.seed)
        run_model, extra = prepare_method(model, p)
        trainable, total = _count(run_model, extra)
        _check_answers(train_rows)
        fmt = ChatFormatter(processor, text_max_length(model, processor, p.max_length))
        sources = [encode_rows(fmt, train_rows, data.image_root)]
        sampler = StepSampler([len(sources[0])], [1.0], p.batch_size, p.seed)
        spec = LoopSpec(
            steps=p.steps,
            batch_size=p.batch_size,
            lr=p.learning_rate,
            seed=p.seed,
            warmup_ratio=p.warmup_ratio,
            weight_decay=p.weight_decay,
            max_grad_norm=p.max_grad_norm,
            grad_accum=p.grad_accum,
            save_every=p.save_every,
            ckpt_dir=str(out / CHECKPOINTS),
            curve=p.curve,
            desc=f"train {p.method}",
            prefetch=p.loader_prefetch,
            on_step=on_step,
            fingerprint={
                "stage": "train",
                "base": base_fp,
                # folders are not inputs, their contents are (data and base hashed above/below)
                "params": p.model_dump(mode="json", exclude={"out_dir", "report", "curve", "metrics", "eval_per_task",
                                                             "cuda_graphs", "loader_prefetch", "seed", "base_dir",
                                                             "data_dir"}),
                "seed": p.seed,
                "data": rows_hash(train_rows, data.image_root),
                "code": code_hash(),
            },
        )
        graphs = graph_vision_layers(model, extra) if p.cuda_graphs else None
        result = run_loop(run_model, batch_maker(processor, sources), sampler, spec, extra=extra)
        graph_stats = _release_graphs(graphs, extra)
        from accelerate import PartialState

        state = PartialState()
        if not state.is_main_process:
            # Under `accelerate launch` every rank ends with the same weights: only the main process
            # saves, evaluates and writes the report (the others would redo the work and race on files).
            return {"method": p.method, "process_index": state.process_index, "steps": result.steps}
        method.save(run_model, extra, processor, p, base_fp)
        ckpts.discard(out / CHECKPOINTS)  # finished: a later run with other inputs must not resume from it

    if extra is not None:
        extra.eval()
    ev = evaluate_exact_match(run_model, processor, heldout, data.image_root, p.eval_max_new_tokens, p.eval_batch_size)
    report = {
        "method": p.method,
        "base_dir": p.base_dir,
        "base_fingerprint": base_fp,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100.0 * trainable / max(total, 1),
        "steps": result.steps,
        "lr": p.learning_rate,
        "resumed_from": result.resumed_from,
        "loss_first": result.losses[0] if result.losses else None,
        "loss_final": float(np.mean(result.losses[-10:])) if result.losses else None,
        "train_wall_s": round(result.wall_s, 2),
        "wall_s": round(time.time() - t0, 2),
        "throughput": result.throughput(),
        "cuda_graphs": graph_stats,
        "heldout": ev["per_task"],
        "heldout_mean": ev["mean"],
        "heldout_n": ev["n"],
        "heldout_examples": ev["examples"][:10],
    }
    write_json(p.report, report)
    return report


def text_max_length(model, processor, max_length: int | None) -> int:
    """`train.max_length` in text tokens, checked against the base: null → the LM's position budget
    minus one image's tokens; a value whose text + image tokens exceed that budget is refused."""
    from components.data.batching import image_token_count

    n_image = image_token_count(processor) if hasattr(processor, "image_processor") else 0
    text_cfg = getattr(model.config, "text_config", model.config)
    positions = getattr(text_cfg, "max_position_embeddings", None)
    if max_length is None:
        if not positions:
            raise ValueError("train.max_length is null but the base's config has no max_position_embeddings; set it")
        return int(positions) - n_image
    if positions and max_length + n_image > positions:
        raise ValueError(
            f"train.max_length={max_length} text tokens + {n_image} image tokens exceed the base's "
            f"max_position_embeddings={positions}; lower train.max_length (or set it to null: {positions - n_image})"
        )
    return int(max_length)


def _base_fingerprint(model) -> str:
    try:
        from components.editors import model_fingerprint
    except ImportError:
        return ""
    return model_fingerprint(model)
