"""`earlybert report RUN [RUN ...]`: RUN/report/report.md and PNG figures, read at a glance.

    loss.png          loss and MLM accuracy against step and against wall time, every run overlaid
    distances.png     head and FFN mask distances against step, epsilon and the draw step marked
    structure.png     kept heads per layer and FFN width per layer
    throughput.png    sequences/s against step, before and after pruning

The report goes into the first RUN (the others are overlaid for comparison, e.g. dense and
EarlyBERT). metrics.jsonl may repeat steps after a resume (the steps since the last checkpoint run
again): the last record of each step wins.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.outputs import atomic_write  # noqa: E402
from pipeline.config import from_dict  # noqa: E402
from pipeline.earlybert.detector import DetectorConfig, epsilons  # noqa: E402
from pipeline.run.command import EXIT_CONFIG, EXIT_FAULT  # noqa: E402
from pipeline.run.rundir import RunDir, RunDirError  # noqa: E402


def run_label(run: RunDir) -> str:
    mode = run.mode()
    return f"{run.path.name} ({mode})" if mode else run.path.name


def tail_mean(records: list[dict], key: str, n: int = 20) -> float | None:
    values = [r[key] for r in records[-n:] if key in r]
    return sum(values) / len(values) if values else None


def plot_curves(runs: list[tuple[str, list[dict], dict | None]], out: Path) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for label, records, ticket in runs:
        steps = [r["step"] for r in records]
        wall = [r["wall_s"] / 60 for r in records]
        for ax, x in ((axes[0][0], steps), (axes[0][1], wall)):
            ax.plot(x, [r["loss"] for r in records], label=label, linewidth=1)
        for ax, x in ((axes[1][0], steps), (axes[1][1], wall)):
            ax.plot(x, [r.get("mlm_acc", float("nan")) for r in records], label=label, linewidth=1)
        if ticket:
            for ax in (axes[0][0], axes[1][0]):
                ax.axvline(ticket["draw_step"], linestyle=":", color="gray")
    for ax, title, xlabel in (
        (axes[0][0], "loss", "step"),
        (axes[0][1], "loss", "wall time (min)"),
        (axes[1][0], "MLM accuracy", "step"),
        (axes[1][1], "MLM accuracy", "wall time (min)"),
    ):
        ax.set_title(f"{title} against {xlabel.split(' (')[0]}")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("training curves (dotted: ticket drawn)")
    return _save(fig, out / "loss.png")


def distance_lines(ticket: dict, detector: DetectorConfig | None) -> tuple[dict, dict]:
    """What the detector compared: {label: (steps, distances)} and {label: epsilon}. per_type: the head and the
    FFN masks' distances, each with its own epsilon; combined: the one mask of both, with the one epsilon."""
    combined = detector is not None and detector.criterion == "combined"
    keys = (
        {"heads and FFN neurons": "combined_distance"}
        if combined
        else {"heads": "head_distance", "FFN neurons": "ffn_distance"}
    )
    curves = {}
    for label, key in keys.items():
        history = [h for h in ticket.get("distance_history", []) if h.get(key) is not None]
        curves[f"{label} (max over FIFO)"] = ([h["step"] for h in history], [h[key] for h in history])
    if detector is None:
        return curves, {}
    if combined:
        return curves, {"epsilon": detector.epsilon}
    head_eps, ffn_eps = epsilons(detector)
    return curves, {"epsilon": head_eps} if head_eps == ffn_eps else {"head epsilon": head_eps, "FFN epsilon": ffn_eps}


