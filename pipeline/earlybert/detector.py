"""Early-bird ticket detection (You et al., ICLR 2020) on EarlyBERT's gates.

Every `interval` steps the gates become two structured masks:
  heads   keep the largest |c| heads, per layer (ratio 1/3 pruned) or globally;
  FFN     keep the largest |c| neurons, globally across layers (ratio 0.4 pruned) or per layer;
never fewer than one head and one neuron per layer (zero-size parameters break DeepSpeed and the
attention code). Ties break towards the lower index, so a mask is a pure function of the gates.

The newest masks enter a FIFO of `window` (5). A ticket is drawn when BOTH the head mask and the FFN
mask are within `epsilon` normalized Hamming distance of every older mask in the FIFO, and not
before `min_search_steps`; at `max_search_steps` it is drawn anyway.

`criterion: combined` compares one mask of heads and FFN neurons together (You et al.), with one epsilon;
`natural_draw_problems` says before a run starts when its settings leave no room for a natural draw.

Only rank zero runs `observe`; `broadcast_decision` ships its verdict and the masks to every rank
as one tensor, and `check_same_masks` proves every rank holds the identical masks before pruning.
The state is plain data (`DetectorState.to_json` / `from_json`) and goes into every checkpoint,
so a resumed search continues where it stopped.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch


@dataclass
class DetectorConfig:
    interval: int = 100  # steps between two masks; transformers' head masks "converge" trivially if too small
    window: int = 5  # FIFO length: the newest mask is compared with the window - 1 older ones
    epsilon: float = 0.1  # max normalized Hamming distance counted as "unchanged"
    # per_type: the head mask and the FFN mask must each be within their epsilon (EarlyBERT's two kinds of
    # units); combined: one mask of heads and FFN neurons together, as You et al. compute it.
    criterion: Literal["per_type", "combined"] = "per_type"
    head_epsilon: float | None = None  # per_type: the heads' own epsilon (default: epsilon)
    ffn_epsilon: float | None = None  # per_type: the FFN neurons' own epsilon (default: epsilon)
    head_prune_ratio: float = 1 / 3
    ffn_prune_ratio: float = 0.4
    head_scope: Literal["layer", "global"] = "layer"  # layer: BERT-base keeps 8 of 12 per layer
    ffn_scope: Literal["layer", "global"] = "global"  # global: later layers lose more
    # Each layer keeps a multiple of this many FFN neurons (its largest gates). 1 keeps exactly the ratio, and the
    # tickets of runs started before this option; 8 measured 0.95x the FFN time of the exact widths on CPU
    # (bench/bench_widths.py), and GPU matrix units want multiples of 8 too: the bert-base/large configs use 8.
    ffn_multiple_of: int = 1
    min_search_steps: int = 500  # never draw before this step
    max_search_steps: int = 10_000  # draw at this step whatever the distances say

    def __post_init__(self):
        for name in ("head_scope", "ffn_scope"):
            if getattr(self, name) not in ("layer", "global"):
                raise ValueError(f"earlybert.detector.{name} must be 'layer' or 'global', got {getattr(self, name)!r}")
        for name in ("head_prune_ratio", "ffn_prune_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"earlybert.detector.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.window < 2 or self.interval < 1 or self.ffn_multiple_of < 1:
            raise ValueError("earlybert.detector.window must be >= 2, interval >= 1 and ffn_multiple_of >= 1")
        if self.max_search_steps < self.min_search_steps:
            raise ValueError("earlybert.detector.max_search_steps must be >= min_search_steps")


@dataclass
class Masks:
    """Per-layer boolean keep-masks: heads[i] has num_heads_i entries, ffn[i] intermediate_size_i."""

    heads: list[torch.Tensor]
    ffn: list[torch.Tensor]

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.heads), torch.cat(self.ffn)

    def kept_heads(self) -> list[list[int]]:
        return [m.nonzero().flatten().tolist() for m in self.heads]

    def kept_neurons(self) -> list[list[int]]:
        return [m.nonzero().flatten().tolist() for m in self.ffn]

    def digest(self) -> str:
        heads, ffn = self.flat()
        sizes = [len(m) for m in self.heads] + [len(m) for m in self.ffn]
        payload = (
            bytes(heads.to(torch.uint8).tolist()) + b"|" + bytes(ffn.to(torch.uint8).tolist()) + repr(sizes).encode()
        )
        return hashlib.sha256(payload).hexdigest()

    def to_json(self) -> dict:
        bits = lambda masks: ["".join("1" if b else "0" for b in m.tolist()) for m in masks]  # noqa: E731
        return {"heads": bits(self.heads), "ffn": bits(self.ffn)}

    @classmethod
    def from_json(cls, data: dict) -> "Masks":
        unbits = lambda rows: [torch.tensor([c == "1" for c in row], dtype=torch.bool) for row in rows]  # noqa: E731
        return cls(heads=unbits(data["heads"]), ffn=unbits(data["ffn"]))


def keep_mask(scores: list[torch.Tensor], prune_ratio: float, scope: str, multiple_of: int = 1) -> list[torch.Tensor]:
    """Keep the largest scores: `prune_ratio` of each layer's units ("layer") or of all units ("global");
    each layer's count then rounded to the nearest multiple of `multiple_of` (its largest scores).

    At least one unit per layer survives. Ties go to the lower index (stable sort), so the result is
    deterministic for the same scores on every rank.
    """
    if scope == "layer":
        counts = [round(len(s) * (1.0 - prune_ratio)) for s in scores]
    else:
        flat = torch.cat(scores)
        keep = max(len(scores), round(len(flat) * (1.0 - prune_ratio)))
        counts = [int(m.sum()) for m in _top(flat, keep).split([len(s) for s in scores])]
    return keep_counts(scores, [_round_count(k, len(s), multiple_of) for s, k in zip(scores, counts)])


def keep_counts(scores: list[torch.Tensor], counts: list[int]) -> list[torch.Tensor]:
    """Keep the `counts[i]` largest scores of layer i."""
    return [_top(s, k) for s, k in zip(scores, counts)]


def _round_count(k: int, size: int, multiple_of: int) -> int:
    """k to the nearest multiple of multiple_of, at least one multiple (or one unit), at most the layer."""
    if multiple_of > 1:
        k = max(multiple_of, round(k / multiple_of) * multiple_of)
    return min(size, max(1, k))


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.sort(-scores.double(), stable=True).indices
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def masks_from_gates(head_gates: list[torch.Tensor], ffn_gates: list[torch.Tensor], cfg: DetectorConfig) -> Masks:
    """Rank units by |gate| (the CV Early-Bird rule; raw values would favour sign flips)."""
    heads = keep_mask([g.detach().float().abs().cpu() for g in head_gates], cfg.head_prune_ratio, cfg.head_scope)
    ffn = keep_mask(
        [g.detach().float().abs().cpu() for g in ffn_gates], cfg.ffn_prune_ratio, cfg.ffn_scope, cfg.ffn_multiple_of
    )
    return Masks(heads=heads, ffn=ffn)


def mask_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normalized Hamming distance: the fraction of entries that differ."""
    if a.shape != b.shape:
        raise ValueError(f"masks of different sizes ({a.numel()} vs {b.numel()}) cannot be compared")
    return float((a != b).float().mean())


