"""`earlybert finetune --config FILE [key=value ...]`: EarlyBERT on a downstream task (GLUE, SQuAD, your data).

    main        config, task data and features (pipeline/finetune/data.py), the starting point
                (pipeline/finetune/start.py): all checked before any process group (pipeline/run/command.py)
    finetune    the model, its engine and the search stage, the stages (pipeline/run/core.py: the training
                core both loops share)
    run_stage   the loop: a step on every rank, metrics, evaluations (pipeline/finetune/evaluation.py), the
                draw, checkpoints
    draw        prune to the ticket: rewind to the pre-trained weights (or continue), a fresh optimizer and schedule

The stages of a run (`earlybert.mode`):
    earlybert, fixed, random   search (gates + L1, until the ticket is drawn), then ticket (the pruned model)
    dense                      dense (the model without gates: the baseline)
    a model pruned by EarlyBERT pre-training is a ticket already: ticket only, no search

The same launchers, checkpoints and signals as `earlybert train`: relaunching the command resumes from
RUN/checkpoints/latest to the sample, SIGTERM/SIGUSR1 checkpoint and exit with EXIT_INTERRUPTED.
Evaluations go to RUN/eval.jsonl, the final and best metrics with the times to RUN/results.json.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

from pipeline.config import (
    ConfigError,
    OptimConfig,
    batch_plan,
    check_resumed_batch,
    deepspeed_config,
    gather_problems,
)
from pipeline.earlybert.detector import Decision
from pipeline.earlybert.search import SearchStage, read_random_like, warn_if_no_natural_draw
from pipeline.engine import distributed
from pipeline.engine.deepspeed_engine import EngineSpec, build_engine, full_weights
from pipeline.families import model_class
from pipeline.finetune.config import FinetuneConfig, FineTuneError, load_finetune_config, search_config_in_steps
from pipeline.finetune.data import Task, collate, prepare_task, step_examples
from pipeline.finetune.evaluation import evaluate_and_log, summarize
from pipeline.finetune.start import check_tokenizer_fits, find_start
from pipeline.finetune.tasks import TaskError
from pipeline.run import core
from pipeline.run.check import launch_plan, search_plan
from pipeline.run.checkpoint import CheckpointError
from pipeline.run.command import run_config_stage
from pipeline.run.resume import Start, resumes_on_other_ranks

ERRORS = (ConfigError, CheckpointError, TaskError, FineTuneError)


def main(argv: list[str] | None = None) -> int:
    return run_config_stage("finetune", argv, prepare, finetune, ERRORS, plan)


def prepare(args, world_size: int) -> tuple:
    """The config, the task's data and features, where the run starts, all checked from files for a launch on
    world_size ranks."""
    cfg = load_finetune_config(args.config, args.overrides)
    _, task = gather_problems(ERRORS, lambda: batch_plan(cfg, world_size), lambda: prepare_task(cfg))
    start, initial = find_start(cfg, task)
    check_tokenizer_fits(cfg, task, start.model_config)
    if start.tag:
        check_resumed_batch(cfg, start.state, cfg.run_files.checkpoints / start.tag)
        resumes_on_other_ranks(cfg, start, world_size)  # refuses ZeRO-3 on other ranks
    steps_per_epoch = epoch_steps(cfg, task)
    search = search_config_in_steps(cfg.earlybert, cfg.recipe, steps_per_epoch)
    warm = round(cfg.recipe.warmup_ratio * cfg.recipe.search_epochs * steps_per_epoch)
    read_random_like(search, start.model_config)
    warn_if_no_natural_draw(search, start.state.step, start.model_config, warm, "earlybert finetune")
    return cfg, task, start, initial


def _stage_plan(stage: Stage) -> str:
    if stage.name == "search":  # it ends at the draw, long before its LR schedule would
        return f"search until the draw at lr {stage.lr:g} (its LR schedule spans {stage.steps} steps)"
    return f"{stage.name} {stage.steps} steps at lr {stage.lr:g}"


def plan(prepared: tuple, world_size: int) -> list[str]:
    """What a launch on world_size ranks would do (`earlybert finetune --check`)."""
    cfg, task, start, _ = prepared
    steps_per_epoch = epoch_steps(cfg, task)
    stages = run_stages(cfg, start, steps_per_epoch)
    lines = [
        f"run_dir    {cfg.run_dir}",
        f"task       {cfg.task.name or cfg.task.kind}: {len(task.train)} training features, {steps_per_epoch} "
        f"steps per epoch; validation: {', '.join(task.validation) or 'none'}",
        "stages     " + ", ".join(_stage_plan(s) for s in stages),
    ] + launch_plan(cfg, start, world_size)
    for stage in stages:
        if stage.name == "search":
            search = search_config_in_steps(cfg.earlybert, cfg.recipe, steps_per_epoch)
            lines.append(search_plan(search, start.state, stage.steps))
    return lines


def epoch_steps(cfg: FinetuneConfig, task: Task) -> int:
    """Optimizer steps per epoch of the task's training set: global batches, whatever the ranks."""
    return math.ceil(len(task.train) / cfg.global_batch_size)


