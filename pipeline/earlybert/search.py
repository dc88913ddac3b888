"""EarlyBERT's search stage, as one object the training loop calls once per step.

    every `detector.interval` steps    all ranks read the fp32 gates (a collective under ZeRO),
                                       rank 0 runs the detector (pipeline/earlybert/detector.py, pure math),
                                       broadcasts its decision and masks
    on a draw                          every rank checks it holds the same masks; the loop prunes and
                                       rebuilds the engine (pipeline/engine/deepspeed_engine.py), then `record_draw`
                                       writes RUN/ticket.json

Modes (`earlybert.mode`), all in the same command so that baselines differ in one key only:
    earlybert   detect the early-bird ticket (draw when the masks stop changing)
    fixed       draw the gates' ticket at `earlybert.draw_step`, whatever the masks do
    random      at `earlybert.draw_step`, prune random units at the same ratios (the paper's baseline)
    dense       no gates, no draw: the plain model (BERT, ModernBERT: pipeline/families.py)

`state_dict()` (the detector's FIFO and history, and the ticket once drawn) goes into every
checkpoint, so a resumed search continues where it stopped and a resumed pruned run knows its ticket.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from common.launchers import launched_rank
from pipeline.config import ConfigError, MethodConfig
from pipeline.earlybert.detector import (
    Decision,
    DetectorConfig,
    DetectorState,
    Masks,
    broadcast_decision,
    check_same_masks,
    keep_counts,
    keep_mask,
    masks_from_gates,
    natural_draw_problems,
    observe,
)
from pipeline.families import EncoderConfig, model_class
from pipeline.model import parameter_count
from pipeline.run.metrics import flops_per_sequence
from pipeline.run.rundir import RunDir


class SearchStage:
    def __init__(self, cfg: MethodConfig, seed: int, rundir: RunDir, is_main: bool, model_config: EncoderConfig):
        self.cfg, self.seed, self.rundir, self.is_main = cfg, seed, rundir, is_main
        # random mode: the ticket whose per-layer counts the random masks keep (checked before the process group)
        self.random_like = read_random_like(cfg, model_config)
        self.detector = DetectorState()  # rank 0's is the one that counts (and is checkpointed)
        self.ticket: dict | None = None  # {"draw_step", "mask_digest"} once drawn

    @property
    def searching(self) -> bool:
        return self.cfg.use_gates and self.ticket is None

    def gate_lambdas(self) -> tuple[float, float] | None:
        """The L1 weights while searching; None for plain BERT and after the draw (gates, if kept,
        train on as free parameters)."""
        return (self.cfg.lambda_heads, self.cfg.lambda_ffn) if self.searching else None

    def due(self, step: int) -> bool:
        """Whether the search looks at the gates after optimizer step `step`."""
        if not self.searching:
            return False
        if self.cfg.mode == "earlybert":
            return step % self.cfg.detector.interval == 0 or step >= self.cfg.detector.max_search_steps
        return step == self.cfg.draw_step

    def decide(
        self, config: EncoderConfig, step: int, heads: list[torch.Tensor], ffn: list[torch.Tensor]
    ) -> Decision | None:
        """After optimizer step `step`, when `due`: the ticket to draw now, the same on every rank, or None.
        heads, ffn: the model's gates (fp32, whole: pipeline/engine/deepspeed_engine.py read_gates). Every rank
        calls it (the broadcast and the mask check are collectives)."""
        decision = None
        if self.is_main:
            decision = self._decide_on_main(config, step, heads, ffn)
        decision = broadcast_decision(decision, (config.num_heads_per_layer, config.intermediate_size_per_layer))
        if not decision.draw:
            return None
        check_same_masks(decision.masks)
        return decision

    def _decide_on_main(self, config: EncoderConfig, step: int, heads, ffn) -> Decision:
        detector = self.cfg.detector
        if self.cfg.mode == "earlybert":
            return observe(self.detector, step, masks_from_gates(heads, ffn, detector), detector)
        if self.cfg.mode == "fixed":
            decision = Decision(
                True, step, masks_from_gates(heads, ffn, detector), reason=f"fixed draw_step={self.cfg.draw_step}"
            )
        else:
            seed = self.seed if self.cfg.mask_seed is None else self.cfg.mask_seed
            decision = Decision(
                True,
                step,
                random_masks(config, detector, seed, self.random_like),
                reason=f"random masks (seed {seed}"
                f"{', counts of ' + self.cfg.random_like if self.random_like else ''}) "
                f"at draw_step={self.cfg.draw_step}",
            )
        self.detector.drawn_step = step
        return decision

    def record_draw(
        self, decision: Decision, before: EncoderConfig, after: EncoderConfig, seq_len: int, rebuild_s: float
    ) -> dict:
        """After the rebuild: the ticket's record, written to RUN/ticket.json by rank 0."""
        record = ticket_record(decision, self.cfg.mode, self.detector.history, before, after, seq_len)
        record["rebuild_s"] = rebuild_s
        self.ticket = {"draw_step": decision.step, "mask_digest": record["mask_digest"]}
        if self.is_main:
            self.rundir.write_ticket(record)
        return record

    def state_dict(self) -> dict:
        return {"detector": self.detector.to_json(), "ticket": self.ticket}

    def load_state_dict(self, state: dict) -> None:
        # Run states of the first format hold "detector" only once the first detector step has run.
        self.detector = DetectorState.from_json(state["detector"]) if state.get("detector") else DetectorState()
        self.ticket = state.get("ticket")


