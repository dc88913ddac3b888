"""Where a run starts (`Start`), as both loops decide it from files before any process group or model exists
(pipeline/pretrain/start.py, pipeline/finetune/start.py): a fresh run at step 0, or the checkpoint resumed
(RUN/checkpoints/latest or `resume_from`, verified against its manifest: checkpoint.resume_tag), rebuilt with
its own architecture and, on another number of ranks, through DeepSpeed's universal checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import ConfigError, TrainingConfig, read_deepspeed, zero_stage
from pipeline.families import EncoderConfig
from pipeline.run.checkpoint import RunState

# How the model computes, not what: a relaunch may switch them with model.overrides (the checkpoint's own
# architecture.json is used otherwise).
EXECUTION_OPTIONS = ("unpad", "activation_checkpointing", "fused_qkv")


@dataclass
class Start:
    tag: str | None  # checkpoint resumed from; None for a fresh run
    state: RunState
    model_config: EncoderConfig


def execution_options(overrides: dict) -> dict:
    return {k: v for k, v in overrides.items() if k in EXECUTION_OPTIONS}


def resumes_on_other_ranks(cfg: TrainingConfig, start: Start, world_size: int) -> bool:
    """True when the checkpoint was written by another number of ranks: the resume then goes through
    DeepSpeed's universal checkpoint (ZeRO 1 and 2 only)."""
    state = start.state
    if start.tag is None or state.world_size == world_size:
        return False
    if 3 in (state.zero_stage, zero_stage(read_deepspeed(cfg))):
        raise ConfigError(
            f"{cfg.run_files.checkpoints / start.tag} was written by {state.world_size} ranks; resuming "
            f"on {world_size} goes through DeepSpeed's universal checkpoint, supported here for "
            f"ZeRO stages 1 and 2, not 3: relaunch on {state.world_size} ranks"
        )
    return True
