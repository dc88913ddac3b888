"""Where a command may write: the one output policy of every `earlybert` command.

A user's pre-training run is weeks of GPU time and a corpus may be all they have, so no command deletes or
replaces what it did not write:

    check_output(out, inputs)   refuses an output that is, contains or lies inside one of the command's
                                inputs or a run directory, one that exists and is not a regular file
                                or a directory (a FIFO, a device, a socket: never replaced), and one that
                                cannot be created (under a regular file, on a read-only filesystem)
    atomic_write (shards.py)    replaces regular files only, through temporary_file(path)
    sweep_files(path)           removes the temporary files that interrupted writes of `path` left
    replace_directory(...)      puts a finished temporary directory in place of the output, replacing an
                                existing one only when this command wrote it (its marker file inside) or
                                when the user passed --overwrite, and never one that holds a run directory
    staging_dir / sweep         the temporary directory beside the output, named after this host and
                                process, so that a later run of the same command removes what an
                                interrupted one left (kill -9, SIGTERM) and nothing else

Errors are OutputError (a ValueError): bad input, exit status 2, with both paths in the message.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
from pathlib import Path

MARKER = ".earlybert-output"  # {"command": ...}: written into every directory a command creates as its output
RUN_FILES = ("config.yaml",)  # a run directory: its resolved config beside its checkpoints or metrics
RUN_CONTENTS = ("checkpoints", "metrics.jsonl")
SCAN_LIMIT = 100_000  # directory entries looked at for run directories inside an output about to be replaced


class OutputError(ValueError):
    """An output this command may not write; the message names the paths and what to do instead."""


def is_run_dir(path: Path) -> bool:
    """A run directory of `earlybert train` or `finetune` (pipeline/run/rundir.py): config.yaml beside its
    checkpoints or its metrics."""
    path = Path(path)
    return all((path / f).is_file() for f in RUN_FILES) and any((path / c).exists() for c in RUN_CONTENTS)


def enclosing_run_dir(path: Path) -> Path | None:
    """The run directory `path` is or lies inside, if any."""
    for p in (path, *path.parents):
        if is_run_dir(p):
            return p
    return None


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _check_creatable(out: Path, output, option: str) -> None:
    """The nearest existing directory above `out` must be writable: otherwise the command would fail only when
    its work is done (a tokenizer trained for an hour, then a traceback)."""
    above = next((p for p in out.parents if p.exists() or p.is_symlink()), out)
    if not above.is_dir():
        raise OutputError(f"{option} {output} lies under {above}, which is not a directory; choose another {option}")
    if not os.access(above, os.W_OK | os.X_OK):
        raise OutputError(
            f"{option} {output}: cannot write in {above} (read-only filesystem or no permission); "
            f"choose another {option}"
        )


def check_output(output, inputs=(), option: str = "--output") -> Path:
    """Refuse (OutputError) an output that would overwrite or delete something the command did not write:
    an input, a run directory, or a file that is neither regular nor a directory. Returns the resolved path.
    Every command calls this before its work starts, so a slip of a path costs seconds, not a run."""
    out = Path(os.path.abspath(output))
    real = out.resolve()
    if out.exists() or out.is_symlink():
        mode = os.stat(out).st_mode if out.exists() else 0
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise OutputError(
                f"{option} {output} exists and is not a regular file or a directory (a device, FIFO, socket or "
                f"dangling link): it is never replaced; choose another {option}"
            )
    for given in inputs:
        if given is None or "://" in str(given) or str(given) == "-":  # URLs and stdin are not local paths
            continue
        inp = Path(given).resolve()
        if _inside(real, inp) or _inside(inp, real):
            relation = "is" if real == inp else ("lies inside" if _inside(real, inp) else "contains")
            raise OutputError(
                f"{option} {output} {relation} the input {given}: writing it would destroy the input; "
                f"choose an {option} outside every input"
            )
    run = enclosing_run_dir(real)
    if run is not None:
        raise OutputError(
            f"{option} {output} {'is' if run == real else 'lies inside'} the run directory {run}: "
            f"its checkpoints and metrics would be at risk; choose an {option} outside it"
        )
    _check_creatable(real, output, option)
    return real


def _contained_run_dir(directory: Path) -> Path | None:
    """A run directory somewhere below `directory` (at most SCAN_LIMIT entries looked at)."""
    seen = 0
    for root, dirs, _ in os.walk(directory):
        seen += len(dirs)
        if is_run_dir(Path(root)):
            return Path(root)
        if seen > SCAN_LIMIT:
            return directory  # too large to tell: treat as holding one, never delete it unseen
    return None


def written_by(directory: Path) -> str | None:
    """The command whose marker `directory` holds, or None."""
    try:
        return json.loads((Path(directory) / MARKER).read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def _tag(command: str) -> str:
    return command.replace("earlybert ", "").replace(" ", "-")


def _staging_prefix(output: Path, command: str) -> str:
    return f".{output.name}.{_tag(command)}-{socket.gethostname()}-"


def _file_prefix(path: Path) -> str:
    return f".{path.name}.{socket.gethostname()}-"


def temporary_file(path) -> Path:
    """Where atomic_write writes `path` before the rename: beside it, named after this host and process."""
    path = Path(path)
    return path.with_name(f"{_file_prefix(path)}{os.getpid()}.tmp")


def staging_dir(output, command: str) -> Path:
    """A fresh temporary directory beside `output` (same filesystem, so the final rename is atomic), named
    after this host and process. Leftovers of this command's interrupted runs beside it are swept first."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    sweep(output, command)
    tmp = output.parent / f"{_staging_prefix(output, command)}{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a dead process's of the same pid
    tmp.mkdir()
    (tmp / MARKER).write_text(json.dumps({"command": command}) + "\n")
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


