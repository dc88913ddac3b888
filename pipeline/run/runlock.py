"""One writer per directory: `earlybert train` / `finetune` on a run directory, `earlybert prep` on an output.

    DIR/.earlybert.lock    {"host", "pid", "started", "command", "slurm_job"}, written atomically by the holder

A second command on the same directory is refused with a message naming the holder. A lock whose holder is
gone is taken over with a message: the same host and a pid that is no longer that process, or the same Slurm
job (a requeued job restarts on any node, after its previous incarnation ended). A lock of another host is
never taken over: its holder may be alive; the message says which file to delete if it is not.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import psutil

from common.outputs import atomic_write

LOCK = ".earlybert.lock"


class LockError(RuntimeError):
    """The directory is in use by another command; the message names it."""


def _me() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": psutil.Process().create_time(),
        "command": " ".join(sys.argv),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
    }


def _gone(holder: dict) -> bool:
    """True when the holder is known to have ended (False when it may be alive: another host)."""
    if holder.get("slurm_job") and holder["slurm_job"] == os.environ.get("SLURM_JOB_ID"):
        return True
    if holder.get("host") != socket.gethostname():
        return False
    try:
        return psutil.Process(holder["pid"]).create_time() != holder.get("started")  # the pid was reused
    except (psutil.NoSuchProcess, KeyError, TypeError):
        return True


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # a lock cut short (a full disk): nobody can hold it
        return {}


def acquire(directory: Path, what: str) -> Path:
    """Take DIR's lock for this process; raises LockError while another command holds it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path, me = directory / LOCK, _me()
    holder = _read(path)
    if holder is not None and not _gone(holder):
        raise LockError(
            f"{directory} is in use by {what} on host {holder.get('host')}, pid {holder.get('pid')} "
            f"({holder.get('command')}); wait for it to end, or, if it is no longer running, delete "
            f"{path}"
        )
    if holder is not None:
        print(
            f"earlybert: taking over {path}: its holder (host {holder.get('host')}, pid {holder.get('pid')}) has ended",
            file=sys.stderr,
            flush=True,
        )
    atomic_write(path, lambda f: f.write(json.dumps(me).encode()))
    if _read(path) != me:  # another command took it over at the same moment, after us
        raise LockError(f"{directory}: another command took {path} at the same time; wait for it to end")
    return path


def release(path: Path) -> None:
    """Remove the lock if it is still this process's."""
    holder = _read(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
