"""`earlybert report`'s dense reference in the structure figure and the report: the model the run built (issue 20
item 6), not the default preset, for a run started from a checkpoint."""

import json

import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.earlybert.detector import DetectorConfig
from pipeline.run.rundir import RunDir
from pipeline.tools.report import _dense_structure, distance_lines, run_detector, write_report

# all-MiniLM-L6-v2's uniform sizes, and a ticket of it: what a continued pre-training run from it records
MINILM = {"num_hidden_layers": 6, "hidden_size": 384, "num_attention_heads": 12, "intermediate_size": 1536}
TICKET_HEADS, TICKET_FFN = [8] * 6, [922] * 6


def make_run(path, model: dict, architecture: dict | None = None):
    """A run directory as `earlybert train` leaves it, with only what the report reads."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"model": model, "earlybert": {"mode": "earlybert"}}))
    records = [{"step": s, "loss": 5.0 - s / 10, "step_time_s": 0.5, "seq_per_s": 64.0} for s in range(1, 9)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ticket = {
        "mode": "earlybert",
        "draw_step": 4,
        "forced": False,
        "reason": "masks stable",
        "heads_per_layer": TICKET_HEADS,
        "ffn_per_layer": TICKET_FFN,
        "params_before": 22.7e6,
        "params_after": 17.0e6,
        "flops_per_sequence_before": 1.0,
        "flops_per_sequence_after": 0.7,
        "distance_history": [],
    }
    (path / "ticket.json").write_text(json.dumps(ticket))
    if architecture is not None:  # after the draw: the pruned per-layer sizes, the dense uniform ones kept
        folder = path / "checkpoints" / "step_00000008"
        folder.mkdir(parents=True)
        per_layer = {"num_heads_per_layer": TICKET_HEADS, "intermediate_size_per_layer": TICKET_FFN}
        (folder / "architecture.json").write_text(json.dumps({**architecture, **per_layer}))
    return path


def test_a_run_from_a_checkpoint_is_drawn_against_the_model_it_built(tmp_path):
    # config.yaml keeps the default preset (bert-tiny: 4 heads, FFN 256), which the run did not build
    run = make_run(tmp_path / "run", {"preset": "bert-tiny", "init_from": "/models/minilm"}, MINILM)
    assert _dense_structure(RunDir(run)) == (12, 1536, "checkpoints/step_00000008/architecture.json")
    md = write_report([run]).read_text()
    assert "dense: 12 heads and 1536 FFN neurons per layer (checkpoints/step_00000008/architecture.json)" in md


def test_a_run_from_a_checkpoint_without_checkpoints_left_draws_no_reference(tmp_path):
    run = make_run(tmp_path / "run", {"preset": "bert-tiny", "init_from": "/models/minilm"})
    assert _dense_structure(RunDir(run)) == (None, None, "no checkpoint records the model")


def test_a_run_from_a_preset_without_checkpoints_uses_the_preset_and_its_overrides(tmp_path):
    run = make_run(tmp_path / "run", {"preset": "bert-mini", "overrides": {"intermediate_size": 512}})
    assert _dense_structure(RunDir(run)) == (4, 512, "preset bert-mini")


HISTORY = [
    {"step": s, "head_distance": h, "ffn_distance": f, "combined_distance": c}
    for s, h, f, c in ((2, None, None, None), (4, 0.5, 0.2, 0.3), (6, 0.1, 0.05, 0.06))
]


def test_the_distance_figure_shows_what_the_detector_compared():
    """per_type: the head and FFN distances, each against its own epsilon; combined: the one mask of both against
    the one epsilon (the figure used to draw `epsilon` under per-type curves whatever the settings said)."""
    ticket = {"distance_history": HISTORY}
    curves, lines = distance_lines(ticket, DetectorConfig(head_epsilon=0.2, ffn_epsilon=0.05))
    assert list(curves) == ["heads (max over FIFO)", "FFN neurons (max over FIFO)"]
    assert curves["heads (max over FIFO)"] == ([4, 6], [0.5, 0.1]) and lines == {
        "head epsilon": 0.2,
        "FFN epsilon": 0.05,
    }
    curves, lines = distance_lines(ticket, DetectorConfig(criterion="combined", epsilon=0.07))
    assert curves == {"heads and FFN neurons (max over FIFO)": ([4, 6], [0.3, 0.06])} and lines == {"epsilon": 0.07}
    assert distance_lines(ticket, DetectorConfig())[1] == {"epsilon": 0.1}


def test_the_report_reads_the_detector_through_the_typed_config(tmp_path):
    """The run's config.yaml as written (a partial detector section: the defaults fill the rest); a misspelt key is
    named, not ignored; pre-training's detector counts the run's steps, fine-tuning's is derived from epochs."""
    run = make_run(tmp_path / "run", {"preset": "bert-tiny"})
    config = {"earlybert": {"detector": {"criterion": "combined", "epsilon": 0.2}}, "phases": []}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    detector, own_steps = run_detector(RunDir(run))
    assert (detector.criterion, detector.epsilon, detector.window, own_steps) == ("combined", 0.2, 5, True)
    config["earlybert"]["detector"]["epsilom"] = 0.3
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="epsilom"):
        run_detector(RunDir(run))
