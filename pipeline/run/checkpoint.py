"""Checkpoints: DeepSpeed's files plus the project's own state, in RUN/checkpoints/<tag>/.

    RUN/checkpoints/latest                the newest complete tag; written last, atomically
    RUN/checkpoints/step_00001000/
        run_state.json                    RunState (rank 0)
        architecture.json                 the model config with its per-layer structure (rank 0)
        rng_rank{r}.safetensors           torch RNG states of rank r (dropout)
        mp_rank_00_model_states.pt ...    DeepSpeed's model and per-rank optimizer states
        manifest.json                     every file above with its size and sha256 (rank 0, once every
                                          rank's files are on disk, before `latest` moves)
        universal/                        DeepSpeed universal checkpoint, made on demand to resume
                                          on another number of ranks
    RUN/checkpoints/step_00000900.set-aside/   a checkpoint after the one resumed from (damaged, or
                                               passed over by `resume_from`): never read again

A resume checks the tag against its manifest before anything is built (resume_tag); a damaged `latest`
(a truncated shard: a failing disk, an interrupted copy) gives way to the newest intact checkpoint, with a
message. Checkpoints written before manifests existed have none and are accepted as they are.

The project's files are JSON and safetensors, never pickles. DeepSpeed's own files are pickles:
they are only ever loaded from the run's own checkpoint directory. run_state.json and
architecture.json are read before the model exists, so a pruned (smaller) model is rebuilt with
the right shapes before DeepSpeed loads into it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.outputs import atomic_write, write_json
from pipeline.engine import distributed, guards

LATEST = "latest"
RUN_STATE = "run_state.json"
ARCHITECTURE = "architecture.json"
MANIFEST = "manifest.json"
UNIVERSAL = "universal"
SET_ASIDE = ".set-aside"
CLIENT_KEY = "earlybert"  # the one key of DeepSpeed's client_state that holds the project's state


class CheckpointError(RuntimeError):
    pass


# 1 (no "format" key): the search stage's state was under "extra"; 2: no nonfinite_skipped (0); 3: no rewound (0);
# 4: no phases ([]: a resume cannot check the phases' shards)
RUN_STATE_FORMAT = 5


@dataclass
class RunState:
    """What the loop needs, besides DeepSpeed's engine state, to continue exactly where it stopped."""

    format: int = RUN_STATE_FORMAT
    step: int = 0  # optimizer steps done
    samples: int = 0  # samples consumed, all phases
    phase: int = 0  # index into pre-training's phases (fine-tuning: its stages, `stage`)
    phase_samples: int = 0  # samples consumed in the current phase (or stage): its stream position
    world_size: int = 1  # ranks that wrote the checkpoint
    zero_stage: int = 0
    tokenizer_hash: str = ""  # of the shards trained on; another tokenizer's shards are refused
    search: dict = field(default_factory=dict)  # SearchStage.state_dict(): detector state, ticket; JSON-able
    task: dict = field(default_factory=dict)  # fine-tuning: the stage of the recipe, best metrics; JSON-able
    nonfinite_skipped: int = 0  # steps skipped on a NaN/inf loss (nonfinite.action: skip)
    # `after_draw: rewind`: the steps the rewind added (draw step - rewind_step). The phases and the LR
    # schedule count plan steps, step - rewound: the ticket trains the schedule from rewind_step to its end.
    rewound: int = 0
    # Pre-training: each phase's shards as the run last trained on them ({shards, seq_len, sequences}), so that a
    # resume on other shards (another sequence length, another prep) is refused instead of going on silently.
    phases: list = field(default_factory=list)

    @property
    def plan_step(self) -> int:
        return self.step - self.rewound

    # Fine-tuning's stages (search, ticket, dense) are held where pre-training holds its phases: the JSON keeps
    # the names old checkpoints carry, these say what fine-tuning means by them.
    @property
    def stage(self) -> int:
        return self.phase

    @stage.setter
    def stage(self, value: int) -> None:
        self.phase = value

    @property
    def stage_samples(self) -> int:
        return self.phase_samples

    @stage_samples.setter
    def stage_samples(self, value: int) -> None:
        self.phase_samples = value

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: Path) -> "RunState":
        data = dict(data)
        if "format" not in data:  # format 1: the search stage's state under "extra", with the same keys
            data["format"], data["search"] = 2, data.pop("extra", {})
        if data["format"] > RUN_STATE_FORMAT:
            raise CheckpointError(
                f"{where}: run state format {data['format']} is newer than this version reads "
                f"({RUN_STATE_FORMAT}); update the project"
            )
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise CheckpointError(f"{where}: unknown fields {sorted(unknown)} (written by a newer version?)")
        return cls(**{**data, "format": RUN_STATE_FORMAT})  # formats 2 to 4 lack only fields with defaults


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _step_of(tag: str) -> int | None:
    prefix, _, digits = tag.partition("_")
    return int(digits) if prefix == "step" and digits.isdigit() else None


