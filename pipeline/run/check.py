"""The plan `earlybert train --check` and `earlybert finetune --check` print: the lines both share.

Each stage's `prepare(args, world_size)` has checked everything already (it is what a launch runs before its
process group); these lines only say what it found: how the batches split over the ranks, the DeepSpeed
setup, the model, the checkpoint the launch resumes from and what the search stage can do in its steps.
"""

from __future__ import annotations

import math

from pipeline.config import MethodConfig, batch_plan, precision, read_deepspeed, zero_stage
from pipeline.earlybert.search import parameters_of
from pipeline.families import family_of
from pipeline.run.checkpoint import RunState
from pipeline.run.resume import Start, resumes_on_other_ranks


def launch_plan(cfg, start: Start, world_size: int) -> list[str]:
    """Batches, DeepSpeed, model and starting point of a launch of `cfg` (a PretrainConfig or a FinetuneConfig)."""
    ds, model = read_deepspeed(cfg), start.model_config
    lines = [
        f"batches    {batch_plan(cfg, world_size).describe()}",
        f"deepspeed  {cfg.deepspeed}: ZeRO stage {zero_stage(ds)}, {precision(ds)}, optimizer "
        f"{ds.get('optimizer', {}).get('type', 'AdamW (default)')}",
        f"model      {family_of(model).name}: {model.num_hidden_layers} layers, hidden {model.hidden_size}, heads per "
        f"layer {max(model.num_heads_per_layer)}, {parameters_of(model) / 1e6:.1f}M parameters",
    ]
    if start.tag is None:
        return lines + [f"start      step 0: no checkpoint in {cfg.run_files.checkpoints}"]
    state = start.state
    how = "through DeepSpeed's universal checkpoint" if resumes_on_other_ranks(cfg, start, world_size) else "as saved"
    return lines + [
        f"start      resume from {cfg.run_files.checkpoints / start.tag}: step {state.step}, {state.samples} samples; "
        f"written on {state.world_size} rank{'s' if state.world_size > 1 else ''}, loaded {how}"
    ]


def search_plan(search: MethodConfig, state: RunState, steps: int) -> str:
    """What the search stage can do in its `steps` (the run's, or fine-tuning's search stage's)."""
    d, ticket = search.detector, state.search.get("ticket")
    if not search.use_gates:
        return "search     dense: no gates, no draw"
    if ticket:
        return f"search     done: the ticket was drawn at step {ticket['draw_step']}"
    if search.mode != "earlybert":
        return f"search     {search.mode}: the ticket is drawn at step {search.draw_step} of {steps}"
    # The detector looks every `interval` steps; a natural draw needs its FIFO full and min_search_steps passed.
    earliest = math.ceil(max(d.min_search_steps, d.window * d.interval) / d.interval) * d.interval
    text = (
        f"search     earlybert: gate masks every {d.interval} steps into a FIFO of {d.window}; no natural "
        f"draw before step {earliest}, a forced one at step {d.max_search_steps}"
    )
    if d.max_search_steps > steps:
        text += f", after the {steps} steps here: the search may end without a ticket"
    return text
