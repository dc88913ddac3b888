"""The fine-tuning recipe against the official code (VITA-Group/EarlyBERT, finetune/launch_earlybert_glue.sh and
trainer.py): the search's LR schedule, AdamW's weight decay and epsilon, and where the L1 term meets gradient
accumulation."""

import copy
import inspect

import pytest
import torch
import yaml

from pipeline import EarlyBertConfig
from pipeline.config import ConfigError
from pipeline.engine.deepspeed_engine import lr_factor, train_step
from pipeline.finetune.config import load_finetune_config
from pipeline.finetune.loop import plan_stages, stage_spec
from pipeline.model import EarlyBertForSequenceClassification
from tiny import NO_DROPOUT, spread_gates

LAMBDAS = (1e-2, 2e-2)  # (heads, FFN): large enough that the L1 part of a gate's gradient is far above rounding


def write_config(tmp_path, **recipe):
    path = tmp_path / "ft.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(tmp_path / "run"),
                "task": {"kind": "classification", "train_files": [str(tmp_path / "train.csv")]},
                "model": {"init_from": str(tmp_path / "model")},
                "recipe": recipe,
            }
        )
    )
    return str(path)


def test_the_search_schedule_spans_3_epochs_so_the_draw_comes_at_093_of_the_peak_lr(tmp_path):
    cfg = load_finetune_config(write_config(tmp_path))
    steps_per_epoch = 100
    search = plan_stages(cfg, steps_per_epoch, already_pruned=False)[0]
    assert (search.name, search.steps, search.lr) == ("search", 300, 2e-5)
    spec = stage_spec(cfg, search, 1, False)
    draw_step = round(cfg.recipe.draw_epoch * steps_per_epoch)
    assert lr_factor(spec.optim, spec.total_steps, draw_step) == pytest.approx(1 - 0.2 / 3)


def test_wsd_draws_at_the_peak_lr_and_the_tickets_stage_decays_over_its_own_last_steps(tmp_path):
    cfg = load_finetune_config(write_config(tmp_path, schedule="wsd", decay_fraction=0.2, decay_shape="linear"))
    search, ticket = (stage_spec(cfg, s, 1, False) for s in plan_stages(cfg, 100, already_pruned=False))
    assert lr_factor(search.optim, search.total_steps, round(cfg.recipe.draw_epoch * 100)) == 1.0
    assert ticket.total_steps == 200 and ticket.optim.wsd_decay_start(ticket.total_steps) == 160
    assert [lr_factor(ticket.optim, 200, s) for s in (159, 160, 180, 199)] == pytest.approx([1, 1, 0.5, 0.025])


@pytest.mark.parametrize("stage_index", [0, 1])  # search and ticket: every stage's engine
def test_adamw_has_no_weight_decay_and_epsilon_1e8_whatever_the_deepspeed_json_says(tmp_path, stage_index):
    cfg = load_finetune_config(write_config(tmp_path))  # ds_configs/zero1.json: weight_decay 0.01, eps 1e-6
    stage = plan_stages(cfg, 10, already_pruned=False)[stage_index]
    spec = stage_spec(cfg, stage, 1, False)
    params = spec.ds_config["optimizer"]["params"]
    assert (params["weight_decay"], params["eps"], params["lr"]) == (0.0, 1e-8, stage.lr)


def test_null_weight_decay_and_epsilon_keep_the_deepspeed_json_s(tmp_path):
    cfg = load_finetune_config(write_config(tmp_path, weight_decay=None, adam_epsilon=None))
    stage = plan_stages(cfg, 10, already_pruned=False)[0]
    spec = stage_spec(cfg, stage, 1, False)
    assert (spec.ds_config["optimizer"]["params"]["weight_decay"], spec.ds_config["optimizer"]["params"]["eps"]) == (
        0.01,
        1e-6,
    )


@pytest.mark.parametrize("key, value", [("weight_decay", -0.1), ("adam_epsilon", 0.0)])
def test_a_negative_weight_decay_or_a_zero_epsilon_is_refused(tmp_path, key, value):
    with pytest.raises(ConfigError, match=f"recipe.{key}"):
        load_finetune_config(write_config(tmp_path, **{key: value}))


