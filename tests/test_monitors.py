"""TensorBoard and W&B through MetricsLog: one writer per process, resumed runs logged once per step,
the W&B run kept across relaunches, the config as hyperparameters, and the optimizer's statistics."""

import json
import sys
import types

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.config import LogConfig
from pipeline.run.metrics import MetricsLog, optimizer_stats
from pipeline.run.rundir import RunDir
from runs import deepspeed, finish

CONFIG = {"seed": 7, "optim": {"lr": 0.001}}


def launch(rundir: RunDir, start_step: int, steps: range, offset: float, **log) -> None:
    """One launch of a run: a MetricsLog from `start_step`, logging `steps` with loss = step + offset."""
    rundir.path.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(
        rundir,
        LogConfig(interval=1000, **log),
        total_steps=100,
        start_step=start_step,
        config=CONFIG,
        monitor=None,
        is_main=True,
    )
    for step in steps:
        metrics.log({"step": step, "loss": step + offset, "skipped_steps": 0, "stage": "search"})
    metrics.close()


def scalars(rundir: RunDir, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(rundir.tensorboard))
    events.Reload()
    out = {}
    for e in events.Scalars(tag):
        assert e.step not in out, f"step {e.step} logged twice"
        out[e.step] = e.value
    return out


def test_tensorboard_after_a_resume_has_each_step_once(tmp_path, capsys):
    rundir = RunDir(tmp_path / "run")
    launch(rundir, 0, range(1, 9), 0.0)
    launch(rundir, 5, range(6, 11), 100.0)  # killed at 8, resumed from the checkpoint at 5
    expected = {s: float(s) for s in range(1, 6)} | {s: s + 100.0 for s in range(6, 11)}
    assert scalars(rundir, "Train/loss") == expected
    assert scalars(rundir, "Train/skipped_steps") == dict.fromkeys(range(1, 11), 0.0)
    assert [json.loads(line)["loss"] for line in rundir.metrics_file.read_text().splitlines()] == list(
        expected.values()
    )
    events = EventAccumulator(str(rundir.tensorboard), size_guidance={"tensors": 0})
    events.Reload()
    assert b"lr: 0.001" in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0]


class FakeWandb:
    """The part of the wandb module MetricsLog uses, recording what it is given."""

    def __init__(self):
        self.inits, self.logged, self.configs = [], [], []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        run = types.SimpleNamespace(id=kwargs["id"], step=0, finish=lambda: None)
        run.config = types.SimpleNamespace(update=lambda c, allow_val_change: self.configs.append(c))

        def log(data, step):
            assert step >= run.step
            self.logged.append((step, data))
            run.step = step + 1

        run.log = log
        return run


def test_wandb_run_id_is_kept_and_replayed_steps_are_not_sent_twice(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    rundir = RunDir(tmp_path / "run")
    launch(rundir, 0, range(1, 5), 0.0, tensorboard=False, wandb=True, wandb_project="p")
    run_id = rundir.wandb_id_file.read_text()
    second = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", second)
    launch(rundir, 0, range(1, 3), 0.0, tensorboard=False, wandb=True, wandb_project="p")
    assert len(run_id) == 16 and fake.inits[0]["id"] == second.inits[0]["id"] == run_id
    assert fake.inits[0]["resume"] == "allow" and fake.inits[0]["project"] == "p"
    assert fake.configs == [CONFIG] and [s for s, _ in fake.logged] == [1, 2, 3, 4]
    assert fake.logged[0][1] == {"train/loss": 1.0, "train/skipped_steps": 0}


def test_wandb_offline_resumes_the_same_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    rundir = RunDir(tmp_path / "run")
    launch(rundir, 0, range(1, 4), 0.0, tensorboard=False, wandb=True)
    launch(rundir, 2, range(3, 6), 0.0, tensorboard=False, wandb=True)
    run_id = rundir.wandb_id_file.read_text()
    offline = sorted((rundir.path / "wandb").glob("offline-run-*"))
    # wandb names a resumed offline run like the first, with "-1" appended: the same run id in both
    assert len(offline) == 2 and all(run_id in p.name for p in offline)
    assert wandb.run is None  # finished


def test_optimizer_stats():
    optimizer = types.SimpleNamespace(loss_scale=65536.0)
    engine = types.SimpleNamespace(
        skipped_steps=2, get_global_grad_norm=lambda: 1.5, fp16_enabled=lambda: True, optimizer=optimizer
    )
    assert optimizer_stats(engine) == {"skipped_steps": 2, "grad_norm": 1.5, "loss_scale": 65536.0}
    engine.fp16_enabled, engine.get_global_grad_norm = (lambda: False), (lambda: None)
    assert optimizer_stats(engine) == {"skipped_steps": 2}


@pytest.mark.slow
def test_one_tensorboard_writer_across_the_draw(config, tmp_path):
    """A real run that draws its ticket at step 4 and rebuilds the engine: one events file, every step
    once, with the gradient norm in metrics.jsonl and TensorBoard."""
    run_dir = tmp_path / "run"
    code, out = finish(deepspeed(config, run_dir, "earlybert.mode=fixed", "earlybert.draw_step=4", ranks=1))
    assert code == 0, out
    rundir = RunDir(run_dir)
    assert rundir.ticket_file.is_file() and len(list(rundir.tensorboard.glob("events.*"))) == 1
    records = rundir.read_metrics()
    assert all(r["grad_norm"] > 0 and r["skipped_steps"] == 0 for r in records)
    assert scalars(rundir, "Train/grad_norm") == pytest.approx({r["step"]: r["grad_norm"] for r in records})


def test_a_missing_monitor_package_is_said_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    rundir = RunDir(tmp_path / "run")
    launch(rundir, 0, range(1, 3), 0.0, tensorboard=False, wandb=True)
    assert "log.wandb: not installed (pip install 'earlybert[wandb]')" in capsys.readouterr().err
    assert len(rundir.metrics_file.read_text().splitlines()) == 2 and not rundir.wandb_id_file.exists()
