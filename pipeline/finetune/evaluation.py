"""Fine-tuning's evaluation: every rank predicts its share of the validation features, rank 0 scores them with
the task's metrics (GLUE's, SQuAD's) and logs them to RUN/eval.jsonl; `summarize` writes RUN/results.json
from what the run wrote, however often it was interrupted."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.finetune.data import INPUTS, collate
from pipeline.finetune.tasks import compute_metrics

if TYPE_CHECKING:
    from pipeline.finetune.loop import FinetuneRun, Stage


@torch.no_grad()
def predict(run: FinetuneRun, features) -> list | None:
    """Every rank runs the model on its share of the features (the same number of batches on every rank:
    ZeRO-3 gathers parameters collectively); rank 0 gets every feature's outputs, in order: logits (num_labels,),
    per-token logits (T, num_labels) for token classification and (start, end) logits (T,) for QA, T the
    feature's own length."""
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
        elif run.task.kind == "token_classification":
            outputs += [logits[:length] for logits, length in zip(out.logits.float().cpu().numpy(), lengths)]
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


def evaluate(run: FinetuneRun) -> dict | None:
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
        elif run.task.kind == "token_classification":
            results[split] = compute_metrics(run.task.spec, outputs, features["labels"])
        else:
            results[split] = compute_metrics(run.task.spec, np.stack(outputs), np.asarray(features["labels"]))
    return results if run.dist.is_main else None


def evaluate_and_log(run: FinetuneRun, stage: Stage, epoch: float) -> None:
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
    run.cfg.run_files.append_eval(record)
    run.say(
        f"eval at step {run.state.step} ({stage.name}, epoch {epoch:.2f}): "
        + "; ".join(f"{split} " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()) for split, m in results.items()),
    )


def main_metric(metrics: dict) -> float:
    """The number a run is judged by: the first metric of the first validation split (accuracy, F1,
    Matthews correlation, Pearson, exact match, entity F1, as the task's official metric puts first)."""
    first = next(iter(metrics.values()))
    return next(iter(first.values()))


def summarize(run: FinetuneRun) -> dict:
    """RUN/results.json, from what the run wrote (metrics.jsonl, eval.jsonl, ticket.json), so that it is
    right however often the run was interrupted and resumed."""
    rundir = run.cfg.run_files
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
