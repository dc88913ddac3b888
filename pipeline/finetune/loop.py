"""`earlybert finetune --config FILE [key=value ...]`: EarlyBERT on a downstream task (GLUE, SQuAD, your data).

    main        config, task data and features, the starting point: all checked before any process group
    finetune    the model and its engine (pipeline/engine/deepspeed_engine.py), the search stage (pipeline/earlybert/search.py), the stages
    run_stage   the loop: a step, its statistics summed over ranks, metrics, evaluations, the draw, checkpoints
    draw        prune to the ticket: rewind to the pre-trained weights (or continue), a fresh optimizer and schedule
    evaluate    every rank predicts its share of the validation features, rank 0 scores them

The stages of a run (`earlybert.mode`):
    earlybert, fixed, random   search (gates + L1, until the ticket is drawn), then ticket (the pruned model)
    dense                      dense (plain BERT, the baseline)
    a model pruned by EarlyBERT pre-training is a ticket already: ticket only, no search

The same launchers, checkpoints and signals as `earlybert train`: relaunching the command resumes from
RUN/checkpoints/latest to the sample, SIGTERM/SIGUSR1 checkpoint and exit with EXIT_INTERRUPTED.
Evaluations go to RUN/eval.jsonl, the final and best metrics with the times to RUN/results.json.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.launchers import launched_rank
from pipeline.cli import EXIT_INTERRUPTED, run_config_stage
from pipeline.config import (
    ConfigError,
    OptimConfig,
    batch_plan,
    check_resumed_batch,
    deepspeed_config,
    gather_problems,
    zero_stage,
)
from pipeline.earlybert.detector import Decision
from pipeline.earlybert.search import SearchStage, read_random_like, warn_if_no_natural_draw
from pipeline.engine import distributed, guards
from pipeline.engine.deepspeed_engine import EngineSpec, build_engine, full_weights, prune_engine, train_step
from pipeline.finetune.config import FinetuneConfig, load_finetune_config, search_config_in_steps
from pipeline.finetune.tasks import TaskError, TaskSpec, compute_metrics, encode_classification, load_task
from pipeline.model import EarlyBertConfig, EarlyBertForQuestionAnswering, EarlyBertForSequenceClassification
from pipeline.run import checkpoint
from pipeline.run.check import launch_plan, search_plan
from pipeline.run.checkpoint import CheckpointError, RunState
from pipeline.run.metrics import MetricsLog, optimizer_stats
from pipeline.run.resume import Start, execution_options, resumes_on_other_ranks
from pipeline.run.rundir import RunDir
from pipeline.tools.export import model_class

INPUTS = ("input_ids", "token_type_ids", "attention_mask")


def main(argv: list[str] | None = None) -> int:
    return run_config_stage(
        "finetune",
        sys.argv[1:] if argv is None else argv,
        prepare,
        lambda prepared, d: finetune(*prepared, d),
        ERRORS,
        plan,
    )


def prepare(args, world_size: int) -> tuple:
    """The config, the task's data and features, where the run starts, all checked from files for a launch on
    world_size ranks."""
    cfg = load_finetune_config(args.config, args.overrides)
    _, task = gather_problems(ERRORS, lambda: batch_plan(cfg, world_size), lambda: prepare_task(cfg))
    start, initial = find_start(cfg, task)
    check_tokenizer_fits(cfg, task, start.model_config)
    if start.tag:
        check_resumed_batch(cfg, start.state, cfg.rundir.checkpoints / start.tag)
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


class FineTuneError(ValueError):
    """A model to start from that cannot be fine-tuned as asked; the message says what to change."""


ERRORS = (ConfigError, CheckpointError, TaskError, FineTuneError)


# ---- the task, before any process group -------------------------------------------------------


@dataclass
class Task:
    spec: TaskSpec
    tokenizer: object  # a fast tokenizer: QA needs its offsets
    train: object  # datasets.Dataset of model inputs and labels
    validation: dict  # split -> (examples, features)
    tokenizer_hash: str

    @property
    def kind(self) -> str:
        return self.spec.kind


def prepare_task(cfg: FinetuneConfig) -> Task:
    """Read, check and tokenize the task's data (every rank alike: it is deterministic). Counts of what
    had to be cut or skipped are printed, never silently dropped."""
    import datasets

    datasets.disable_progress_bars()  # the counts that matter are printed below
    data = load_task(cfg.task)
    tokenizer = load_tokenizer(cfg)
    t, notes = cfg.task, []
    if data.spec.kind == "qa":
        from pipeline.finetune.squad import prepare_train_features, prepare_validation_features

        train, stats = prepare_train_features(data.train, tokenizer, t.max_seq_length, t.doc_stride, t.max_query_length)
        notes.append(
            f"train: {stats.examples} questions in {stats.features} windows; {stats.truncated_questions} "
            f"questions cut to {t.max_query_length} tokens; {len(stats.skipped_ids)} skipped because their "
            f"answer is not in their context (first: {stats.skipped_ids[:3]})"
        )
        validation = {}
        for split, rows in data.validation.items():
            features, stats = prepare_validation_features(
                rows, tokenizer, t.max_seq_length, t.doc_stride, t.max_query_length
            )
            validation[split] = (rows, features)
    else:
        train, cut = encode_classification(data.train, tokenizer, data.spec, t.max_seq_length)
        notes.append(f"train: {len(train)} examples, {cut} truncated to {t.max_seq_length} tokens")
        validation = {}
        for split, rows in data.validation.items():
            features, cut = encode_classification(rows, tokenizer, data.spec, t.max_seq_length)
            validation[split] = (rows, features)
            notes.append(f"{split}: {len(features)} examples, {cut} truncated to {t.max_seq_length} tokens")
    if len(train) < cfg.global_batch_size:
        raise TaskError(
            f"the training split has {len(train)} examples (features), fewer than one batch of "
            f"global_batch_size={cfg.global_batch_size}; lower the batch size or add data"
        )
    if launched_rank(os.environ) == 0:
        for note in notes:
            print(f"[earlybert finetune] {note}", flush=True)
    tokenizer_hash = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
    return Task(data.spec, tokenizer, train, validation, tokenizer_hash)


# The files a Hugging Face tokenizer directory is read from (BERT's WordPiece: vocab.txt).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def load_tokenizer(cfg: FinetuneConfig):
    """The tokenizer that comes with init_from (a Hugging Face or export directory, or a pre-training run's
    shards), or model.tokenizer: a tokenizer.json or a directory."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    key = "model.tokenizer" if cfg.model.tokenizer else "model.init_from"
    source = Path(cfg.model.tokenizer or cfg.model.init_from)
    if not source.exists():
        raise FineTuneError(
            f"{key} {source} does not exist: give a Hugging Face BERT directory, an `earlybert "
            f"export` directory or a pre-training run directory"
        )
    if RunDir(source).checkpoints.is_dir():
        source = RunDir(source).shards(0) / "tokenizer.json"
    elif source.is_dir() and not any((source / name).is_file() for name in TOKENIZER_FILES):
        raise FineTuneError(
            f"{key} {source} holds no tokenizer ({', '.join(TOKENIZER_FILES)}): give a Hugging Face BERT "
            f"directory, an `earlybert export` directory, a pre-training run directory, or model.tokenizer"
        )
    try:
        if source.is_file():
            return PreTrainedTokenizerFast(
                tokenizer_file=str(source),
                unk_token="[UNK]",
                sep_token="[SEP]",
                pad_token="[PAD]",
                cls_token="[CLS]",
                mask_token="[MASK]",
            )
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as e:
        raise FineTuneError(
            f"cannot load a tokenizer from {source}: {e}; set model.tokenizer to a tokenizer.json "
            f"or a directory holding one"
        ) from e


