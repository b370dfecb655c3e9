"""Training checkpoints that survive a crash, a full disk and their own corruption.

A checkpoint is a folder `step-N` holding `trainable.safetensors` (the trainable tensors) and
`state.pt` (optimizer, scheduler, RNG, losses, the run's fingerprint; loaded with weights_only=True).

- **Written atomically and durably**: both files go to a hidden `.tmp-step-N` folder, are fsynced,
  then the folder is renamed into place and the parent folder fsynced. A crash or a full disk leaves
  either the complete new checkpoint or none (the temporary folder is removed, and the error names
  the checkpoint and the OS reason).
- **Validated on load**: a checkpoint whose files do not load, or whose tensors do not match the
  run's trainable ones, is skipped with a message naming the bad file, and the previous one is tried
  (the last `KEEP` are kept for that reason). `MRT_DEBUG=1` adds the underlying error.
- **Keyed on everything that determines the result**: the fingerprint stored in `state.pt` is a
  hash of named parts (params, data content, code of the stages involved, base, seed, …); a
  checkpoint whose parts differ is never resumed from, and the message says which parts changed.
- **Gone once the run is finished**: `discard` removes the folder after the trained output is
  saved, so a finished run is never "resumed" by a later run with other inputs.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

KEEP = 2
TRAINABLE = "trainable.safetensors"
STATE = "state.pt"


class CheckpointError(OSError):
    """A checkpoint could not be written; the message names the checkpoint and the reason."""


def fingerprint_hash(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def part_hashes(parts: dict) -> dict[str, str]:
    """One short hash per named part, stored beside the fingerprint so a mismatch can be explained."""
    return {k: fingerprint_hash({k: v}) for k, v in parts.items()}


def listed(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete-looking checkpoint, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for d in ckpt_dir.glob("step-*"):
        if (d / STATE).is_file() and (d / TRAINABLE).is_file():
            try:
                found.append((int(d.name.split("-", 1)[1]), d))
            except ValueError:
                continue
    return sorted(found)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save(ckpt_dir: Path, step: int, named: dict, optimizer, scheduler, fp_hash: str, losses,
         parts: dict[str, str] | None = None) -> Path:
    """Write step-N atomically and durably, then prune to the last KEEP; CheckpointError on failure."""
    import torch
    from safetensors.torch import save_file

    final = ckpt_dir / f"step-{step}"
    tmp = ckpt_dir / f".tmp-step-{step}"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in named.items()}, str(tmp / TRAINABLE))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng,
            "fingerprint": fp_hash,
            "fingerprint_parts": dict(parts or {}),
            "losses": torch.tensor(losses, dtype=torch.float64),
        }
        buf = io.BytesIO()  # serialised in memory, written by plain file I/O: a full disk is an OSError
        torch.save(state, buf)  # with its errno, not torch's opaque writer error
        with open(tmp / STATE, "wb") as fh:
            fh.write(buf.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_file(tmp / TRAINABLE)
        from components.core.files import make_readable

        make_readable(tmp)  # safetensors writes 0600; what the project writes holds no secret
        _fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _fsync_dir(ckpt_dir)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else str(exc).splitlines()[0]
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "No space left" in str(exc):
            reason = "no space left on device"
        raise CheckpointError(f"{final}: cannot write the step-{step} checkpoint ({reason}); nothing of it was "
                              f"kept, earlier checkpoints are untouched") from None
    for _, old in listed(ckpt_dir)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _debug_detail(exc: BaseException) -> str:
    return f" [{type(exc).__name__}: {exc}]" if os.environ.get("MRT_DEBUG") else ""


def read_state(d: Path) -> dict:
    """state.pt of one checkpoint (weights only); ValueError naming the file when it does not load."""
    import torch

    path = d / STATE
    try:
        state = torch.load(path, weights_only=True)
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("not a checkpoint state (no integer 'step')")
        for key in ("optimizer", "scheduler", "rng", "losses"):
            if key not in state:
                raise ValueError(f"no '{key}' entry")
    except Exception as exc:  # torch raises RuntimeError/EOFError/UnpicklingError/OSError for broken files
        raise ValueError(f"{path}: unreadable or incomplete checkpoint state{_debug_detail(exc)}") from None
    return state


def read_tensors(d: Path, named: dict) -> dict:
    """trainable.safetensors of one checkpoint, checked against the run's trainable tensors."""
    from safetensors.torch import load_file

    path = d / TRAINABLE
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises SafetensorError / OSError for truncated files
        raise ValueError(f"{path}: unreadable checkpoint tensors{_debug_detail(exc)}") from None
    missing = sorted(set(named) - set(tensors))
    extra = sorted(set(tensors) - set(named))
    if missing or extra:
        raise ValueError(f"{path}: checkpoint tensors do not match the trainable ones "
                         f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for k, p in named.items():
        if tuple(tensors[k].shape) != tuple(p.shape):
            raise ValueError(f"{path}: tensor {k} has shape {tuple(tensors[k].shape)}, expected {tuple(p.shape)}")
    return tensors


def _changed(saved: dict, parts: dict[str, str]) -> list[str]:
    if not saved:
        return ["(fingerprint saved without its parts)"]
    return sorted(k for k in set(saved) | set(parts) if saved.get(k) != parts.get(k))


def resume(ckpt_dir: Path | None, fp_hash: str, parts: dict[str, str], named: dict, optimizer, scheduler,
           say: Callable[[str], Any]) -> tuple[int, list[float], Path] | None:
    """Load the newest valid checkpoint with this fingerprint into (named, optimizer, scheduler).

    Returns (step, losses, folder) or None (start fresh). Every checkpoint passed over is named with
    the reason: other settings/inputs (which parts differ) or a file that does not load.
    """
    import torch

    if ckpt_dir is None:
        return None
    for _, d in reversed(listed(ckpt_dir)):
        try:
            state = read_state(d)
        except ValueError as exc:
            say(f"checkpoint skipped: {exc}; trying the previous one")
            continue
        if state.get("fingerprint") != fp_hash:
            changed = _changed(state.get("fingerprint_parts") or {}, parts)
            say(f"{d}: saved for other inputs (changed: {', '.join(changed)}); not resuming from it, "
                f"training starts fresh")
            continue
        try:
            tensors = read_tensors(d, named)
        except ValueError as exc:
            say(f"checkpoint skipped: {exc}; trying the previous one")
            continue
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, RuntimeError, TypeError) as exc:
            say(f"checkpoint skipped: {d / STATE}: optimizer/scheduler state does not fit this run"
                f"{_debug_detail(exc)}; trying the previous one")
            continue
        with torch.no_grad():
            for k, p in named.items():
                p.copy_(tensors[k].to(p.device, p.dtype))
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        return int(state["step"]), [float(x) for x in state["losses"].tolist()], d
    return None


def discard(ckpt_dir: Path | None) -> None:
    """Remove a finished run's checkpoints: its output is saved, nothing may resume from them."""
    if ckpt_dir is not None:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