@dataclass
class DetectorState:
    """Everything the detector knows; JSON-serialisable, saved in every checkpoint."""

    fifo: list[dict] = field(default_factory=list)  # [{"step", "masks": Masks.to_json()}], oldest first
    history: list[dict] = field(default_factory=list)  # one row per observation: step, head/ffn distances
    drawn_step: int | None = None
    forced: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "DetectorState":
        return cls(**data)


@dataclass
class Decision:
    draw: bool
    step: int
    masks: Masks
    forced: bool = False
    reason: str = ""


def observe(state: DetectorState, step: int, masks: Masks, cfg: DetectorConfig) -> Decision:
    """Push the step's masks into the FIFO, record the distances and decide whether to draw."""
    heads, ffn = masks.flat()
    older = [Masks.from_json(entry["masks"]).flat() for entry in state.fifo[-(cfg.window - 1) :]]
    head_d = [mask_distance(heads, h) for h, _ in older]
    ffn_d = [mask_distance(ffn, f) for _, f in older]
    both = torch.cat([heads, ffn])
    combined_d = [mask_distance(both, torch.cat([h, f])) for h, f in older]
    state.fifo = (state.fifo + [{"step": step, "masks": masks.to_json()}])[-cfg.window :]
    state.history.append(
        {
            "step": step,
            "head_distance": max(head_d) if head_d else None,  # the largest distance to the older masks
            "ffn_distance": max(ffn_d) if ffn_d else None,
            "combined_distance": max(combined_d) if combined_d else None,
            "head_distance_to_previous": head_d[-1] if head_d else None,
            "ffn_distance_to_previous": ffn_d[-1] if ffn_d else None,
        }
    )
    full = len(older) == cfg.window - 1
    if cfg.criterion == "combined":
        stable = full and max(combined_d) <= cfg.epsilon
        rule = f"the combined head and FFN mask within epsilon={cfg.epsilon}"
    else:
        head_eps, ffn_eps = epsilons(cfg)
        stable = full and max(head_d) <= head_eps and max(ffn_d) <= ffn_eps
        rule = f"head masks within {head_eps} and FFN masks within {ffn_eps}"
    if step >= cfg.max_search_steps:
        decision = Decision(
            True,
            step,
            masks,
            forced=True,
            reason=f"max_search_steps={cfg.max_search_steps} reached without a stable mask: drawn anyway",
        )
    elif stable and step >= cfg.min_search_steps:
        decision = Decision(True, step, masks, reason=f"{rule} of the last {cfg.window - 1}")
    else:
        reason = "stable, but before min_search_steps" if stable else "masks still changing"
        decision = Decision(False, step, masks, reason=reason)
    if decision.draw:
        state.drawn_step, state.forced = step, decision.forced
    return decision