@dataclass(frozen=True)
class Stage:
    name: str  # search | ticket | dense
    lr: float
    steps: int  # optimizer steps its LR schedule spans (the search stage ends earlier, at the draw)
    warmup_steps: int


def plan_stages(cfg: FinetuneConfig, steps_per_epoch: int, already_pruned: bool) -> list[Stage]:
    r = cfg.recipe

    def stage(name: str, lr: float, epochs: float) -> Stage:
        steps = max(1, math.ceil(epochs * steps_per_epoch))
        return Stage(name, lr, steps, round(r.warmup_ratio * steps))

    if not cfg.earlybert.use_gates:
        return [stage("dense", r.dense_lr, r.dense_epochs)]
    ticket = stage("ticket", r.lr, r.epochs)
    return [ticket] if already_pruned else [stage("search", r.search_lr, r.search_epochs), ticket]


def run_stages(cfg: FinetuneConfig, start: Start, steps_per_epoch: int) -> list[Stage]:
    """The stages of this run: the recipe's for the model it starts from, or those a resumed run started with."""
    stages = plan_stages(cfg, steps_per_epoch, already_pruned=start.tag is None and not start.model_config.is_uniform)
    return stages if start.tag is None else [s for s in stages if s.name in start.state.task["stages"]] or stages


@dataclass(kw_only=True)
class FinetuneRun(core.Run):
    """The run (pipeline/run/core.py) with what fine-tuning adds: the task and the recipe's stages."""

    task: Task
    stages: list[Stage]
    steps_per_epoch: int
    universal: bool = False  # resumed from a checkpoint of another number of ranks

    @property
    def stage(self) -> Stage:
        return self.stages[self.state.stage]


def stage_spec(cfg: FinetuneConfig, stage: Stage, world_size: int, universal: bool) -> EngineSpec:
    """The engine of a stage: its peak LR and schedule length, the recipe's AdamW settings over the JSON's."""
    ds = deepspeed_config(cfg, world_size, load_universal=universal, lr=stage.lr)
    params = ds["optimizer"]["params"]
    for key, value in (("weight_decay", cfg.recipe.weight_decay), ("eps", cfg.recipe.adam_epsilon)):
        if value is not None:
            params[key] = value
    r = cfg.recipe
    optim = OptimConfig(
        lr=stage.lr,
        schedule=r.schedule,
        warmup_steps=stage.warmup_steps,
        decay_fraction=r.decay_fraction,
        decay_shape=r.decay_shape,
    )
    return EngineSpec(ds, optim, stage.steps, compile=cfg.compile)


def finetune(cfg: FinetuneConfig, task: Task, start: Start, initial, dist: distributed.DistInfo) -> int:
    state, run_files = start.state, cfg.run_files
    steps_per_epoch = epoch_steps(cfg, task)
    stages = run_stages(cfg, start, steps_per_epoch)
    if start.tag is None:
        state.task = {"stages": [s.name for s in stages]}
        if stages[0].name == "ticket":
            core.say(
                dist,
                "finetune",
                "the model is already a ticket (pruned by EarlyBERT pre-training): no search, training it",
            )
    if state.stage == len(stages):
        core.say(dist, "finetune", f"{run_files.checkpoints / start.tag} is the end of the run: nothing left to train")
        return 0
    if dist.is_main:
        run_files.write_config(cfg.to_dict())
        task.tokenizer.save_pretrained(run_files.tokenizer)  # the run carries its tokenizer: export finds it there
    universal = core.prepare_universal(cfg, start, dist, "finetune")
    model = initial if initial is not None else model_class(start.model_config)(start.model_config)
    model.train()  # from_pretrained returns a model in eval mode: dropout would be off while fine-tuning
    method = search_config_in_steps(cfg.earlybert, cfg.recipe, steps_per_epoch)
    run = FinetuneRun(
        command="finetune",
        cfg=cfg,
        dist=dist,
        state=state,
        search=SearchStage(method, cfg.seed, run_files, dist.is_main, start.model_config),
        spec=stage_spec(cfg, stages[state.stage], dist.world_size, universal),
        stop=distributed.StopRequest(),
        task=task,
        stages=stages,
        steps_per_epoch=steps_per_epoch,
        universal=universal,
    )
    run.say(batch_plan(cfg, dist.world_size).describe())
    run.engine = build_engine(model, run.spec)
    del model, initial  # run.engine is the only reference: the draw frees the dense engine before building the next
    core.start_engine(run, start, universal)
    if start.tag is None and run.search.searching and cfg.earlybert.after_draw == "rewind":
        weights = full_weights(run.engine)  # a collective
        if dist.is_main:
            run_files.save_start_weights(weights)
    planned = sum(s.steps for s in stages[state.stage :]) + state.step - state.stage_samples // cfg.global_batch_size
    run.log = core.open_metrics(run, planned)
    code = core.train_to_end(run, lambda: state.stage < len(stages), lambda: run_stage(run))
    if code == 0 and dist.is_main:
        results = summarize(run)
        run_files.write_results(results)
        run.say(f"done: {state.step} steps; final {results['final']}; {run_files.results_file} written")
    return code