# ---- the L1 term and gradient accumulation -----------------------------------------------------------------


class AccumulatingEngine:
    """The part of DeepSpeed's engine that train_step relies on here: backward divides the loss by the
    accumulation steps (DeepSpeedEngine.backward, scale_wrt_gas=True; checked below), step keeps the gradient
    summed over the micro-batches."""

    def __init__(self, model, accumulation: int):
        self.model, self.accumulation = model, accumulation

    def __call__(self, **kwargs):
        return self.model(**kwargs)

    def backward(self, loss):
        (loss / self.accumulation).backward()

    def step(self):
        pass


def test_deepspeed_divides_the_backward_loss_by_the_accumulation_steps():
    from deepspeed.runtime.engine import DeepSpeedEngine

    backward = DeepSpeedEngine.backward
    while "scale_wrt_gas" not in inspect.signature(backward).parameters:  # under DeepSpeed's instrumentation wrapper
        backward = next(c.cell_contents for c in backward.__closure__ if callable(c.cell_contents))
    assert inspect.signature(backward).parameters["scale_wrt_gas"].default is True


def gate_grads(model) -> torch.Tensor:
    return torch.cat([g.grad.flatten() for g in model.head_gates() + model.ffn_gates()])


def gate_l1_sign(model) -> torch.Tensor:
    """The gradient of lambda_heads * sum|head gates| + lambda_ffn * sum|FFN gates|."""
    heads = [LAMBDAS[0] * g.detach().sign().flatten() for g in model.head_gates()]
    ffn = [LAMBDAS[1] * g.detach().sign().flatten() for g in model.ffn_gates()]
    return torch.cat(heads + ffn)


def batch_of(size: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(5, 61, (size, 12), generator=g),
        "token_type_ids": torch.zeros(size, 12, dtype=torch.long),
        "attention_mask": torch.ones(size, 12, dtype=torch.long),
        "labels": torch.randint(0, 3, (size,), generator=g),
    }


def split(batch: dict, parts: int) -> list[dict]:
    return [{k: v.chunk(parts)[i] for k, v in batch.items()} for i in range(parts)]


def ours(model, batch, accumulation: int) -> torch.Tensor:
    """The gates' gradient of one optimizer step of ours: deepspeed_engine.train_step, as fine-tuning calls it."""
    model = copy.deepcopy(model)
    stats = lambda out: {"loss": out.task_loss}  # noqa: E731
    train_step(AccumulatingEngine(model, accumulation), split(batch, accumulation), "cpu", stats, gate_lambdas=LAMBDAS)
    return gate_grads(model)


def official(model, batch, accumulation: int) -> torch.Tensor:
    """The gates' gradient of one optimizer step of the official trainer.py's training_step: the task loss
    divided by the accumulation steps, then the L1 terms added, backward, for each micro-batch."""
    model = copy.deepcopy(model)
    for micro in split(batch, accumulation):
        loss = model(**micro).loss / accumulation
        loss = loss + LAMBDAS[0] * sum(g.abs().sum() for g in model.head_gates())
        loss = loss + LAMBDAS[1] * sum(g.abs().sum() for g in model.ffn_gates())
        loss.backward()
    return gate_grads(model)


def test_l1_per_step_matches_the_official_launch_layout_and_does_not_grow_with_accumulation():
    torch.manual_seed(0)
    config = EarlyBertConfig(
        vocab_size=61,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=32,
        num_labels=3,
        use_gates=True,
        **NO_DROPOUT,
    )
    model = EarlyBertForSequenceClassification(config)
    spread_gates(model, seed=1)
    batch = batch_of(32)
    # The official launch script accumulates 1 step (32 per GPU x 4 GPUs, one process): ours equals it at any
    # split of the same global batch into micro-batches.
    reference = official(model, batch, accumulation=1)
    for accumulation in (1, 2, 4):
        torch.testing.assert_close(ours(model, batch, accumulation), reference, rtol=1e-4, atol=1e-7)
    # The official code at 4 accumulation steps: the same task gradient, and 4 times the L1 term's.
    torch.testing.assert_close(
        official(model, batch, accumulation=4) - reference, 3 * gate_l1_sign(model), rtol=1e-4, atol=1e-7
    )
