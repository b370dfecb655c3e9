"""Creating a brand-new local MLflow store safely when several processes start at once.

The first client of an empty SQLite database runs MLflow's schema migrations; two processes doing
that at the same moment collide (`table ... already exists`). `ensure_local_store` creates the
store under the same file lock that serialises promotions (`<store>.promote.lock`), retrying a
collision with a store created outside the lock, so a concurrent first promotion never crashes.
"""

from __future__ import annotations

import time
from pathlib import Path

RETRIES = 3


def local_store_path(uri: str) -> Path | None:
    """The file or folder of a local store (sqlite:///x.db, file:///dir, a plain path), else None."""
    if uri.startswith("sqlite:///"):  # sqlite:///rel.db or sqlite:////abs/path.db
        return Path(uri[len("sqlite:///"):])
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if "://" not in uri and ":" not in uri[1:2]:
        return Path(uri)
    return None



def ensure_local_store(uri: str, timeout_s: float = 600.0) -> None:
    """Create (migrate) the SQLite store at `uri` under the promotion file lock; a no-op for others."""
    if not uri.startswith("sqlite:///"):
        return
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    path = local_store_path(uri)
    lock_file = Path(str(path) + ".promote.lock")
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_file), timeout=timeout_s):
        for attempt in range(RETRIES + 1):
            try:
                MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments(max_results=1)
                return
            except Exception as exc:  # noqa: BLE001 - a creator outside the lock: retry, then report
                if "already exists" not in str(exc) or attempt == RETRIES:
                    raise
                time.sleep(0.5 * (attempt + 1))
