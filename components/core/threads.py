"""How many CPU threads torch may use: every stage calls `set_threads` once before heavy work."""

from __future__ import annotations

import os

DEFAULT_NUM_THREADS = 2  # torch CPU threads when MRT_NUM_THREADS is unset (the CI machine has 2 cores)


def set_threads() -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("MRT_NUM_THREADS", DEFAULT_NUM_THREADS)))