# ---- the model and where the run starts -------------------------------------------------------


def check_tokenizer_fits(cfg: FinetuneConfig, task: Task, model_config) -> None:
    """A tokenizer with more ids than the model has embeddings fails in the forward pass on its first rare word."""
    if len(task.tokenizer) > model_config.vocab_size:
        raise FineTuneError(
            f"the tokenizer ({cfg.model.tokenizer or cfg.model.init_from}: {len(task.tokenizer)} ids) is larger "
            f"than the model's vocabulary ({model_config.vocab_size} embeddings, model.init_from "
            f"{cfg.model.init_from}); use the tokenizer the model was trained with"
        )


def task_fields(spec: TaskSpec) -> dict:
    """What a config needs to build the task's model, and what an export keeps of it."""
    cls = EarlyBertForQuestionAnswering if spec.kind == "qa" else EarlyBertForSequenceClassification
    fields = {"architectures": [cls.__name__], "num_labels": spec.num_labels}
    if spec.kind == "classification":
        fields.update(id2label=spec.id2label, label2id=spec.label2id, problem_type="single_label_classification")
    elif spec.kind == "regression":
        fields.update(problem_type="regression")
    return fields


def find_start(cfg: FinetuneConfig, task: Task) -> tuple[Start, torch.nn.Module | None]:
    """The checkpoint to resume from (checkpoint.resume_tag), checked against the task; or step 0 with the
    initial model (pre-trained encoder, new task head), loaded here before any process group."""
    rundir = cfg.rundir
    tag = checkpoint.resume_tag(rundir.checkpoints, cfg.resume_from, cfg.checkpoint.verify)
    if tag is not None:
        state, architecture = checkpoint.read_tag(rundir.checkpoints, tag)
        where = rundir.checkpoints / tag
        if (
            architecture.get("architectures") != task_fields(task.spec)["architectures"]
            or architecture.get("num_labels", 2) != task.spec.num_labels
        ):
            raise ConfigError(
                f"{where} is a checkpoint of another task head ({architecture.get('architectures')}, "
                f"{architecture.get('num_labels')} labels) than task {cfg.task.name or cfg.task.kind}"
            )
        if state.tokenizer_hash != task.tokenizer_hash:
            source = cfg.model.tokenizer or cfg.model.init_from
            raise ConfigError(
                f"{where} was fine-tuned with another tokenizer than {source}'s; use the run's "
                f"model.init_from (and model.tokenizer) or a new run_dir"
            )
        config = EarlyBertConfig.from_dict({**architecture, **execution_options(cfg.model.overrides)})
        return Start(tag, state, config), None
    model = initial_model(cfg, task.spec)
    return Start(None, RunState(tokenizer_hash=task.tokenizer_hash), model.config), model