def epsilons(cfg: DetectorConfig) -> tuple[float, float]:
    """(heads, FFN) epsilon of the per-type rule."""
    return (
        cfg.epsilon if cfg.head_epsilon is None else cfg.head_epsilon,
        cfg.epsilon if cfg.ffn_epsilon is None else cfg.ffn_epsilon,
    )


def natural_draw_problems(cfg: DetectorConfig, heads: int, neurons: int, first_step: int = 0) -> list[str]:
    """Why settings can never (or, for an epsilon below one swap, only with identical masks) draw a ticket
    before max_search_steps forces one; heads and neurons: the model's totals, first_step: the first step
    the search's masks mean anything (after warmup, when gates have started to move)."""
    problems = []
    full = first_step + cfg.window * cfg.interval  # the first detector step with a full FIFO after first_step
    if max(full, cfg.min_search_steps) >= cfg.max_search_steps:
        problems.append(
            f"the FIFO of {cfg.window} masks taken every {cfg.interval} steps is first full at step "
            f"{full}, min_search_steps is {cfg.min_search_steps}, and max_search_steps "
            f"({cfg.max_search_steps}) forces the draw before a natural one can happen"
        )
    units = {"head": heads, "FFN": neurons} if cfg.criterion == "per_type" else {"head and FFN": heads + neurons}
    eps = dict(zip(units, epsilons(cfg) if cfg.criterion == "per_type" else (cfg.epsilon,)))
    for kind, n in units.items():
        swap = 2 / n  # one unit in, another out
        if eps[kind] < swap:
            problems.append(
                f"epsilon {eps[kind]} for the {kind} mask is below one swap of its {n} units "
                f"({swap:.4g}): only identical masks count as stable"
            )
    return problems


def broadcast_decision(decision: Decision | None, sizes: tuple[list[int], list[int]], src: int = 0) -> Decision:
    """Rank `src` sends (draw, forced, step, head bits, FFN bits) as one int64 tensor; all ranks return it.

    sizes = (heads per layer, FFN width per layer), known to every rank from the model config.
    Other ranks pass decision=None.
    """
    import torch.distributed as dist

    head_sizes, ffn_sizes = sizes
    n = 3 + sum(head_sizes) + sum(ffn_sizes)
    if decision is not None:
        heads, ffn = decision.masks.flat()
        packed = torch.cat(
            [torch.tensor([int(decision.draw), int(decision.forced), decision.step]), heads.long(), ffn.long()]
        )
    else:
        packed = torch.zeros(n, dtype=torch.long)
    if dist.is_available() and dist.is_initialized():
        device = _comm_device()
        packed = packed.to(device)
        dist.broadcast(packed, src=src)
        packed = packed.cpu()
    draw, forced, step = (int(v) for v in packed[:3])
    heads = packed[3 : 3 + sum(head_sizes)].bool()
    ffn = packed[3 + sum(head_sizes) :].bool()
    masks = Masks(heads=list(heads.split(head_sizes)), ffn=list(ffn.split(ffn_sizes)))
    reason = decision.reason if decision is not None else ""
    return Decision(bool(draw), step, masks, forced=bool(forced), reason=reason)


def check_same_masks(masks: Masks) -> str:
    """All ranks compare the digest of their masks; any difference stops the run before pruning."""
    import torch.distributed as dist

    digest = masks.digest()
    if dist.is_available() and dist.is_initialized():
        digests = [None] * dist.get_world_size()
        dist.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks hold different ticket masks (digests {digests}): refusing to prune")
    return digest


def _comm_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
