"""The warm-up of pre-training heads that a Hugging Face checkpoint lacks, on a frozen encoder, before the search.

An encoder-only checkpoint (a BertModel, such as all-MiniLM-L6-v2, or a ModernBertModel) ships no MLM head (and
BERT's no NSP classifier): `model.init_from` starts them from random weights. EarlyBERT's gates learn during the
search from the gradient that flows back through those heads, so with fresh heads the search fits a meaningless
objective. Here the heads (the parameters under the model family's `pretraining_heads` prefixes,
pipeline/families.py: BERT's `cls.` and the NSP pooler, ModernBERT's `head.` and the decoder's bias) train first,
alone: every encoder weight (embeddings, layers, gates) stays bit-identical. `model.head_warmup_steps` optimizer
steps (DEFAULT_STEPS by default when a head is missing; 0 turns it off), the run's peak lr held constant, the
run's global batch, on the first phase's shards in a stream of their own (the main run's stream is left as it is).

No DeepSpeed engine: the heads are small (hidden^2 + vocabulary + NSP), every rank holds them whole, the
ranks average their gradients in one all-reduce (as DeepSpeed averages the engine's), and torch's AdamW,
with the DeepSpeed config's betas, eps, weight decay and clipping, steps. It resumes exactly: the heads,
AdamW's state and the steps done are saved in one file, RUN/head_warmup.safetensors (written atomically),
every checkpoint.interval steps, at its end and on SIGTERM/SIGUSR1; each step's dropout is seeded from
(seed, rank, step). Once the run's first checkpoint exists it supersedes the file. RUN/head_warmup.json
records what was missing, the loss of every step and the time taken.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from common.outputs import atomic_write, write_json
from data_prep import ShardDataset
from pipeline.config import batch_plan, read_deepspeed
from pipeline.engine import distributed
from pipeline.engine.deepspeed_engine import param_groups
from pipeline.families import FAMILIES, family_of
from pipeline.pretrain.config import PretrainConfig
from pipeline.pretrain.loader import PhaseLoader

DEFAULT_STEPS = 100
# Parameter-name prefix -> pre-training head, of every family: their parameter names share no prefix.
HEADS = {prefix: head for family in FAMILIES.values() for prefix, head in family.pretraining_heads.items()}
STREAM = 2**31 - 1  # the warm-up's data stream: a phase index no run config reaches
STATE_FILE, SUMMARY_FILE = "head_warmup.safetensors", "head_warmup.json"


@dataclass
class HeadWarmup:
    steps: int  # planned optimizer steps (0: none)
    missing: list[str]  # the heads the checkpoint lacked, by name (HEADS' values)


def plan(configured: int | None, missing_keys: list[str]) -> HeadWarmup:
    """The warm-up of a run started from a checkpoint whose loading left `missing_keys` at their initial values:
    `configured` steps (None: DEFAULT_STEPS) when a head is missing, none otherwise."""
    missing = sorted({name for key in missing_keys for prefix, name in HEADS.items() if key.startswith(prefix)})
    steps = (DEFAULT_STEPS if configured is None else configured) if missing else 0
    return HeadWarmup(steps, missing)


def describe(warmup: HeadWarmup, init_from: str) -> str:
    """The start-up line that says what the checkpoint lacks and what the run does about it."""
    if not warmup.missing:
        return f"{init_from} has the heads pre-training needs: no head warm-up"
    lacks = f"{init_from} has no {', '.join(warmup.missing)}: they start from random weights"
    if not warmup.steps:
        return f"{lacks}; no warm-up (model.head_warmup_steps=0): the search's gates learn from untrained heads"
    return (
        f"{lacks}; warming them up for {warmup.steps} steps with the encoder frozen before training, so that the "
        f"search's gates learn from trained heads (model.head_warmup_steps; 0 turns it off)"
    )


def head_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    prefixes = tuple(family_of(model.config).pretraining_heads)
    return {n: p for n, p in model.named_parameters() if n.startswith(prefixes)}


def run(
    model: torch.nn.Module,
    warmup: HeadWarmup,
    cfg: PretrainConfig,
    data: ShardDataset,
    dist: distributed.DistInfo,
    stop: distributed.StopRequest,
) -> bool:
    """Train the heads of `model` (in place, on dist.device) to warmup.steps, from the state file where there is
    one; True once done, False when stopped by a signal (the state saved)."""
    heads = head_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in heads.values():
        p.requires_grad_(True)
    model.to(dist.device).train()
    optimizer = make_optimizer(model, cfg)
    path = Path(cfg.run_dir) / STATE_FILE
    done, losses, seconds = load_state(path, heads, optimizer) if path.is_file() else (0, [], 0.0)
    if done:
        _say(dist, f"head warm-up resumed from {path} at step {done} of {warmup.steps}")
    batches = batch_plan(cfg, dist.world_size)
    loader = PhaseLoader(
        data,
        seed=cfg.seed,
        phase=STREAM,
        start_sample=done * cfg.global_batch_size,
        steps=max(warmup.steps - done, 0),
        micro_batch_size=batches.micro,
        grad_accum=batches.accumulation,
        world_size=dist.world_size,
        rank=dist.rank,
        mask_prob=cfg.data.mask_prob,
        prefetch=cfg.data.prefetch,
        pin_memory=dist.device.type == "cuda",
    )
    clip = read_deepspeed(cfg).get("gradient_clipping", 0.0)
    try:
        while done < warmup.steps:
            t0 = time.perf_counter()
            loss = step(model, heads, optimizer, loader.next_step(), dist, cfg.seed + done, clip)
            totals = distributed.sum_over_ranks({"loss": loss, "stop": torch.tensor(float(stop.signum != 0))}, dist)
            done, seconds = done + 1, seconds + time.perf_counter() - t0
            losses.append(totals["loss"] / dist.world_size)
            if done % cfg.log.interval == 0 or done in (1, warmup.steps):
                _say(dist, f"head warm-up step {done}/{warmup.steps}: loss {losses[-1]:.4f}")
            stopping = totals["stop"] > 0
            if stopping or done == warmup.steps or done % cfg.checkpoint.interval == 0:
                save_state(path, heads, optimizer, done, losses, seconds, dist)
            if stopping:
                return False
    finally:
        loader.close()
    for p in model.parameters():
        p.requires_grad_(True)
    if dist.is_main:
        write_json(
            Path(cfg.run_dir) / SUMMARY_FILE,
            {"steps": warmup.steps, "missing": warmup.missing, "losses": losses, "seconds": seconds},
        )
    return True


def make_optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters with the DeepSpeed config's betas, eps and weight decay (matrices
    only, as the engine's groups), at the run's peak lr."""
    given = read_deepspeed(cfg).get("optimizer", {}).get("params", {})
    settings = {k: tuple(v) if k == "betas" else v for k, v in given.items() if k in ("betas", "eps", "weight_decay")}
    return torch.optim.AdamW(param_groups(model), **{"weight_decay": 0.01, **settings, "lr": cfg.optim.lr})