def initial_model(cfg: FinetuneConfig, spec: TaskSpec) -> torch.nn.Module:
    """The pre-trained encoder with a new task head: from a Hugging Face or `earlybert export` directory,
    or from a pre-training run's latest checkpoint. Gates (initialised to 1) unless the mode is dense."""
    fields = {**task_fields(spec), "use_gates": cfg.earlybert.use_gates, **cfg.model.overrides}
    cls = EarlyBertForQuestionAnswering if spec.kind == "qa" else EarlyBertForSequenceClassification
    source = Path(cfg.model.init_from)
    torch.manual_seed(cfg.seed)  # the new head's initialisation, the same on every rank
    if RunDir(source).checkpoints.is_dir():
        from pipeline.tools.export import ExportError, load_run_model

        try:
            pretrained, _ = load_run_model(source)
        except ExportError as e:
            raise FineTuneError(str(e)) from None
        config = EarlyBertConfig.from_dict({**pretrained.config.to_dict(), **fields})
        model = cls(config)
        encoder = {k: v for k, v in pretrained.state_dict().items() if k.startswith("bert.")}
        _, unexpected = model.load_state_dict(encoder, strict=False)
        if unexpected:
            raise FineTuneError(f"{source}: the checkpoint's encoder does not fit {cls.__name__}: {unexpected[:5]}")
        return model
    if not (source / "config.json").is_file():
        raise FineTuneError(
            f"model.init_from {source} is neither a model directory (config.json and weights: a "
            f"Hugging Face BERT or an `earlybert export`) nor a run directory with checkpoints/"
        )
    try:
        config = EarlyBertConfig.from_pretrained(str(source), **fields)
        return cls.from_pretrained(str(source), config=config)
    except (OSError, ValueError) as e:
        raise FineTuneError(f"cannot load the model in {source}: {e}") from e


# ---- the stages -------------------------------------------------------------------------------


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