def _read_latest(ckpt_dir: Path) -> str | None:
    """What `latest` says, or None for a fresh run. A `latest` that cannot be read as a tag (bytes that are not
    text: a failing disk, a copy gone wrong) raises CheckpointError naming it."""
    path = Path(ckpt_dir) / LATEST
    if not path.exists():
        return None
    try:
        tag = path.read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} cannot be read as a checkpoint tag ({err})") from None
    if _step_of(tag) is None:
        raise CheckpointError(f"{path} says {tag[:40]!r}, not a checkpoint tag such as step_00001000")
    return tag


def _readable_latest(ckpt_dir: Path) -> str | None:
    """What `latest` says; None for none, or one that cannot be read (it is about to be replaced)."""
    try:
        return _read_latest(ckpt_dir)
    except CheckpointError:
        return None


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag `latest` names, or None for a fresh run."""
    tag = _read_latest(ckpt_dir)
    if tag is None:
        return None
    path = Path(ckpt_dir) / LATEST
    if not (Path(ckpt_dir) / tag / RUN_STATE).is_file():
        raise CheckpointError(
            f"{path} names {tag!r}, which has no {RUN_STATE}: the checkpoint directory was "
            f"changed by hand; point `latest` at a complete step_* folder"
        )
    return tag


def read_tag(ckpt_dir: Path, tag: str) -> tuple[RunState, dict]:
    """(run state, architecture) of a checkpoint, without touching DeepSpeed's pickles."""
    folder = Path(ckpt_dir) / tag
    state = RunState.from_dict(json.loads((folder / RUN_STATE).read_text()), folder / RUN_STATE)
    return state, json.loads((folder / ARCHITECTURE).read_text())


def save(engine, ckpt_dir: Path, state: RunState, architecture: dict, dist_info, settings) -> str:
    """Save on all ranks (a collective; `settings`: the run config's CheckpointConfig). `latest` moves to the
    new tag only once every rank's files and the manifest are written, so a crash or a full disk at any point
    leaves the previous checkpoint as the one resumed from."""
    ckpt_dir, tag = Path(ckpt_dir), tag_for(state.step)
    folder = ckpt_dir / tag
    if latest_tag(ckpt_dir) == tag:  # on every rank, so that all of them stop
        raise CheckpointError(f"{folder} is the latest checkpoint already; refusing to overwrite it")
    with guards.patient(), _failing_writes(ckpt_dir, folder):
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
            write_manifest(folder, checksum=settings.verify == "checksum")
            atomic_write(ckpt_dir / LATEST, lambda f: f.write(tag.encode()))
            _fsync_dir(ckpt_dir)
            remove_old(ckpt_dir, settings.keep)
    return tag


