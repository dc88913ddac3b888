"""On-disk formats keep working: run directories written by an earlier version (tests/fixtures/v0_runs,
see its README) still resume to the same losses and ticket, and still export."""

import json
import shutil
import subprocess

import pytest

from runs import BIN, REPO, run_env

pytestmark = pytest.mark.slow  # launches ranks

FIXTURE = REPO / "tests" / "fixtures" / "v0_runs"
TWO_PHASES = "phases=[{shards: shards/seq32, steps: 4}, {shards: shards/seq32, steps: 4}]"


@pytest.fixture
def old_runs(tmp_path):
    shutil.copytree(FIXTURE, tmp_path, dirs_exist_ok=True)
    return tmp_path


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.parametrize("name, rewound", [("search", 7), ("drawn", 0)])
def test_an_old_run_resumes_to_the_same_losses_and_ticket(old_runs, name, rewound):
    """search: stopped mid-search (detector state and rewind weights of the old layout); drawn: after the draw.
    The search run rewinds as `after_draw: rewind` does now: its ticket (drawn at step 7) trains the whole
    schedule again from step 0's weights, 7 steps more than the old version trained; its constant learning
    rate makes the first 8 steps the old version's."""
    done = subprocess.run(
        [str(BIN / "python"), "-m", "pipeline.train", "--config", f"{name}.yaml", f"run_dir={name}_run", TWO_PHASES],
        cwd=old_runs,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed from" in done.stdout
    got, expected = (
        _lines(old_runs / f"{name}_run" / "metrics.jsonl"),
        _lines(old_runs / f"expected_{name}" / "metrics.jsonl"),
    )
    assert [g["step"] for g in got] == list(range(1, 9 + rewound))
    for g, e in zip(got, expected):
        for key in ("loss", "mlm_loss", "nsp_loss", "lr"):
            assert g[key] == pytest.approx(e[key], abs=1e-6), f"step {g['step']} {key}"
    ticket = json.loads((old_runs / f"{name}_run" / "ticket.json").read_text())
    want = json.loads((old_runs / f"expected_{name}" / "ticket.json").read_text())
    for key in ("draw_step", "forced", "kept_heads", "kept_neurons", "mask_digest"):
        assert ticket[key] == want[key], key


@pytest.mark.parametrize("name", ["search", "drawn"])
def test_an_old_run_exports(old_runs, name):
    out = old_runs / "export"
    done = subprocess.run(
        [str(BIN / "python"), "-m", "pipeline.cli", "export", f"{name}_run", "--output", str(out)],
        cwd=old_runs,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    config = json.loads((out / "config.json").read_text())
    architecture = json.loads(
        (old_runs / f"{name}_run" / "checkpoints" / "step_00000004" / "architecture.json").read_text()
    )
    assert config["num_hidden_layers"] == architecture["num_hidden_layers"]
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("name", ["search", "drawn"])
def test_an_old_run_reports(old_runs, name):
    """`earlybert report` reads an old run's metrics, config and ticket (the drawn run's ticket is in the report)."""
    done = subprocess.run(
        [str(BIN / "python"), "-m", "pipeline.cli", "report", f"{name}_run"],
        cwd=old_runs,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = (old_runs / f"{name}_run" / "report" / "report.md").read_text()
    assert f"| {name}_run (" in report and (("Ticket of" in report) == (name == "drawn"))
    assert (old_runs / f"{name}_run" / "report" / "loss.png").is_file()