@dataclass
class Run:
    cfg: FinetuneConfig
    task: Task
    dist: distributed.DistInfo
    state: RunState
    stages: list[Stage]
    steps_per_epoch: int
    engine: object
    search: SearchStage
    log: MetricsLog
    stop: distributed.StopRequest
    universal: bool = False

    @property
    def stage(self) -> Stage:
        return self.stages[self.state.phase]

    def spec(self, stage: Stage) -> EngineSpec:
        ds = deepspeed_config(self.cfg, self.dist.world_size, load_universal=self.universal, lr=stage.lr)
        params = ds["optimizer"]["params"]
        for key, value in (("weight_decay", self.cfg.recipe.weight_decay), ("eps", self.cfg.recipe.adam_epsilon)):
            if value is not None:
                params[key] = value
        optim = OptimConfig(lr=stage.lr, schedule=self.cfg.recipe.schedule, warmup_steps=stage.warmup_steps)
        return EngineSpec(ds, optim, stage.steps, compile=self.cfg.compile)

    def save(self) -> None:
        _say(self.dist, f"checkpoint {checkpoint.save_run(self)}")


def finetune(cfg: FinetuneConfig, task: Task, start: Start, initial, d: distributed.DistInfo) -> int:
    state, rundir = start.state, cfg.rundir
    global_batch = cfg.global_batch_size
    steps_per_epoch = epoch_steps(cfg, task)
    stages = run_stages(cfg, start, steps_per_epoch)
    if start.tag is None:
        state.task = {"stages": [s.name for s in stages]}
        if stages[0].name == "ticket":
            _say(d, "the model is already a ticket (pruned by EarlyBERT pre-training): no search, training it")
    if state.phase == len(stages):
        _say(d, f"{rundir.checkpoints / start.tag} is the end of the run: nothing left to train")
        return 0
    if d.is_main:
        rundir.write_config(cfg.to_dict())
        task.tokenizer.save_pretrained(rundir.tokenizer)  # the run carries its tokenizer: export finds it there
    universal = resumes_on_other_ranks(cfg, start, d.world_size)
    if universal:
        checkpoint.make_universal(rundir.checkpoints, start.tag, d)
    model = initial if initial is not None else model_class(start.model_config)(start.model_config)
    model.train()  # from_pretrained returns a model in eval mode: dropout would be off while fine-tuning
    search = SearchStage(
        search_config_in_steps(cfg.earlybert, cfg.recipe, steps_per_epoch),
        cfg.seed,
        rundir,
        d.is_main,
        start.model_config,
    )
    run = Run(
        cfg,
        task,
        d,
        state,
        stages,
        steps_per_epoch,
        None,
        search,
        log=None,
        stop=distributed.StopRequest(),
        universal=universal,
    )
    spec = run.spec(run.stage)
    _say(d, batch_plan(cfg, d.world_size).describe())
    run.engine = build_engine(model, spec)
    del model, initial
    if start.tag:
        checkpoint.load(run.engine, rundir.checkpoints, start.tag, state, d, universal)
        search.load_state_dict(state.search)
        _say(d, f"resumed from {rundir.checkpoints / start.tag}: stage {run.stage.name}, step {state.step}")
    else:
        torch.manual_seed(cfg.seed + 1 + d.rank)  # dropout: a different stream on each rank
        if search.searching and cfg.earlybert.after_draw == "rewind":
            weights = full_weights(run.engine)  # a collective
            if d.is_main:
                rundir.save_start_weights(weights)
    state.world_size, state.zero_stage = d.world_size, zero_stage(spec.ds_config)
    planned = sum(s.steps for s in stages[state.phase :]) + state.step - state.phase_samples // global_batch
    run.log = MetricsLog(
        rundir,
        cfg.log,
        total_steps=planned,
        start_step=state.step,
        config=cfg.to_dict(),
        monitor=run.engine.monitor,
        is_main=d.is_main,
    )
    try:
        with guards.steps(cfg.dist_timeout.step_s, lambda: state.step + 1, d):
            while state.phase < len(stages):
                if not run_stage(run):
                    _say(d, f"stopped by a signal at step {state.step}; relaunch the same command to resume")
                    return EXIT_INTERRUPTED
    finally:
        run.log.close()
        if run.engine is not None:  # None when a rebuild failed after freeing the dense engine
            run.engine.destroy()
    if d.is_main:
        results = summarize(run)
        rundir.write_results(results)
        _say(d, f"done: {state.step} steps; final {results['final']}; {rundir.results_file} written")
    return 0


