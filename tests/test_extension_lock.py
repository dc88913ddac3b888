"""A launch killed (SIGKILL, the whole process group) while DeepSpeed builds deepspeed_shm_comm leaves torch's `lock`
file in the extensions cache; the next launch clears it with a message and finishes instead of waiting forever.
A lock that a live process still holds is waited for, not removed."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from runs import BIN, REPO, run_env, train_cmd

pytestmark = pytest.mark.slow
BUILD_S = 600  # the build takes ~20 s on an idle 2-core machine, minutes on a busy one


def launch(cmd, env) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def kill(proc) -> None:
    """SIGKILL the launch and everything it started (the compilers too), as a killed job step is."""
    with contextlib.suppress(ProcessLookupError):  # all gone already
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_a_launch_killed_during_the_extension_build_does_not_block_the_next(config, tmp_path):
    cache = tmp_path / "torch_extensions"  # empty: the build happens here, not in the project's cache
    env = {**run_env(), "TORCH_EXTENSIONS_DIR": str(cache)}
    cmd = [
        str(BIN / "python"),
        "-m",
        "pipeline.train",
        *train_cmd(config, tmp_path / "run", "phases.0.steps=2", "phases.1.steps=1"),
    ]
    first = launch(cmd, env)
    lock = cache / "deepspeed_shm_comm" / "lock"
    deadline = time.monotonic() + BUILD_S
    while not lock.exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
        time.sleep(0.05)
    time.sleep(2)  # the compilers are running
    kill(first)
    assert lock.exists() and not (lock.parent / "deepspeed_shm_comm.so").exists()

    second = launch(cmd, env)
    try:
        out = second.communicate(timeout=BUILD_S)[0]
    finally:
        kill(second)
    assert second.returncode == 0, out
    assert f"earlybert: removed {lock}, left by a torch extension build that was killed" in out
    assert "done: 3 steps" in out and not lock.exists()

    # A lock held open by a live process (another program building) is waited for; its holder removes it.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys, time; f = open(sys.argv[1], 'w'); "
            "print(flush=True); time.sleep(3); os.remove(sys.argv[1])",
            str(lock),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    holder.stdout.readline()
    build = subprocess.run(
        [str(BIN / "python"), "-c", "from pipeline.engine.distributed import build_extensions; build_extensions()"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=BUILD_S,
    )
    assert build.returncode == 0, build.stderr
    assert f"waiting for processes [{holder.pid}] building in {lock.parent}" in build.stderr
    assert "removed" not in build.stderr and holder.wait() == 0