def _leftovers(output: Path, prefix: str):
    """(path, suffix) of what dead processes of this host left beside `output`: `{prefix}{pid}.{tmp,old}`."""
    if not output.parent.is_dir():
        return
    for p in output.parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        pid, _, suffix = p.name[len(prefix) :].partition(".")
        if pid.isdigit() and suffix in ("tmp", "old") and int(pid) != os.getpid() and not _alive(int(pid)):
            yield p, suffix


def sweep(output, command: str) -> list[Path]:
    """Remove the temporary directories that this command's runs on this host left beside `output` when they
    were interrupted (their process is gone). Other hosts' and live processes' are left alone."""
    output = Path(output)
    removed = []
    for p, suffix in _leftovers(output, _staging_prefix(output, command)):
        if suffix == "old" and not output.exists():
            os.replace(p, output)  # interrupted between the two renames of replace_directory: put it back
        else:
            shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def sweep_files(path) -> list[Path]:
    """Remove the temporary files (temporary_file) that interrupted writes of `path` on this host left."""
    path = Path(path)
    removed = []
    for p, _ in _leftovers(path, _file_prefix(path)):
        if p.is_file() and not p.is_symlink():
            p.unlink()
            removed.append(p)
    return removed


def check_directory_output(output, inputs, command: str, overwrite: bool = False) -> Path:
    """check_output for a command whose output is a directory it writes whole (e.g. `earlybert export`), and
    the rule for an existing one: replaced only when `command` wrote it (its marker), when it is empty, or
    with overwrite, and never when it holds a run directory. Called before the work and again before the
    rename (replace_directory)."""
    out = check_output(output, inputs)
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"--output {output} exists and is not a directory; choose another --output")
        if any(out.iterdir()) and written_by(out) != command and not overwrite:
            raise OutputError(
                f"--output {output} exists and was not written by `{command}`: choose a new or empty "
                f"directory, or pass --overwrite to replace it"
            )
        if (run := _contained_run_dir(out)) is not None:
            raise OutputError(f"--output {output} holds the run directory {run}: it is never replaced")
    return out


def replace_directory(tmp: Path, output, inputs, command: str, overwrite: bool = False) -> None:
    """Put the finished `tmp` (from staging_dir) in place of `output`, by check_directory_output's rule."""
    output = check_directory_output(output, inputs, command, overwrite)
    if output.exists():
        old = output.parent / f"{_staging_prefix(output, command)}{os.getpid()}.old"
        os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, output)


def atomic_write(path, write) -> None:
    """Call write(file) on a temporary name next to `path`, fsync, then rename over `path`:
    a crash leaves either the old file or the new one, never a partial file under the real name. Only a
    regular file is ever replaced (this module): the rename would go over a FIFO or a device too."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not path.is_file():
        raise OutputError(
            f"{path} exists and is not a regular file (a directory, device, FIFO, socket or dangling link): "
            f"it is never replaced; choose another output path"
        )
    tmp = temporary_file(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, obj) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))