def run_stage(run: Run) -> bool:
    """Train the current stage to its end or its draw (True), or until a signal (False)."""
    cfg, state, task = run.cfg, run.state, run.task
    stage, global_batch = run.stage, cfg.global_batch_size
    micro, world = batch_plan(cfg, run.dist.world_size).micro, run.dist.world_size
    compiling = cfg.compile  # torch.compile compiles in a stage's first step (a new or rebuilt engine)
    while state.phase_samples < stage.steps * global_batch:
        stage_step = state.phase_samples // global_batch
        t0, lr = time.perf_counter(), run.engine.lr_scheduler.get_last_lr()[0]
        order = step_examples(len(task.train), cfg.seed, state.phase, stage_step, run.steps_per_epoch, global_batch)
        micro_batches = [
            collate(task.train, order[(m * world + run.dist.rank) * micro :][:micro], task.tokenizer)
            for m in range(global_batch // (micro * world))
        ]
        lambdas = run.search.gate_lambdas() if stage.name == "search" else None
        skipped = run.engine.skipped_steps
        with guards.patient(compiling):  # a rank may compile for minutes while the others wait
            stats = train_step(run.engine, micro_batches, run.dist.device, task_stats, gate_lambdas=lambdas)
            stats["stop"] = torch.tensor(float(run.stop.signum != 0))
            totals = distributed.sum_over_ranks(stats, run.dist)
        compiling = False
        guards.check_finite(
            totals["loss"], run.engine.skipped_steps == skipped, cfg.nonfinite, run.engine.fp16_enabled(), state
        )
        step_time = time.perf_counter() - t0
        state.step += 1
        state.samples += global_batch
        state.phase_samples += global_batch
        epoch = state.phase_samples / (run.steps_per_epoch * global_batch)
        run.log.log(step_record(run, totals, lambdas is not None, epoch=epoch, lr=lr, step_time=step_time))
        decision = run.search.decide(run.engine.module, state.step) if stage.name == "search" else None
        stage_done = decision is not None or state.phase_samples == stage.steps * global_batch
        if decision is not None:
            with guards.patient():
                draw(run, decision)
        elif stage_done:
            state.phase, state.phase_samples = state.phase + 1, 0
            evaluate_and_log(run, stage, epoch)
        elif eval_due(
            cfg.eval.every_steps, stage, state.step, state.phase_samples // global_batch, run.steps_per_epoch
        ):
            evaluate_and_log(run, stage, epoch)
        stopping = totals["stop"] > 0
        # A checkpoint right after the draw: a relaunch then starts from the pruned engine.
        if stopping or stage_done or state.step % cfg.checkpoint.interval == 0:
            run.save()
        if stopping:
            return False
        if stage_done:
            return True
    return True


def eval_due(every_steps: int | None, stage: Stage, step: int, stage_step: int, steps_per_epoch: int) -> bool:
    """Evaluations of the trained model (not of the search stage's, which is only ever a means to a ticket)."""
    if stage.name == "search":
        return False
    return step % every_steps == 0 if every_steps else stage_step % steps_per_epoch == 0


def step_examples(
    n: int, seed: int, stage: int, stage_step: int, steps_per_epoch: int, global_batch: int
) -> np.ndarray:
    """The training examples of one step: a permutation per (seed, stage, epoch), the last batch of an
    epoch filled from the epoch's start, so that every step is whole. A function of its arguments only:
    a resumed run sees exactly the examples the interrupted one would have."""
    epoch, k = divmod(stage_step, steps_per_epoch)
    order = np.random.default_rng([seed, stage, epoch]).permutation(n)
    order = np.concatenate([order, order[: steps_per_epoch * global_batch - n]])
    return order[k * global_batch : (k + 1) * global_batch]


def collate(features, indices, tokenizer) -> dict[str, torch.Tensor]:
    """Model inputs of the given features, padded to the longest of them (dynamic padding)."""
    rows = features[[int(i) for i in indices]]
    longest = max(len(ids) for ids in rows["input_ids"])
    pad = {"input_ids": tokenizer.pad_token_id, "token_type_ids": 0, "attention_mask": 0}
    batch = {k: torch.tensor([row + [pad[k]] * (longest - len(row)) for row in rows[k]]) for k in INPUTS}
    for k in ("labels", "start_positions", "end_positions"):
        if k in rows:
            batch[k] = torch.tensor(rows[k])
    return batch


def task_stats(out) -> dict[str, torch.Tensor]:
    zero = torch.zeros((), device=out.loss.device)
    return {
        "loss": out.task_loss,
        "micro_batches": zero + 1,
        "gate_l1": zero if out.gate_l1 is None else sum(out.gate_l1),
        "gate_penalty": zero if out.gate_penalty is None else out.gate_penalty,
    }


def step_record(run: Run, s: dict[str, float], searching: bool, *, epoch: float, lr: float, step_time: float) -> dict:
    micro = s["micro_batches"]
    r = {
        "step": run.state.step,
        "stage": run.stage.name,
        "epoch": epoch,
        "loss": s["loss"] / micro,
        "lr": lr,
        "samples": run.state.samples,
        "time": time.time(),
        "step_time_s": step_time,
        "seq_per_s": run.cfg.global_batch_size / step_time,
        **optimizer_stats(run.engine),
        "nonfinite_skipped": run.state.nonfinite_skipped,
    }
    if run.engine.module.config.use_gates:
        r["gate_l1"] = s["gate_l1"] / micro
    if searching:
        r["gate_penalty"] = s["gate_penalty"] / micro
    return r


# ---- the draw ---------------------------------------------------------------------------------


def draw(run: Run, decision: Decision) -> None:
    """Prune to the ticket and go on to the ticket stage: the pre-trained weights pruned (rewind) or the
    current ones (continue), gates kept as free parameters, a fresh optimizer and LR schedule."""
    eb, d = run.cfg.earlybert, run.dist
    _say(
        d, f"ticket drawn at step {decision.step} (epoch {decision.step / run.steps_per_epoch:.2f}): {decision.reason}"
    )
    before = run.engine.module.config
    start_weights = run.cfg.rundir.load_start_weights() if eb.after_draw == "rewind" else None
    run.state.phase, run.state.phase_samples = run.state.phase + 1, 0
    t0 = time.perf_counter()
    prune_engine(  # replaces run.engine; the run holds the only reference to the dense engine
        run,
        run.spec(run.stage),
        decision.masks,
        fold_gates=eb.fold_gates,
        carry_moments=False,
        start_weights=start_weights,
        carry_schedule=False,
    )
    record = run.search.record_draw(
        decision, before, run.engine.module.config, run.cfg.task.max_seq_length, time.perf_counter() - t0
    )
    _say(
        d,
        f"pruned to heads {record['heads_per_layer']}, FFN {record['ffn_per_layer']}, engine rebuilt in "
        f"{record['rebuild_s']:.1f} s; training the ticket for {run.stage.steps} steps at lr {run.stage.lr}",
    )


# ---- evaluation -------------------------------------------------------------------------------


@torch.no_grad()
def predict(run: Run, features) -> list | None:
    """Every rank runs the model on its share of the features (the same number of batches on every rank:
    ZeRO-3 gathers parameters collectively); rank 0 gets every feature's outputs, in order."""
    n, world, rank = len(features), run.dist.world_size, run.dist.rank
    per_rank = math.ceil(n / world)
    mine = [min(rank + world * i, n - 1) for i in range(per_rank)]
    size = run.cfg.eval.batch_size
    outputs = []
    run.engine.eval()
    for start in range(0, per_rank, size):
        indices = mine[start : start + size]
        batch = collate(features, indices, run.task.tokenizer)
        lengths = batch["attention_mask"].sum(1).tolist()
        batch = {k: v.to(run.dist.device) for k, v in batch.items() if k in INPUTS}
        out = run.engine(**batch)
        if run.task.kind == "qa":
            rows = zip(out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy())
            outputs += [(s[:length], e[:length]) for (s, e), length in zip(rows, lengths)]
        else:
            outputs += list(out.logits.float().cpu().numpy())
    run.engine.train()
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, outputs)
    if not run.dist.is_main:
        return None
    ordered = [None] * n
    for r, outs in enumerate(gathered):
        for i, out in zip((min(r + world * i, n - 1) for i in range(per_rank)), outs):
            ordered[i] = out
    return ordered


