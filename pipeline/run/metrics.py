"""RUN/metrics.jsonl (one line per optimizer step), the progress line, TensorBoard and W&B.

Only rank 0 writes. Values are global: losses and accuracy averaged over every rank's
micro-batches, throughput for the whole job, MFU against the sum of the devices' peaks.

Model FLOPs and MFU have one definition here (`model_flops`, `mfu`), used by the training log, the report and
the benchmarks: the matrix multiplies of the real tokens (padding is not counted) with the run's per-layer
structure, attention over each sequence's own tokens (within the window on ModernBERT's sliding-window layers),
and the MLM head on the masked positions only, as training runs it (`masked_logits_only`).

MetricsLog owns the TensorBoard writer and the W&B run for the whole process, so the engine rebuilt
at the draw changes nothing. A relaunch that resumes at step S redoes the steps after S: metrics.jsonl
is cut at S, TensorBoard purges its events after S (`purge_step`), and W&B resumes the run whose id
is kept in RUN/wandb_id (W&B keeps the first logging of a replayed step; a resume is exact, so the
values are the same). The resolved config goes to both as hyperparameters.
"""

from __future__ import annotations

import importlib
import json
import math
import secrets
import sys
import time
from pathlib import Path

import torch
import yaml

from common.outputs import atomic_write
from pipeline.families import family_of
from pipeline.modernbert import window_pairs
from pipeline.run.rundir import RunDir

# Dense bf16/fp16 tensor-core peak TFLOP/s per device, by name; the more specific names come first.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
)


def model_flops(config, tokens: float, token_pairs: float, masked: float, window_pairs: float | None = None) -> float:
    """Training FLOPs (forward + backward = 3x forward) of `tokens` real tokens, counting matrix multiplies.

    Per layer and token: the attention projections (Q, K, V, W_O) and the FFN's matrices (BERT's two; the three
    of ModernBERT's GLU), at the layer's own head count and FFN width (`config`: a BERT or ModernBERT config,
    pruned or not: its family's FlopCounts, pipeline/families.py). The two attention products (scores and
    weighted values) cost per query-key pair, and a token attends to the tokens of its own sequence: `token_pairs`
    is the sum over sequences of length^2 (global attention); a sliding-window layer's pairs are `window_pairs`
    (the pairs within the window, summed over sequences: ModernBERT's output reports them; required where the model
    has such layers). The MLM head's transform and vocabulary projection run on the `masked` positions only.
    Embedding look-ups, LayerNorms, the pooler and NSP head are left out (< 0.1%).
    """
    counts = family_of(config).flop_counts(config)
    if counts.per_window_pair and window_pairs is None:
        raise ValueError("model_flops: this model has sliding-window layers; pass their window_pairs")
    attention = counts.per_pair * token_pairs + counts.per_window_pair * (window_pairs or 0.0)
    return 3.0 * (counts.per_token * tokens + attention + counts.per_masked * masked)


def flops_per_sequence(config, seq_len: int, masked_fraction: float = 0.15) -> float:
    """model_flops of one full sequence of seq_len tokens with the masked_fraction of them masked: the planning
    figure of a structure (the ticket's FLOPs before and after the draw)."""
    half = family_of(config).flop_counts(config).half_window
    return model_flops(config, seq_len, seq_len**2, masked_fraction * seq_len, window_pairs(seq_len, half))


def batch_model_flops(config, attention_mask: torch.Tensor, labels: torch.Tensor) -> float:
    """model_flops of one micro-batch from its (B, T) attention mask and MLM labels, for the benchmarks (training
    sums what the model reports of each micro-batch: token_count, token_pairs, window_pairs, mlm_count)."""
    lengths = attention_mask.sum(1).double()
    half = family_of(config).flop_counts(config).half_window
    pairs = float(window_pairs(lengths, half).sum())
    return model_flops(config, float(lengths.sum()), float((lengths**2).sum()), float((labels != -100).sum()), pairs)


def mfu(flops: float, seconds: float, peak_tflops: float | None, devices: int = 1) -> float | None:
    """Model FLOPs utilisation: model_flops done in `seconds` over the devices' summed peak (None: peak unknown)."""
    return flops / seconds / (peak_tflops * 1e12 * devices) if peak_tflops else None


def device_peak_tflops(device: torch.device, precision: str) -> float | None:
    """Per-device peak for MFU, or None where unknown (CPUs, fp32, unlisted GPUs)."""
    if device.type != "cuda" or precision == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def truncate_after(path: Path, step: int) -> None:
    """Drop lines logged after `step`: steps redone after a resume are logged again, once. A line that is not a
    record (the last one torn by a crash while it was appended) is dropped too, with a message: the resumed run
    logs its step again. Rewritten atomically: a crash here leaves the file as it was."""
    if not path.is_file():
        return
    kept = []
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        try:
            record = json.loads(line.decode("utf-8")) if line.strip() else None
            if record is not None and record["step"] <= step:
                kept.append(line + b"\n")
        except (ValueError, TypeError, KeyError) as err:  # not UTF-8, not JSON, not a record
            print(f"earlybert: {path}: line {number} is not a metrics record ({err}); dropped", file=sys.stderr)
    atomic_write(path, lambda f: f.writelines(kept))


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def optimizer_stats(engine) -> dict:
    """The DeepSpeed engine's view of the step: gradient norm before clipping (where DeepSpeed computes it),
    fp16 loss scale, steps skipped on fp16 overflow since the engine was built or loaded."""
    r = {"skipped_steps": engine.skipped_steps}
    norm = engine.get_global_grad_norm()
    if norm is not None:
        r["grad_norm"] = float(norm)
    if engine.fp16_enabled():
        r["loss_scale"] = float(engine.optimizer.loss_scale)
    return r


