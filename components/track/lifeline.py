"""Clean up after a killed `mrt run`: its temporary Prefect server and its MLflow runs.

- `install_signal_handlers`: SIGTERM and SIGHUP become `SystemExit`, so `finally` blocks (MLflow
  runs end FAILED) and atexit handlers (Prefect stops its temporary server) run, as for Ctrl-C.
- `start_watchdog`: SIGKILL runs no handler at all, so a small watchdog process (its own session,
  Linux /proc) records the pipeline's descendants every half second; once the pipeline process is
  gone it terminates every recorded descendant still alive (the temporary Prefect server, workers),
  then kills what is left after a few seconds, and exits.
- `owner_tag` / `end_orphaned_runs`: the pipeline's MLflow parent run carries `mrt.owner`
  (host:pid:start time); when the next run starts, RUNNING runs whose owner process is gone on this
  host — and their RUNNING child runs — are ended KILLED, with one line saying so.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

OWNER_TAG = "mrt.owner"
POLL_S = 0.5
GRACE_S = 5.0


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot) from /proc, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    if start is None:  # no /proc: fall back to "a process with this pid exists"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return _start_time(pid) == start


def owner_tag(pid: int | None = None) -> dict[str, str]:
    pid = pid or os.getpid()
    return {OWNER_TAG: f"{socket.gethostname()}:{pid}:{_start_time(pid) or ''}"}


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def _descendants(pid: int) -> dict[int, str]:
    kids, out, todo = _children_map(), {}, [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            start = _start_time(child)
            if start is not None and child not in out:
                out[child] = start
                todo.append(child)
    return out


def watch(parent: int, parent_start: str) -> None:
    """The watchdog's loop (run as `python -m components.track.lifeline PID START`)."""
    seen: dict[int, str] = {}
    me = os.getpid()
    while _alive(parent, parent_start):
        seen.update({p: s for p, s in _descendants(parent).items() if p != me})
        seen = {p: s for p, s in seen.items() if _start_time(p) == s}
        time.sleep(POLL_S)
    left = {p: s for p, s in seen.items() if _start_time(p) == s}
    for pid in left:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and any(_start_time(p) == s for p, s in left.items()):
        time.sleep(0.1)
    for pid, start in left.items():
        if _start_time(pid) == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def start_watchdog() -> subprocess.Popen | None:
    """Start the watchdog for this process (Linux only; elsewhere nothing to do)."""
    start = _start_time(os.getpid())
    if start is None:
        return None
    return subprocess.Popen([sys.executable, "-m", "components.track.lifeline", str(os.getpid()), start],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP → SystemExit (main thread only), so cleanup code runs as it does for Ctrl-C."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def _exit(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit)


def end_orphaned_runs(track) -> int:
    """End KILLED the RUNNING runs of pipelines whose process is gone (this host), with their RUNNING
    children; returns how many runs were ended. Never raises: a store that cannot be read is the
    pipeline's own business to report."""
    try:
        from mlflow.tracking import MlflowClient

        from components.track.tracking import tracking_uri

        uri = tracking_uri(track)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        exp = client.get_experiment_by_name(track.experiment)
        if exp is None:
            return 0
        running = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
        host = socket.gethostname()
        dead: set[str] = set()
        for r in running:
            owner = r.data.tags.get(OWNER_TAG, "")
            parts = owner.split(":")
            if len(parts) == 3 and parts[0] == host and parts[1].isdigit():
                if not _alive(int(parts[1]), parts[2] or None):
                    dead.add(r.info.run_id)
        grew = True
        while grew:  # children (and their children) of a killed run
            grew = False
            for r in running:
                if r.info.run_id not in dead and r.data.tags.get("mlflow.parentRunId") in dead:
                    dead.add(r.info.run_id)
                    grew = True
        for run_id in sorted(dead):
            client.set_terminated(run_id, "KILLED")
        if dead:
            print(f"ended {len(dead)} MLflow run(s) of a killed pipeline as KILLED: {', '.join(sorted(dead))}",
                  file=sys.stderr)
        return len(dead)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"could not check for runs of killed pipelines: {first}", file=sys.stderr)
        return 0


if __name__ == "__main__":  # pragma: no cover - the watchdog process
    watch(int(sys.argv[1]), sys.argv[2])