def evaluate(run: Run) -> dict | None:
    """{split: metrics} on rank 0 (None elsewhere); every rank calls it."""
    results = {}
    for split, (examples, features) in run.task.validation.items():
        outputs = predict(run, features)
        if outputs is None:
            continue
        t = run.cfg.task
        if run.task.kind == "qa":
            from pipeline.finetune.squad import postprocess_predictions, squad_metrics

            v2 = run.task.spec.version_2_with_negative or t.version_2_with_negative
            answers = postprocess_predictions(
                examples,
                features,
                [o[0] for o in outputs],
                [o[1] for o in outputs],
                t.n_best_size,
                t.max_answer_length,
                v2,
                t.null_score_diff_threshold,
            )
            results[split] = squad_metrics(answers, examples, v2)
        else:
            results[split] = compute_metrics(run.task.spec, np.stack(outputs), np.asarray(features["labels"]))
    return results if run.dist.is_main else None


def evaluate_and_log(run: Run, stage: Stage, epoch: float) -> None:
    t0 = time.perf_counter()
    results = evaluate(run)
    if results is None:
        return
    record = {
        "step": run.state.step,
        "stage": stage.name,
        "epoch": epoch,
        "eval_s": time.perf_counter() - t0,
        "metrics": results,
    }
    run.cfg.rundir.append_eval(record)
    _say(
        run.dist,
        f"eval at step {run.state.step} ({stage.name}, epoch {epoch:.2f}): "
        + "; ".join(f"{split} " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()) for split, m in results.items()),
    )


