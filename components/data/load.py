"""Load a data directory written by `mrt data` (embedded or real) through its manifest.

Validation, training and the benchmark all start here, so they agree on where every split and
image lives: `manifest.json` names the split files, the image root (relative to the directory, or
absolute for the real Vision-Flan images) and the MME root.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .mme import read_mme
from .paths import resolve_image
from .records import SPLITS, DataError, RecordError, Row
from .visionflan import read_visionflan

MANIFEST = "manifest.json"
FORMAT_VERSION = 1

__all__ = ["LoadedData", "load_dataset_dir", "read_manifest", "resolve_image"]


@dataclass
class LoadedData:
    manifest: dict
    rows: list[Row]
    errors: list[RecordError]
    image_root: Path
    mme_root: Path | None
    data_dir: Path | None = None
    _by_split: dict[str, list[Row]] = field(default_factory=dict, init=False, repr=False)

    def split(self, name: str) -> list[Row]:
        """Rows of one split ("train", "heldout", "align", "text", "mme"), in file order."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        if not self._by_split:
            for r in self.rows:
                self._by_split.setdefault(r.split, []).append(r)
        return self._by_split.get(name, [])

    def image_path(self, row: Row) -> Path:
        """The image file of a row (MME rows are relative to the MME root, the others to the image root)."""
        if row.image is None:
            raise ValueError(f"{row.source}: record {row.id} is text-only and has no image")
        if row.split == "mme":
            if self.mme_root is None:
                raise ValueError(f"{row.source}: record {row.id} is an MME row but the manifest has no mme_root")
            return resolve_image(self.mme_root, row.image)
        return resolve_image(self.image_root, row.image)


def _manifest_error(path: Path, field: str, message: str) -> DataError:
    return DataError([RecordError(str(path), "", field, message)])


def read_manifest(data_dir: str | Path) -> dict:
    """The parsed manifest of `data_dir`; DataError naming the file (and field) when missing or malformed."""
    path = Path(data_dir) / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _manifest_error(path, "", "manifest not found (write the data set with `mrt data` first)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _manifest_error(path, "", f"cannot read manifest: {exc}") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            [RecordError(str(path), f"line {exc.lineno} col {exc.colno}", "", f"malformed JSON: {exc.msg}")]
        ) from None
    if not isinstance(manifest, dict):
        raise _manifest_error(path, "", f"expected a JSON object, got a {type(manifest).__name__}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise _manifest_error(path, "format_version", f"expected {FORMAT_VERSION}, got {version!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise _manifest_error(path, "files", "expected a mapping of split name to annotation file")
    for split, name in files.items():
        if split not in SPLITS or split == "mme":
            raise _manifest_error(path, f"files.{split}", f"unknown split; expected one of {SPLITS[:-1]}")
        if not isinstance(name, str) or not name:
            raise _manifest_error(path, f"files.{split}", f"expected a file name, got {name!r}")
    for key in ("image_root",):
        if not isinstance(manifest.get(key), str) or not manifest[key]:
            raise _manifest_error(path, key, f"expected a folder path, got {manifest.get(key)!r}")
    if manifest.get("mme_root") is not None and not isinstance(manifest["mme_root"], str):
        raise _manifest_error(path, "mme_root", f"expected a folder path or null, got {manifest['mme_root']!r}")
    return manifest


def _confined(data_dir: Path, rel: str, field: str, follow_links: bool = True) -> None:
    """`rel` names something inside `data_dir` (no absolute path, no `..` escape; with follow_links,
    no symlink out either — a root folder may be a link, as mounted data sets often are)."""
    from components.data.paths import normalize_image_path, resolve_image

    try:
        resolve_image(data_dir, rel) if follow_links else normalize_image_path(rel)
    except ValueError as exc:
        msg = str(exc).replace("image path", "path").replace("image root", "data folder")
        raise _manifest_error(data_dir / MANIFEST, field, f"{msg}; nothing was read") from None


def load_dataset_dir(data_dir: str | Path, *, splits: tuple[str, ...] | None = None) -> LoadedData:
    """Every split of a data directory (or only `splits`), with every record error collected.

    Whole-file problems (missing manifest or split file, malformed JSON, missing MME folder) raise
    DataError; bad records do not — they are returned in `errors` beside the good rows.
    """
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    for split, name in manifest["files"].items():  # split files: inside the data folder, nowhere else
        _confined(data_dir, name, f"files.{split}")
    # A relative root must stay inside the data folder; an absolute one is where `mrt data` found a
    # real data set (data.visionflan_images / data.mme_root) and stays absolute.
    for key in ("image_root", "mme_root"):
        if manifest.get(key) and not Path(manifest[key]).is_absolute():
            _confined(data_dir, manifest[key], key, follow_links=False)
    image_root = data_dir / manifest["image_root"]
    mme_root = data_dir / manifest["mme_root"] if manifest.get("mme_root") else None
    rows: list[Row] = []
    errors: list[RecordError] = []
    wanted = set(splits) if splits is not None else set(SPLITS)
    for split, name in manifest["files"].items():
        if split not in wanted:
            continue
        got, errs = read_visionflan(data_dir / name, image_root, split)
        rows += got
        errors += errs
    if mme_root is not None and "mme" in wanted:
        if not mme_root.is_dir():
            raise _manifest_error(data_dir / MANIFEST, "mme_root", f"MME folder {mme_root} not found")
        got, errs = read_mme(mme_root)
        rows += got
        errors += errs
    return LoadedData(
        manifest=manifest, rows=rows, errors=errors, image_root=image_root, mme_root=mme_root, data_dir=data_dir
    )