def run_stage(run: FinetuneRun) -> bool:
    """Train the current stage to its end or its draw (True), or until a signal (False)."""
    cfg, state, task = run.cfg, run.state, run.task
    stage, global_batch = run.stage, cfg.global_batch_size
    micro, world = batch_plan(cfg, run.dist.world_size).micro, run.dist.world_size
    compiling = cfg.compile  # torch.compile compiles in a stage's first step (a new or rebuilt engine)
    while state.stage_samples < stage.steps * global_batch:
        stage_step = state.stage_samples // global_batch
        order = step_examples(len(task.train), cfg.seed, state.stage, stage_step, run.steps_per_epoch, global_batch)
        micro_batches = [
            collate(task.train, order[(m * world + run.dist.rank) * micro :][:micro], task.tokenizer)
            for m in range(global_batch // (micro * world))
        ]
        searching = stage.name == "search"
        step = core.synced_step(run, micro_batches, core.gate_stats, searching=searching, compiling=compiling)
        compiling = False
        epoch = state.stage_samples / (run.steps_per_epoch * global_batch)
        run.log.log({**core.step_record(run, step), "stage": stage.name, "epoch": epoch})
        decision = core.search_decision(run) if searching else None
        stage_done = decision is not None or state.stage_samples == stage.steps * global_batch
        if decision is not None:
            draw(run, decision)
        elif stage_done:
            state.stage, state.stage_samples = state.stage + 1, 0
            evaluate_and_log(run, stage, epoch)
        elif eval_due(
            cfg.eval.every_steps, stage, state.step, state.stage_samples // global_batch, run.steps_per_epoch
        ):
            evaluate_and_log(run, stage, epoch)
        # A checkpoint right after the draw: a relaunch then starts from the pruned engine.
        if step.stopping or stage_done or state.step % cfg.checkpoint.interval == 0:
            run.save()
        if step.stopping:
            return False
        if stage_done:
            return True
    return True


def eval_due(every_steps: int | None, stage: Stage, step: int, stage_step: int, steps_per_epoch: int) -> bool:
    """Evaluations of the trained model (not of the search stage's, which is only ever a means to a ticket)."""
    if stage.name == "search":
        return False
    return step % every_steps == 0 if every_steps else stage_step % steps_per_epoch == 0


def draw(run: FinetuneRun, decision: Decision) -> None:
    """Prune to the ticket and go on to the ticket stage: the pre-trained weights pruned (rewind) or the
    current ones (continue), gates kept as free parameters, a fresh optimizer and LR schedule."""
    method, state = run.cfg.earlybert, run.state
    run.say(
        f"ticket drawn at step {decision.step} (epoch {decision.step / run.steps_per_epoch:.2f}): {decision.reason}"
    )
    start_weights = run.cfg.run_files.load_start_weights() if method.after_draw == "rewind" else None
    state.stage, state.stage_samples = state.stage + 1, 0
    run.spec = stage_spec(run.cfg, run.stage, run.dist.world_size, run.universal)
    record = core.draw(
        run,
        decision,
        run.cfg.task.max_seq_length,
        carry_moments=False,
        start_weights=start_weights,
        carry_schedule=False,
    )
    run.say(
        f"pruned to heads {record['heads_per_layer']}, FFN {record['ffn_per_layer']}, engine rebuilt in "
        f"{record['rebuild_s']:.1f} s; training the ticket for {run.stage.steps} steps at lr {run.stage.lr}",
    )


if __name__ == "__main__":
    sys.exit(distributed.end_rank_process(main()))