def main_metric(metrics: dict) -> float:
    """The number a run is judged by: the first metric of the first validation split (accuracy, F1,
    Matthews correlation, Pearson, exact match, as the task's official metric puts first)."""
    first = next(iter(metrics.values()))
    return next(iter(first.values()))


def summarize(run: Run) -> dict:
    """RUN/results.json, from what the run wrote (metrics.jsonl, eval.jsonl, ticket.json), so that it is
    right however often the run was interrupted and resumed."""
    rundir = run.cfg.rundir
    records, evals, ticket = rundir.read_metrics(), rundir.read_evals(), rundir.read_ticket()
    final = [e for e in evals if e["step"] == run.state.step] or evals[-1:]
    rebuild_s = (ticket or {}).get("rebuild_s", 0.0)
    search_s = sum(r["step_time_s"] for r in records if r.get("stage") == "search") + rebuild_s
    results = {
        "task": run.cfg.task.name or run.task.kind,
        "mode": run.cfg.earlybert.mode,
        "steps": run.state.step,
        "stages": run.state.task["stages"],
        "final": final[-1]["metrics"] if final else None,
        "best": max(evals, key=lambda e: main_metric(e["metrics"])) if evals else None,
        # Training time, the search and the rebuild included; evaluations and start-up apart.
        "train_s": records[-1]["wall_s"] + rebuild_s,
        "search_s": search_s,
        "eval_s": sum(e["eval_s"] for e in evals),
        "heads_per_layer": run.engine.module.config.num_heads_per_layer,
        "ffn_per_layer": run.engine.module.config.intermediate_size_per_layer,
    }
    if ticket:
        results.update(
            draw_step=ticket["draw_step"],
            draw_forced=ticket["forced"],
            params_before=ticket["params_before"],
            params_after=ticket["params_after"],
        )
    return results


def _say(d: distributed.DistInfo, msg: str) -> None:
    if d.is_main:
        print(f"[earlybert finetune] {msg}", flush=True)


if __name__ == "__main__":
    sys.exit(distributed.end_rank_process(main()))
