"""RUN/metrics.jsonl (one line per optimizer step), the progress line, and DeepSpeed's monitor.

Only rank 0 writes. Values are global: losses and accuracy averaged over every rank's
micro-batches, throughput for the whole job, MFU against the sum of the devices' peaks.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

# Dense bf16/fp16 tensor-core peak TFLOP/s per device, by name; the more specific names come first.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
               ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0))


def device_peak_tflops(device: torch.device, precision: str) -> float | None:
    """Per-device peak for MFU, or None where unknown (CPUs, fp32, unlisted GPUs)."""
    if device.type != "cuda" or precision == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def truncate_after(path: Path, step: int) -> None:
    """Drop lines logged after `step`: steps redone after a resume are logged again, once."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in lines))


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class MetricsLog:
    def __init__(self, path: Path, *, total_steps: int, start_step: int, interval: int, monitor, is_main: bool):
        self.path = Path(path)
        self.total, self.start_step, self.interval = total_steps, start_step, interval
        self.monitor, self.is_main = monitor, is_main
        self.t0 = time.perf_counter()
        if is_main:
            truncate_after(self.path, start_step)
            self.file = open(self.path, "a", buffering=1)

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        self.file.write(json.dumps(record) + "\n")
        step = record["step"]
        if self.monitor is not None and self.monitor.enabled:
            self.monitor.write_events([(f"Train/{k}", v, step) for k, v in record.items()
                                       if k != "step" and isinstance(v, float)])
        if step % self.interval == 0 or step == self.total:
            print(self.progress_line(record), flush=True)

    def progress_line(self, r: dict) -> str:
        done = r["step"] - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - r["step"]) if done else math.nan
        parts = [f"step {r['step']}/{self.total}", f"phase {r['phase']} (seq {r['seq_len']})",
                 f"loss {r['loss']:.4f}", f"mlm acc {r['mlm_acc']:.3f}", f"lr {r['lr']:.2e}",
                 f"{r['seq_per_s']:.1f} seq/s", f"{r['tokens_per_s']:.0f} tok/s"]
        parts.append(f"{r['tflops']:.3g} TFLOP/s")
        if "mfu" in r:
            parts.append(f"MFU {100 * r['mfu']:.1f}%")
        parts.append(f"data {100 * r['data_wait_s'] / r['step_time_s']:.1f}%")
        parts.append(f"ETA {_duration(eta) if done else '?'}")
        return " | ".join(parts)

    def close(self) -> None:
        if self.is_main:
            self.file.close()