class MetricsLog:
    """`log` is the run config's LogConfig; `config` the resolved config, logged as hyperparameters;
    `monitor` DeepSpeed's, for monitors the DeepSpeed JSON itself enables (csv_monitor, comet)."""

    def __init__(self, rundir: RunDir, log, *, total_steps: int, start_step: int, config: dict, monitor, is_main: bool):
        self.path = rundir.metrics_file
        self.total, self.start_step, self.interval = total_steps, start_step, log.interval
        self.monitor, self.is_main = monitor, is_main
        self.tensorboard = self.wandb = None
        self.t0 = time.perf_counter()
        if not is_main:
            return
        truncate_after(self.path, start_step)
        self.file = open(self.path, "a", buffering=1)
        if log.tensorboard:
            self.tensorboard = open_tensorboard(rundir.tensorboard, start_step, config)
        if log.wandb:
            self.wandb = open_wandb(rundir, log.wandb_project, config)

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        self.file.write(json.dumps(record) + "\n")
        step = record["step"]
        scalars = {
            k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if self.tensorboard is not None:
            for k, v in scalars.items():
                self.tensorboard.add_scalar(f"Train/{k}", v, step)
        if self.wandb is not None and step >= self.wandb.step:  # below: a replayed step W&B has already
            self.wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)
        if self.monitor is not None and self.monitor.enabled:
            self.monitor.write_events([(f"Train/{k}", float(v), step) for k, v in scalars.items()])
        if step % self.interval == 0 or step == self.total:
            print(self.progress_line(record), flush=True)

    def progress_line(self, r: dict) -> str:
        """step, where it is (pre-training phase or fine-tuning stage), loss, rates, ETA: the fields the
        record has."""
        done = r["step"] - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - r["step"]) if done else math.nan
        parts = [f"step {r['step']}/{self.total}"]
        if "seq_len" in r:
            parts.append(f"phase {r['phase']} (seq {r['seq_len']})")
        if "stage" in r:
            parts.append(f"stage {r['stage']} (epoch {r['epoch']:.2f})")
        parts.append(f"loss {r['loss']:.4f}")
        if "mlm_acc" in r:
            parts.append(f"mlm acc {r['mlm_acc']:.3f}")
        parts += [f"lr {r['lr']:.2e}", f"{r['seq_per_s']:.1f} seq/s"]
        if "tokens_per_s" in r:
            parts += [f"{r['tokens_per_s']:.0f} tok/s", f"{r['tflops']:.3g} TFLOP/s"]
        if "mfu" in r:
            parts.append(f"MFU {100 * r['mfu']:.1f}%")
        if "data_wait_s" in r:
            parts.append(f"data {100 * r['data_wait_s'] / r['step_time_s']:.1f}%")
        parts.append(f"ETA {_duration(eta) if done else '?'}")
        return " | ".join(parts)

    def close(self) -> None:
        if not self.is_main:
            return
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def open_tensorboard(directory: Path, start_step: int, config: dict):
    """A SummaryWriter on RUN/tensorboard that hides the events a previous launch wrote after `start_step`."""
    tensorboard = _optional("torch.utils.tensorboard", "log.tensorboard", "tensorboard")
    if tensorboard is None:
        return None
    writer = tensorboard.SummaryWriter(str(directory), purge_step=start_step + 1 if start_step else None)
    writer.add_text("config", _as_markdown_code(config), start_step)
    return writer


def open_wandb(rundir: RunDir, project: str, config: dict):
    """The W&B run of this run directory: created on the first launch, resumed on every later one."""
    wandb = _optional("wandb", "log.wandb", "'earlybert[wandb]'")
    if wandb is None:
        return None
    id_file = rundir.wandb_id_file
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(8)
    run = wandb.init(project=project, id=run_id, resume="allow", dir=str(rundir.path), name=rundir.path.name)
    run.config.update(config, allow_val_change=True)
    if not id_file.is_file():
        atomic_write(id_file, lambda f: f.write(run_id.encode()))
    return run


def _optional(module: str, key: str, package: str):
    """The module, or None (and a note) where its package is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError:
        print(
            f"{key}: not installed (pip install {package}); metrics go to metrics.jsonl and the other monitors only",
            file=sys.stderr,
        )
        return None


def _as_markdown_code(config: dict) -> str:
    """TensorBoard renders text as Markdown: an indented block keeps the YAML as it is."""
    return "".join(f"    {line}\n" for line in yaml.safe_dump(config, sort_keys=False).splitlines())
