"""Checkpoints: DeepSpeed's files plus the project's own state, in RUN/checkpoints/<tag>/.

    RUN/checkpoints/latest                the newest complete tag; written last, atomically
    RUN/checkpoints/step_00001000/
        run_state.json                    RunState (rank 0)
        architecture.json                 the model config with its per-layer structure (rank 0)
        rng_rank{r}.safetensors           torch RNG states of rank r (dropout)
        mp_rank_00_model_states.pt ...    DeepSpeed's model and per-rank optimizer states
        universal/                        DeepSpeed universal checkpoint, made on demand to resume
                                          on another number of ranks

The project's files are JSON and safetensors, never pickles. DeepSpeed's own files are pickles:
they are only ever loaded from the run's own checkpoint directory. run_state.json and
architecture.json are read before the model exists, so a pruned (smaller) model is rebuilt with
the right shapes before DeepSpeed loads into it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from data_prep.shards import atomic_write, write_json
from pipeline import distributed

LATEST = "latest"
RUN_STATE = "run_state.json"
ARCHITECTURE = "architecture.json"
UNIVERSAL = "universal"
CLIENT_KEY = "earlybert"  # the one key of DeepSpeed's client_state that holds the project's state


class CheckpointError(RuntimeError):
    pass


RUN_STATE_FORMAT = 2  # 1 (no "format" key): the search stage's state was under "extra"


@dataclass
class RunState:
    """What the loop needs, besides DeepSpeed's engine state, to continue exactly where it stopped."""

    format: int = RUN_STATE_FORMAT
    step: int = 0  # optimizer steps done
    samples: int = 0  # samples consumed, all phases
    phase: int = 0  # index into the run config's phases
    phase_samples: int = 0  # samples consumed in the current phase: its stream position
    world_size: int = 1  # ranks that wrote the checkpoint
    zero_stage: int = 0
    tokenizer_hash: str = ""  # of the shards trained on; another tokenizer's shards are refused
    search: dict = field(default_factory=dict)  # SearchStage.state_dict(): detector state, ticket; JSON-able
    task: dict = field(default_factory=dict)  # fine-tuning: the stage of the recipe, best metrics; JSON-able

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: Path) -> "RunState":
        data = dict(data)
        if "format" not in data:  # format 1: the search stage's state under "extra", with the same keys
            data["format"], data["search"] = RUN_STATE_FORMAT, data.pop("extra", {})
        if data["format"] > RUN_STATE_FORMAT:
            raise CheckpointError(f"{where}: run state format {data['format']} is newer than this version reads "
                                  f"({RUN_STATE_FORMAT}); update the project")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise CheckpointError(f"{where}: unknown fields {sorted(unknown)} (written by a newer version?)")
        return cls(**data)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _step_of(tag: str) -> int | None:
    prefix, _, digits = tag.partition("_")
    return int(digits) if prefix == "step" and digits.isdigit() else None


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag `latest` names, or None for a fresh run."""
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not (Path(ckpt_dir) / tag / RUN_STATE).is_file():
        raise CheckpointError(f"{path} names {tag!r}, which has no {RUN_STATE}: the checkpoint directory was "
                              f"changed by hand; point `latest` at a complete step_* folder")
    return tag


def read_tag(ckpt_dir: Path, tag: str) -> tuple[RunState, dict]:
    """(run state, architecture) of a checkpoint, without touching DeepSpeed's pickles."""
    folder = Path(ckpt_dir) / tag
    state = RunState.from_dict(json.loads((folder / RUN_STATE).read_text()), folder / RUN_STATE)
    return state, json.loads((folder / ARCHITECTURE).read_text())


def save(engine, ckpt_dir: Path, state: RunState, architecture: dict, dist_info, keep: int) -> str:
    """Save on all ranks (a collective). `latest` moves to the new tag only once every rank's files
    are written, so a crash at any point leaves the previous checkpoint as the one resumed from."""
    ckpt_dir, tag = Path(ckpt_dir), tag_for(state.step)
    folder = ckpt_dir / tag
    if latest_tag(ckpt_dir) == tag:  # on every rank, so that all of them stop
        raise CheckpointError(f"{folder} is the latest checkpoint already; refusing to overwrite it")
    if dist_info.is_main:
        if folder.exists():  # left by a save that crashed before `latest` named it
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        write_json(folder / RUN_STATE, state.to_dict())
        write_json(folder / ARCHITECTURE, architecture)
    distributed.barrier()
    save_file(_rng_state(), str(folder / f"rng_rank{dist_info.rank}.safetensors"))
    engine.save_checkpoint(str(ckpt_dir), tag, client_state={CLIENT_KEY: state.to_dict()}, save_latest=False)
    distributed.barrier()  # every rank's DeepSpeed files are on disk
    if dist_info.is_main:
        atomic_write(ckpt_dir / LATEST, lambda f: f.write(tag.encode()))
        _fsync_dir(ckpt_dir)
        remove_old(ckpt_dir, keep)
    return tag


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_old(ckpt_dir: Path, keep: int) -> None:
    """Delete old checkpoints: keep the newest `keep` tags up to `latest`; tags after it are leftovers of crashed saves."""
    last = _step_of(latest_tag(ckpt_dir))
    tags = sorted((s, p) for p in Path(ckpt_dir).iterdir() if p.is_dir() and (s := _step_of(p.name)) is not None)
    kept = [p for s, p in tags if s <= last][-keep:]
    for _, p in tags:
        if p not in kept:
            shutil.rmtree(p, ignore_errors=True)


def make_universal(ckpt_dir: Path, tag: str, dist_info) -> None:
    """Convert a tag to DeepSpeed's universal format (once, on rank 0) so that it loads on any number
    of ranks; the conversion goes to a temporary folder renamed when complete."""
    folder = Path(ckpt_dir) / tag
    if dist_info.is_main and not (folder / UNIVERSAL).is_dir():
        tmp = folder / f"{UNIVERSAL}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(folder),
               "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1",
               # DeepSpeed asks models outside Megatron to declare universal-checkpoint info; plain
               # data parallelism needs none beyond the version it injects.
               "--inject_missing_state"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise CheckpointError(f"converting {folder} to a universal checkpoint failed:\n{done.stdout[-3000:]}"
                                  f"\n{done.stderr[-3000:]}")
        (folder / "latest_universal").unlink(missing_ok=True)  # names the temporary folder
        tmp.rename(folder / UNIVERSAL)
    distributed.barrier()


def load(engine, ckpt_dir: Path, tag: str, state: RunState, dist_info, universal: bool) -> None:
    """Load DeepSpeed's engine state (weights, optimizer, LR schedule) and this rank's RNG state."""
    load_dir, load_tag = (Path(ckpt_dir) / tag, UNIVERSAL) if universal else (Path(ckpt_dir), tag)
    path, client = engine.load_checkpoint(str(load_dir), load_tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:  # DeepSpeed only warns when it finds nothing to load
        raise CheckpointError(f"DeepSpeed found no checkpoint to load in {load_dir / load_tag}")
    saved = (client or {}).get(CLIENT_KEY, {})
    if saved.get("step") != state.step:
        raise CheckpointError(f"{load_dir / load_tag}: DeepSpeed's files are from step {saved.get('step')}, "
                              f"{RUN_STATE} from step {state.step}; the folder mixes two saves")
    rng = Path(ckpt_dir) / tag / f"rng_rank{dist_info.rank}.safetensors"
    if rng.is_file():  # a rank that did not exist before starts from its seeded RNG
        _set_rng_state(load_file(str(rng)))


def _rng_state() -> dict:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