def warn_if_no_natural_draw(
    cfg: MethodConfig, start_step: int, model_config: EncoderConfig, warmup_steps: int, prog: str
) -> None:
    """Say (before any process group) when the detector's settings leave no room for a natural draw."""
    if (
        cfg.mode != "earlybert"
        or not model_config.use_gates
        or start_step >= cfg.detector.max_search_steps
        or launched_rank(os.environ) != 0
    ):
        return
    heads, neurons = sum(model_config.num_heads_per_layer), sum(model_config.intermediate_size_per_layer)
    for problem in natural_draw_problems(cfg.detector, heads, neurons, first_step=warmup_steps):
        print(f"{prog}: note: earlybert.detector: {problem}", file=sys.stderr, flush=True)


def random_masks(config: EncoderConfig, detector: DetectorConfig, seed: int, like: dict | None = None) -> Masks:
    """Random units at the detector's ratios and scopes (the same rule applied to random scores), or at the
    per-layer counts of the ticket `like` (a ticket.json's content)."""
    g = torch.Generator().manual_seed(seed)
    head_scores = [torch.rand(n, generator=g) for n in config.num_heads_per_layer]
    ffn_scores = [torch.rand(n, generator=g) for n in config.intermediate_size_per_layer]
    if like is not None:
        return Masks(
            heads=keep_counts(head_scores, like["heads_per_layer"]), ffn=keep_counts(ffn_scores, like["ffn_per_layer"])
        )
    return Masks(
        heads=keep_mask(head_scores, detector.head_prune_ratio, detector.head_scope),
        ffn=keep_mask(ffn_scores, detector.ffn_prune_ratio, detector.ffn_scope, detector.ffn_multiple_of),
    )


def read_random_like(cfg: MethodConfig, model_config: EncoderConfig) -> dict | None:
    """The ticket `earlybert.random_like` names, checked against the model before any process group."""
    if cfg.random_like is None:
        return None
    try:
        ticket = json.loads(Path(cfg.random_like).read_text())
        heads, ffn = ticket["heads_per_layer"], ticket["ffn_per_layer"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(
            f"earlybert.random_like: cannot read a ticket's heads_per_layer and ffn_per_layer "
            f"from {cfg.random_like} ({e}); name the ticket.json of an EarlyBERT run"
        ) from None
    sizes = (model_config.num_heads_per_layer, model_config.intermediate_size_per_layer)
    if [len(heads), len(ffn)] != [len(sizes[0])] * 2 or any(k > n for k, n in zip(heads + ffn, sum(sizes, []))):
        raise ConfigError(
            f"earlybert.random_like: {cfg.random_like} is the ticket of another model (heads "
            f"{heads}, FFN {ffn}) than this run's (heads {sizes[0]}, FFN {sizes[1]})"
        )
    return ticket


def parameters_of(config: EncoderConfig) -> int:
    """Parameter count of the model a config describes: the class it names (a task model), else the
    pre-training model. Built on the meta device: no memory, no init (the engine's own parameters are
    partitioned under ZeRO-3)."""
    with torch.device("meta"):
        return parameter_count(model_class(config)(config))


def ticket_record(
    decision: Decision,
    mode: str,
    distance_history: list[dict],
    before: EncoderConfig,
    after: EncoderConfig,
    seq_len: int,
) -> dict:
    """The content of RUN/ticket.json."""
    return {
        "mode": mode,
        "draw_step": decision.step,
        "forced": decision.forced,
        "reason": decision.reason,
        "kept_heads": decision.masks.kept_heads(),
        "heads_per_layer": [len(h) for h in decision.masks.kept_heads()],
        "ffn_per_layer": [len(n) for n in decision.masks.kept_neurons()],
        "kept_neurons": decision.masks.kept_neurons(),
        "mask_digest": decision.masks.digest(),
        "distance_history": distance_history,
        "params_before": parameters_of(before),
        "params_after": parameters_of(after),
        "seq_len": seq_len,
        "flops_per_sequence_before": flops_per_sequence(before, seq_len),
        "flops_per_sequence_after": flops_per_sequence(after, seq_len),
    }