def step(model, heads: dict, optimizer, micro_batches: list[dict], dist, seed: int, clip: float) -> torch.Tensor:
    """One optimizer step of the heads: the micro-batches' mean gradient, averaged over the ranks; returns this
    rank's mean loss. The dropout of step s on rank r is seeded from (seed + s, r)."""
    torch.manual_seed(int(np.random.SeedSequence([seed, dist.rank]).generate_state(1)[0]))
    total = torch.zeros((), device=dist.device)
    for batch in micro_batches:
        out = model(**{k: v.to(dist.device) for k, v in batch.items()}, masked_logits_only=True)
        (out.loss / len(micro_batches)).backward()
        total += out.loss.detach() / len(micro_batches)
    grads = [p.grad for p in heads.values()]
    if dist.world_size > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        torch.nn.utils.vector_to_parameters(flat / dist.world_size, grads)
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(list(heads.values()), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def save_state(path: Path, heads: dict, optimizer, done: int, losses: list, seconds: float, dist) -> None:
    """The heads, AdamW's state and the progress in one file, replaced atomically (rank 0; the ranks hold the
    same heads and moments)."""
    if dist.is_main:
        by_name = {id(p): n for n, p in heads.items()}
        tensors = {f"weight/{n}": p.detach().cpu().contiguous() for n, p in heads.items()}
        for p, state in optimizer.state.items():
            tensors.update({f"{k}/{by_name[id(p)]}": v.detach().cpu().reshape(-1) for k, v in state.items()})
        meta = {"done": str(done), "losses": json.dumps(losses), "seconds": repr(seconds)}
        payload = save(tensors, metadata=meta)
        atomic_write(path, lambda f: f.write(payload))
    distributed.barrier()


def load_state(path: Path, heads: dict, optimizer) -> tuple[int, list, float]:
    """Put the saved heads and AdamW state into `heads` and `optimizer`; (steps done, losses, seconds)."""
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    with torch.no_grad():
        for n, p in heads.items():
            p.copy_(tensors[f"weight/{n}"])
    for n, p in heads.items():
        state = {kind: v for key, v in tensors.items() for kind, _, name in [key.partition("/")] if name == n}
        del state["weight"]
        if state:  # a parameter AdamW has stepped
            optimizer.state[p] = {
                k: v.reshape(()) if k == "step" else v.reshape(p.shape).to(p.device) for k, v in state.items()
            }
    return int(meta["done"]), json.loads(meta["losses"]), float(meta["seconds"])


def read_summary(run_dir: Path) -> dict | None:
    path = Path(run_dir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _say(dist: distributed.DistInfo, msg: str) -> None:
    if dist.is_main:
        print(f"[earlybert train] {msg}", flush=True)
