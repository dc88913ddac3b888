"""The output policy (common/outputs.py): no command deletes or replaces what it did not write.

Unit cases of the policy on generated layouts, then `earlybert export` against the slips of a path that used to
delete a run (--output RUN, RUN/checkpoints, a folder of other files) and the leftovers of an interrupted export."""

import hashlib
import os
import shutil
import socket
import stat
import subprocess

import pytest

from common import outputs
from common.outputs import (
    OutputError,
    atomic_write,
    check_directory_output,
    check_output,
    replace_directory,
    staging_dir,
)
from runs import BIN

COMMAND = "earlybert export"


def tree_digest(root) -> dict:
    """Every file under root with its sha256: what must be left exactly as it was."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def fake_run(path):
    (path / "checkpoints").mkdir(parents=True)
    (path / "config.yaml").write_text("run_dir: .\n")
    (path / "metrics.jsonl").write_text('{"step": 1}\n')
    return path


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize(
    "relation, output, inputs",
    [
        ("is", "data", ["data"]),
        ("lies inside", "data/sub/out", ["data"]),
        ("contains", ".", ["data/corpus.txt"]),
        ("is", "data/corpus.txt", ["data/corpus.txt"]),
    ],
)
def test_an_output_overlapping_an_input_is_refused(tmp_path, relation, output, inputs):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "corpus.txt").write_text("text")
    with pytest.raises(OutputError, match=f"{relation} the input"):
        check_output(tmp_path / output, [tmp_path / i for i in inputs])
    assert (tmp_path / "data" / "corpus.txt").read_text() == "text"


def test_an_output_through_a_link_to_an_input_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "data")
    with pytest.raises(OutputError, match="lies inside the input"):
        check_output(tmp_path / "alias" / "out", [tmp_path / "data"])


@pytest.mark.parametrize("where", [".", "checkpoints", "checkpoints/step_00000003", "export"])
def test_an_output_in_a_run_directory_is_refused(tmp_path, where):
    run = fake_run(tmp_path / "run")
    with pytest.raises(OutputError, match="run directory"):
        check_output(run / where)


def test_special_files_are_never_replaced(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    for path in (fifo, dangling, "/dev/null"):
        with pytest.raises(OutputError, match="not a regular file"):
            check_output(path)
        with pytest.raises(OutputError, match="not a regular file"):
            atomic_write(path, lambda f: f.write(b"x"))
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and dangling.is_symlink()
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_a_directory_is_replaced_only_when_this_command_wrote_it(tmp_path):
    out = tmp_path / "models"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    tmp = staging_dir(out, COMMAND)
    (tmp / "model.safetensors").write_text("new")
    with pytest.raises(OutputError, match="was not written by `earlybert export`.*--overwrite"):
        replace_directory(tmp, out, [], COMMAND)
    assert (out / "notes.txt").read_text() == "mine"
    replace_directory(tmp, out, [], COMMAND, overwrite=True)
    assert (out / "model.safetensors").read_text() == "new" and not (out / "notes.txt").exists()
    # Now it carries the marker: the next export replaces it without --overwrite; another command's is refused.
    tmp = staging_dir(out, COMMAND)
    replace_directory(tmp, out, [], COMMAND)
    assert outputs.written_by(out) == COMMAND
    with pytest.raises(OutputError, match="was not written by `earlybert other`"):
        check_directory_output(out, [], "earlybert other")
    assert [p.name for p in tmp_path.iterdir()] == ["models"]  # no temporary folder left


def test_a_directory_holding_a_run_is_never_replaced(tmp_path):
    out = tmp_path / "results"
    fake_run(out / "deep" / "run")
    with pytest.raises(OutputError, match="holds the run directory"):
        check_directory_output(out, [], COMMAND, overwrite=True)
    assert (out / "deep" / "run" / "config.yaml").is_file()


def test_leftovers_of_interrupted_runs_are_swept_and_live_ones_kept(tmp_path):
    out = tmp_path / "model"
    prefix = f".model.export-{socket.gethostname()}-"
    dead, live = tmp_path / f"{prefix}{dead_pid()}.tmp", tmp_path / f"{prefix}{os.getppid()}.tmp"
    other_host = tmp_path / f".model.export-elsewhere-{dead_pid()}.tmp"
    for d in (dead, live, other_host):
        d.mkdir()
    tmp = staging_dir(out, COMMAND)
    assert not dead.exists() and live.exists() and other_host.exists() and tmp.is_dir()
    # Killed between the two renames of a replacement: the old output is put back, not deleted.
    shutil.rmtree(tmp)
    old = tmp_path / f"{prefix}{dead_pid()}.old"
    old.mkdir()
    (old / "weights").write_text("old")
    outputs.sweep(out, COMMAND)
    assert (out / "weights").read_text() == "old"


def export(run, *args):
    return subprocess.run(
        [str(BIN / "earlybert"), "export", str(run), *map(str, args)], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow  # the `reference` fixture trains a run
def test_export_never_destroys_what_it_did_not_write(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = tree_digest(run)
    for output, message in (
        (run, "is the input"),
        (run / "checkpoints", "lies inside the input"),
        (run / "export", "lies inside the input"),
        (tmp_path, "contains the input"),
    ):
        proc = export(run, "--output", output)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        proc = export(run, "--output", output, "--overwrite")
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert tree_digest(run) == before

    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "notes.md").write_text("three weeks of notes")
    proc = export(run, "--output", folder)
    assert proc.returncode == 2 and "was not written by `earlybert export`" in proc.stderr, proc.stderr[-2000:]
    assert (folder / "notes.md").read_text() == "three weeks of notes"

    # An interrupted export's temporary folder is swept by the next one; the export then replaces itself.
    out = tmp_path / "hf"
    leftover = tmp_path / f".hf.export-{socket.gethostname()}-{dead_pid()}.tmp"
    leftover.mkdir()
    for _ in range(2):
        proc = export(run, "--output", out)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "config.json").is_file() and not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "models", "run"]
    proc = export(run, "--output", folder, "--overwrite")
    assert proc.returncode == 0 and (folder / "config.json").is_file() and not (folder / "notes.md").exists()
    assert tree_digest(run) == before
