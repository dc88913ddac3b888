"""RUN/, the run directory: every path and file format of a run, in one place.

    RUN/config.yaml                 the resolved config of the latest launch, overrides included
    RUN/metrics.jsonl               one line per optimizer step (appended by pipeline/run/metrics.py)
    RUN/ticket.json                 the early-bird ticket, once drawn
    RUN/start_weights.safetensors   the full fp32 weights of the rewind step, for `after_draw: rewind`
    RUN/checkpoints/                DeepSpeed checkpoints; their inner layout is pipeline/run/checkpoint.py's
    RUN/tensorboard/                TensorBoard events (pipeline/run/metrics.py)
    RUN/wandb_id, RUN/wandb/        the W&B run id (every relaunch logs into the same W&B run), W&B's files
    RUN/eval.jsonl, RUN/results.json   fine-tuning: evaluations during the run, final and best metrics
    RUN/tokenizer/                  fine-tuning: the tokenizer the run tokenized its task with
    RUN/report/                     `earlybert report`

Every file is written atomically (a temporary name, then a rename): a crash leaves the old file or
the new one, never half of one. Training, report, export, eval, the benchmarks and the tests all
read runs through `RunDir`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from common.outputs import atomic_write, write_json


class RunDirError(RuntimeError):
    """A run directory that lacks what is asked of it; the message says which file and what to do."""


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    # ---- paths -------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def ticket_file(self) -> Path:
        return self.path / "ticket.json"

    @property
    def start_weights_file(self) -> Path:
        return self.path / "start_weights.safetensors"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def wandb_id_file(self) -> Path:
        return self.path / "wandb_id"

    @property
    def eval_file(self) -> Path:
        return self.path / "eval.jsonl"

    @property
    def results_file(self) -> Path:
        return self.path / "results.json"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer"

    def tokenizer_file(self) -> Path:
        """The tokenizer.json of the run: its own (fine-tuning), or the one beside its shards (pre-training)."""
        own = self.tokenizer / "tokenizer.json"
        return own if own.is_file() else self.shards(0) / "tokenizer.json"

    @property
    def report(self) -> Path:
        return self.path / "report"

    # ---- the resolved config -----------------------------------------------------------------
    def write_config(self, config: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(config, sort_keys=False)
        atomic_write(self.config_file, lambda f: f.write(text.encode()))

    def read_config(self) -> dict:
        """The raw mapping of RUN/config.yaml (a run config, or a fine-tuning config)."""
        if not self.config_file.is_file():
            raise RunDirError(
                f"{self.config_file} not found: is {self.path} a run directory written by "
                f"`earlybert train` or `earlybert finetune`?"
            )
        return yaml.safe_load(self.config_file.read_text()) or {}

    def shards(self, phase: int = 0) -> Path:
        """The shard directory a pre-training run trained on in `phase`."""
        return Path(self.read_config()["phases"][phase]["shards"])

    def mode(self) -> str | None:
        """earlybert, fixed, random or dense; None where no config was written."""
        if not self.config_file.is_file():
            return None
        return (self.read_config().get("earlybert") or {}).get("mode")

    def preset(self) -> str | None:
        if not self.config_file.is_file():
            return None
        return (self.read_config().get("model") or {}).get("preset")

    # ---- metrics -----------------------------------------------------------------------------
    def read_metrics(self) -> list[dict]:
        """One record per step, in step order; "wall_s" added: training time up to that step.

        After a resume the steps since the last checkpoint are logged again (metrics.py truncates the
        file at the resumed step), and a record of a step seen twice is the later one."""
        if not self.metrics_file.is_file():
            raise RunDirError(f"{self.metrics_file} not found: is {self.path} a run directory of `earlybert train`?")
        by_step = {}
        for line in self.metrics_file.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                by_step[record["step"]] = record
        if not by_step:
            raise RunDirError(f"{self.metrics_file} has no records yet")
        records = [by_step[s] for s in sorted(by_step)]
        elapsed = 0.0
        for r in records:  # wall time of training, without start-up and replayed steps
            elapsed += r.get("step_time_s", 0.0)
            r["wall_s"] = elapsed
        return records

    # ---- the ticket --------------------------------------------------------------------------
    def write_ticket(self, record: dict) -> None:
        # One key per line, each value on its line: readable, and the id lists stay compact.
        text = "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in record.items()) + "\n}\n"
        atomic_write(self.ticket_file, lambda f: f.write(text.encode()))

    def read_ticket(self) -> dict | None:
        return json.loads(self.ticket_file.read_text()) if self.ticket_file.is_file() else None

    # ---- rewind weights ----------------------------------------------------------------------
    def save_start_weights(self, weights: dict, step: int = 0) -> None:
        from safetensors.torch import save

        blob = save({k: v.contiguous() for k, v in weights.items()}, metadata={"step": str(step)})
        atomic_write(self.start_weights_file, lambda f: f.write(blob))

    def load_start_weights(self, step: int = 0) -> dict:
        """The weights saved at `step` (files without a step, written by earlier versions, hold step 0)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        if not self.start_weights_file.is_file():
            raise RunDirError(
                f"{self.start_weights_file} not found: `after_draw: rewind` needs the weights of the rewind "
                f"step, saved when the run passes it; this run was started without rewind"
            )
        with safe_open(self.start_weights_file, "pt") as f:
            saved = int((f.metadata() or {}).get("step", 0))
        if saved != step:
            raise RunDirError(
                f"{self.start_weights_file} holds the weights of step {saved}, not of earlybert.rewind_step "
                f"{step}: keep the rewind_step the run was started with"
            )
        return load_file(self.start_weights_file)

    # ---- fine-tuning results -----------------------------------------------------------------
    def append_eval(self, record: dict) -> None:
        """One evaluation; the file is rewritten whole (it is short), so a crash never leaves half a line."""
        lines = self.eval_file.read_text() if self.eval_file.is_file() else ""
        atomic_write(self.eval_file, lambda f: f.write((lines + json.dumps(record) + "\n").encode()))

    def read_evals(self) -> list[dict]:
        if not self.eval_file.is_file():
            return []
        return [json.loads(x) for x in self.eval_file.read_text().splitlines() if x.strip()]

    def write_results(self, results: dict) -> None:
        write_json(self.results_file, results)

    def read_results(self) -> dict | None:
        return json.loads(self.results_file.read_text()) if self.results_file.is_file() else None