def plot_distances(ticket: dict, detector: DetectorConfig | None, out: Path, search_bounds: bool = True) -> Path:
    """distances.png: distance_lines against step, the draw marked; search_bounds: min_search_steps and
    max_search_steps too (the detector's steps are the run's; fine-tuning derives them from epochs of its task)."""
    curves, thresholds = distance_lines(ticket, detector)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (label, (steps, distances)), marker in zip(curves.items(), "os"):
        ax.plot(steps, distances, marker=marker, label=label)
    for (name, value), style in zip(thresholds.items(), ("--", "-.")):
        ax.axhline(value, color="red", linestyle=style, label=f"{name} = {value}")
    if detector is not None and search_bounds:
        ax.axvline(detector.min_search_steps, color="gray", linestyle=":", label="min_search_steps")
        ax.axvline(detector.max_search_steps, color="gray", linestyle="-.", label="max_search_steps (forced)")
    forced = " (forced)" if ticket.get("forced") else ""
    ax.axvline(ticket["draw_step"], color="black", label=f"drawn at step {ticket['draw_step']}{forced}")
    ax.set_xlabel("step")
    ax.set_ylabel("normalized Hamming distance")
    ax.set_title(f"early-bird mask distances ({ticket['mode']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "distances.png")


def run_detector(run: RunDir) -> tuple[DetectorConfig | None, bool]:
    """The detector a run was configured with, through the typed config (defaults filled in), and whether its
    steps are the run's own (pre-training) rather than derived from epochs (fine-tuning); None without a config."""
    config = run.read_config() if run.config_file.is_file() else {}
    if not config:
        return None, False
    section = (config.get("earlybert") or {}).get("detector") or {}
    return from_dict(DetectorConfig, section, "earlybert.detector."), "phases" in config


def plot_structure(ticket: dict, dense_heads: int | None, dense_ffn: int | None, out: Path) -> Path:
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    layers = list(range(len(ticket["heads_per_layer"])))
    a.bar(layers, ticket["heads_per_layer"], color="tab:blue")
    b.bar(layers, ticket["ffn_per_layer"], color="tab:orange")
    if dense_heads:
        a.axhline(dense_heads, color="gray", linestyle="--", label=f"dense: {dense_heads}")
        a.legend()
    if dense_ffn:
        b.axhline(dense_ffn, color="gray", linestyle="--", label=f"dense: {dense_ffn}")
        b.legend()
    a.set_title("kept attention heads per layer")
    b.set_title("kept FFN neurons per layer")
    for ax in (a, b):
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
    return _save(fig, out / "structure.png")


def plot_throughput(runs: list[tuple[str, list[dict], dict | None]], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, records, ticket in runs:
        ax.plot([r["step"] for r in records], [r["seq_per_s"] for r in records], label=label, linewidth=1)
        if ticket:
            ax.axvline(ticket["draw_step"], linestyle=":", color="gray")
    ax.set_xlabel("step")
    ax.set_ylabel("sequences / s")
    ax.set_title("throughput (dotted: ticket drawn, pruned afterwards)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "throughput.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path


def throughput_split(records: list[dict], ticket: dict | None) -> tuple[float | None, float | None]:
    """Median sequences/s before and after the draw (skipping each side's first step: start-up, rebuild)."""
    if ticket is None:
        return statistics.median(r["seq_per_s"] for r in records[1:] or records), None
    before = [r["seq_per_s"] for r in records if r["step"] <= ticket["draw_step"]][1:]
    after = [r["seq_per_s"] for r in records if r["step"] > ticket["draw_step"] + 1]
    return (statistics.median(before) if before else None), (statistics.median(after) if after else None)


def model_rate(records: list[dict]) -> str:
    """Median model TFLOP/s and MFU over the steps but the first (start-up) as the training log computed them
    (pipeline/run/metrics.py model_flops and mfu: real tokens only); MFU only where the device's peak is known."""
    timed = records[1:] or records
    tflops = [r["tflops"] for r in timed if "tflops" in r]
    mfus = [r["mfu"] for r in timed if "mfu" in r]
    if not tflops:
        return "-"
    return f"{statistics.median(tflops):.3g}" + (f" ({100 * statistics.median(mfus):.1f}%)" if mfus else "")


def write_report(paths: list[Path]) -> Path:
    runs = [RunDir(p) for p in paths]
    loaded = [(run_label(r), _metrics(r), r.read_ticket()) for r in runs]
    out = runs[0].report
    out.mkdir(parents=True, exist_ok=True)
    figures = [plot_curves(loaded, out), plot_throughput(loaded, out)]
    md = [
        "# EarlyBERT run report",
        "",
        "| run | steps | wall time (min) | loss (last 20) | MLM acc (last 20) "
        "| draw step | params before -> after | FLOPs/seq after / before | seq/s before -> after draw "
        "| model TFLOP/s (MFU) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, records, ticket in loaded:
        before, after = throughput_split(records, ticket)
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        if ticket:
            draw = f"{ticket['draw_step']}{' (forced)' if ticket.get('forced') else ''}"
            params = f"{ticket['params_before'] / 1e6:.2f}M -> {ticket['params_after'] / 1e6:.2f}M"
            flops = f"{ticket['flops_per_sequence_after'] / ticket['flops_per_sequence_before']:.3f}"
        else:
            draw = params = flops = "-"
        md.append(
            f"| {label} | {records[-1]['step']} | {records[-1]['wall_s'] / 60:.2f} "
            f"| {fmt(tail_mean(records, 'loss'), '.4f')} "
            f"| {fmt(tail_mean(records, 'mlm_acc'), '.4f')} | {draw} | {params} | {flops} "
            f"| {fmt(before, '.1f')} -> {fmt(after, '.1f')} | {model_rate(records)} |"
        )
    ticket = loaded[0][2]
    if ticket:
        detector, own_steps = run_detector(runs[0])
        dense_heads, dense_ffn, source = _dense_structure(runs[0])
        figures += [
            plot_distances(ticket, detector, out, search_bounds=own_steps),
            plot_structure(ticket, dense_heads, dense_ffn, out),
        ]
        md += [
            "",
            f"Ticket of {loaded[0][0]}: drawn at step {ticket['draw_step']} ({ticket['reason']}); "
            f"heads per layer {ticket['heads_per_layer']}, FFN widths {ticket['ffn_per_layer']}; "
            f"dense: {dense_heads or '?'} heads and {dense_ffn or '?'} FFN neurons per layer ({source}).",
        ]
    md += [""] + [f"![{f.stem}]({f.name})" for f in figures]
    path = out / "report.md"
    atomic_write(path, lambda f: f.write(("\n".join(md) + "\n").encode()))
    return path


def _metrics(run: RunDir) -> list[dict]:
    """The run's records, each line checked first: a line cut short, edited by hand, or bytes that are not a
    metrics file are named, not a traceback."""
    if run.metrics_file.is_file():
        for number, line in enumerate(run.metrics_file.read_bytes().split(b"\n"), 1):
            if line.strip() and (problem := _record_problem(line)):
                raise RunDirError(f"{run.metrics_file}: line {number} {problem}; delete or repair it")
    return run.read_metrics()


def _record_problem(line: bytes) -> str | None:
    try:
        record = json.loads(line.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError and JSONDecodeError
        return "is not JSON"
    if not isinstance(record, dict) or type(record.get("step")) is not int:
        return "is not a metrics record (a JSON object with an integer step)"
    if not all(isinstance(record.get(k, 0.0), (int, float)) for k in ("loss", "mlm_acc", "step_time_s")):
        return "has a loss, mlm_acc or step_time_s that is not a number"
    return None


def _dense_structure(run: RunDir) -> tuple[int | None, int | None, str]:
    """The dense model's heads per layer and FFN width, for the structure figure, and where they come from: the
    model the run built, as its newest checkpoint's architecture.json records it (pruning changes the per-layer
    sizes only: num_attention_heads and intermediate_size stay the dense model's, in every family), else the
    preset of the config's model family (model.preset, the family's default where none) with its model.overrides.
    A run started from a model (model.init_from) without a checkpoint has no reference: its source may have
    changed since."""
    from pipeline.families import family_of
    from pipeline.pretrain.config import ModelConfig
    from pipeline.run.checkpoint import ARCHITECTURE

    recorded = sorted(run.checkpoints.glob(f"step_[0-9]*[0-9]/{ARCHITECTURE}"))  # not the set-aside ones
    if recorded:
        architecture = json.loads(recorded[-1].read_text())
        where = f"{recorded[-1].relative_to(run.path)}"
        return architecture.get("num_attention_heads"), architecture.get("intermediate_size"), where
    # the raw section: a fine-tuning run's model section is another dataclass's (FinetuneModelConfig)
    model = (run.read_config() if run.config_file.is_file() else {}).get("model") or {}
    family = family_of(model.get("family", ModelConfig.family))
    preset = model.get("preset") or family.default_preset
    if model.get("init_from") or preset not in family.presets:
        return None, None, "no checkpoint records the model"
    _, _, heads, ffn = family.presets[preset]
    overrides = model.get("overrides") or {}
    return (
        overrides.get("num_attention_heads", heads),
        overrides.get("intermediate_size", ffn),
        f"preset {preset}",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="earlybert report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories; the report is written into the first")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.runs)
    except (RunDirError, ValueError, yaml.YAMLError) as err:  # files missing, unreadable or malformed (ConfigError too)
        print(f"earlybert report: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as err:  # writing the report
        print(f"earlybert report: writing the report failed: {err}", file=sys.stderr)
        return EXIT_FAULT
    print(f"report: {path}")
    return 0