@contextmanager
def _failing_writes(ckpt_dir: Path, folder: Path):
    """A write that fails (a full disk, a quota, an I/O error) stops this rank with a message; the partial
    folder goes (freeing the space it took) and `latest` still names the previous checkpoint. The other ranks
    fail in their next collective, within dist_timeout."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if isinstance(err, torch.distributed.DistError) or "gloo" in str(err):  # a collective: not a write
            raise
        shutil.rmtree(folder, ignore_errors=True)
        previous = _readable_latest(ckpt_dir)
        kept = f"{ckpt_dir / previous} is intact and still `latest`" if previous else "no checkpoint was written yet"
        free = shutil.disk_usage(ckpt_dir).free / 2**20
        raise guards.RunFault(
            f"saving checkpoint {folder} failed: {str(err).strip()[:300]} ({free:.1f} MiB free on "
            f"its filesystem); {kept}. Free space (or fix the disk) under {ckpt_dir} and relaunch "
            f"the same command to resume"
        ) from None


def write_manifest(folder: Path, checksum: bool) -> None:
    """FOLDER/manifest.json: every file of the checkpoint with its size and (checksum=True) sha256."""
    files = {}
    for path in sorted(_checkpoint_files(folder)):
        entry = {"size": path.stat().st_size}
        if checksum:
            entry["sha256"] = _sha256(path)
        files[str(path.relative_to(folder))] = entry
    write_json(folder / MANIFEST, {"format": 1, "files": files})


def _checkpoint_files(folder: Path):
    return (
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.name != MANIFEST
        and p.relative_to(folder).parts[0] not in (UNIVERSAL, f"{UNIVERSAL}.tmp", "latest_universal")
    )


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def damage(folder: Path, verify: str = "checksum") -> str | None:
    """What is wrong with a checkpoint folder, naming the file; None when it is intact (or, written before
    manifests existed, has all of the project's files)."""
    for name in (RUN_STATE, ARCHITECTURE):
        if not (folder / name).is_file():
            return f"{folder / name} is missing"
    if not (folder / MANIFEST).is_file():
        return None
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as err:
        return f"{folder / MANIFEST} is unreadable ({err})"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{path} has {path.stat().st_size} bytes, {entry['size']} when it was saved (truncated or damaged)"
        if verify == "checksum" and "sha256" in entry and _sha256(path) != entry["sha256"]:
            return f"{path} does not match its checksum in {MANIFEST} (damaged)"
    return None


def resume_tag(ckpt_dir: Path, resume_from: str | None = None, verify: str = "checksum") -> str | None:
    """The checkpoint a run resumes from, verified: `resume_from`, else `latest`, else (a damaged `latest`,
    with a message) the newest intact checkpoint before it; None for a fresh run."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.parent.exists() and not ckpt_dir.parent.is_dir():
        raise CheckpointError(f"run_dir {ckpt_dir.parent} is a file, not a directory; choose another run_dir")
    if resume_from:
        problem = damage(ckpt_dir / resume_from, verify)
        if problem:
            raise CheckpointError(
                f"resume_from {resume_from}: {problem}; intact checkpoints: {_intact(ckpt_dir, None, verify) or 'none'}"
            )
        return resume_from
    latest = ckpt_dir / LATEST
    try:
        tag = _read_latest(ckpt_dir)
    except CheckpointError as err:  # as if it named a missing checkpoint: any intact one is older
        tag, problem = None, str(err)
    else:
        if tag is None:
            return None
        problem = damage(ckpt_dir / tag, verify)
        if problem is None:
            return tag
    older = _intact(ckpt_dir, _step_of(tag) if tag else None, verify)
    named = f"{latest} names {tag}, and {problem}" if tag else problem
    if not older:
        raise CheckpointError(
            f"{named}; there is no intact checkpoint before it. Restore the file, or start again in a new run_dir"
        )
    later = f"; {tag} will be moved aside to {tag}{SET_ASIDE}" if tag else ""
    print(
        f"earlybert: {named}. Resuming from the newest intact checkpoint, {older[-1]}, instead{later}",
        file=sys.stderr,
        flush=True,
    )
    return older[-1]


def _intact(ckpt_dir: Path, before: int | None, verify: str) -> list[str]:
    """Intact tags, oldest first (only those before step `before` when given)."""
    if not ckpt_dir.is_dir():
        return []
    tags = sorted((s, p.name) for p in ckpt_dir.iterdir() if p.is_dir() and (s := _step_of(p.name)) is not None)
    return [t for s, t in tags if (before is None or s < before) and damage(ckpt_dir / t, verify) is None]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_run(run) -> Path:
    """The checkpoint of a training loop's `run` (pre-training or fine-tuning: its engine, run state with the
    search stage's state, model architecture, dist info and config); returns its folder."""
    run.state.search = run.search.state_dict()
    ckpt_dir = run.cfg.run_files.checkpoints
    tag = save(run.engine, ckpt_dir, run.state, run.engine.module.config.to_dict(), run.dist, run.cfg.checkpoint)
    return ckpt_dir / tag


def remove_old(ckpt_dir: Path, keep: int) -> None:
    """Delete old checkpoints: keep the newest `keep` tags up to `latest`; tags after it are leftovers of
    crashed saves."""
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
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(folder),
            "--output_folder",
            str(tmp),
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
            # DeepSpeed asks models outside Megatron to declare universal-checkpoint info; plain
            # data parallelism needs none beyond the version it injects.
            "--inject_missing_state",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise CheckpointError(
                f"converting {folder} to a universal checkpoint failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        (folder / "latest_universal").unlink(missing_ok=True)  # names the temporary folder
        tmp.rename(folder / UNIVERSAL)
    distributed.barrier()


def load(engine, ckpt_dir: Path, tag: str, state: RunState, dist_info, universal: bool) -> None:
    """Load DeepSpeed's engine state (weights, optimizer, LR schedule) and this rank's RNG state."""
    load_dir, load_tag = (Path(ckpt_dir) / tag, UNIVERSAL) if universal else (Path(ckpt_dir), tag)
    path, client = engine.load_checkpoint(
        str(load_dir), load_tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:  # DeepSpeed only warns when it finds nothing to load
        raise CheckpointError(f"DeepSpeed found no checkpoint to load in {load_dir / load_tag}")
    saved = (client or {}).get(CLIENT_KEY, {})
    if saved.get("step") != state.step:
        raise CheckpointError(
            f"{load_dir / load_tag}: DeepSpeed's files are from step {saved.get('step')}, "
            f"{RUN_STATE} from step {state.step}; the folder mixes two saves"
        )
    rng = Path(ckpt_dir) / tag / f"rng_rank{dist_info.rank}.safetensors"
    if rng.is_file():  # a rank that did not exist before starts from its seeded RNG
        _set_rng_state(load_file(str(rng)))
    if dist_info.is_main:
        _continue_from(Path(ckpt_dir), tag)
    distributed.barrier()


def _continue_from(ckpt_dir: Path, tag: str) -> None:
    """The run goes on from `tag`: later checkpoints (a damaged `latest`, or passed over by resume_from) are
    moved aside, so that this history's checkpoints never mix with theirs, and `latest` names `tag`."""
    if _readable_latest(ckpt_dir) == tag:
        return
    for path in ckpt_dir.iterdir():
        step = _step_of(path.name)
        if path.is_dir() and step is not None and step > _step_of(tag):
            aside = path.with_name(path.name + SET_ASIDE)
            shutil.rmtree(aside, ignore_errors=True)
            path.rename(aside)
            print(f"earlybert: {path} moved aside to {aside}; delete it once you no longer need it", flush=True)
    atomic_write(ckpt_dir / LATEST, lambda f: f.write(tag.encode()))
    _fsync_dir(ckpt_dir)


def _rng_state() -> dict:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
