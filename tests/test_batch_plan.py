"""The batch plan (pipeline/config.py plan_batches): users fix the global batch and a per-rank maximum, a launch
picks the micro-batch and accumulation for the ranks it finds. Every shipped config at 1 to 64 ranks."""

import re
from pathlib import Path

import pytest

from pipeline.config import ConfigError, Problems, check_resumed_batch, deepspeed_config, gather_problems, plan_batches
from pipeline.finetune.config import load_finetune_config
from pipeline.pretrain.config import load_pretrain_config
from pipeline.run.checkpoint import RunState

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "launch" / "configs").glob("*.yaml"))
RANKS = range(1, 65)


def load_shipped(path: Path, overrides: list[str] = ()):
    load = load_finetune_config if path.name.startswith("finetune") else load_pretrain_config
    return load(str(path), list(overrides))


def demo_gpu_overrides() -> list[str]:
    """The overrides launch/demo.sh gives `earlybert train` on a GPU node."""
    (line,) = re.findall(r"overrides\+=\((.*)\)", (REPO / "launch" / "demo.sh").read_text())
    return line.split()


def test_the_largest_micro_batch_within_the_maximum_that_splits_the_global_batch():
    assert plan_batches(256, 32, 8) == plan_batches(256, 32, 8)  # a pure function
    cases = {  # (global, max micro, ranks): (micro, accumulation)
        (256, 32, 1): (32, 8),
        (256, 32, 8): (32, 1),
        (256, 32, 16): (16, 1),
        (256, 32, 32): (8, 1),
        (256, 64, 8): (32, 1),  # demo.sh on 8 GPUs, refused before
        (24, 16, 1): (12, 2),  # 16 does not divide 24: the largest that does
        (30, 8, 1): (6, 5),
        (17, 8, 1): (1, 17),
        (32, 64, 1): (32, 1),  # a maximum above the global batch
    }
    for (g, m, w), want in cases.items():
        plan = plan_batches(g, m, w)
        assert (plan.micro, plan.accumulation) == want, (g, m, w)
        assert plan.micro * plan.world_size * plan.accumulation == plan.global_batch == g


def test_plans_agree_with_the_definition_for_every_split():
    for g in (1, 7, 24, 32, 96, 100, 256, 1000):
        for m in (1, 3, 8, 12, 32, 64):
            for w in RANKS:
                if g % w:
                    with pytest.raises(ConfigError, match=f"global_batch_size={g} cannot be split evenly over {w} "):
                        plan_batches(g, m, w)
                    continue
                p = plan_batches(g, m, w)
                fits = [k for k in range(1, m + 1) if (g // w) % k == 0]
                assert (p.micro, p.accumulation) == (max(fits), g // w // max(fits))


def test_a_refusal_names_the_nearest_global_batch_and_rank_counts():
    msg = str(pytest.raises(ConfigError, plan_batches, 256, 32, 3).value)
    assert "the nearest global batch that can is 255;" in msg and "launch on 2 or 4 ranks" in msg
    msg = str(pytest.raises(ConfigError, plan_batches, 255, 8, 6).value)
    assert "is 252 or 258;" in msg and "launch on 5 or 15 ranks" in msg
    msg = str(pytest.raises(ConfigError, plan_batches, 32, 32, 64).value)  # more ranks than sequences
    assert "is 64;" in msg and "launch on 32 ranks" in msg


def test_describe_says_the_split_and_the_maximum():
    assert plan_batches(256, 32, 16).describe() == (
        "global batch 256 = micro-batch 16 x 16 ranks x 1 accumulation step (micro_batch_size 32 is the per-rank "
        "maximum)"
    )
    assert plan_batches(32, 16, 1).describe() == "global batch 32 = micro-batch 16 x 1 rank x 2 accumulation steps"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_at_1_to_64_ranks(path):
    """The DeepSpeed config of every shipped config on every rank count: a split within the per-rank maximum
    wherever the ranks divide the global batch, else a refusal naming the nearest one that they do."""
    cfg = load_shipped(path)
    split = []
    for w in RANKS:
        if cfg.global_batch_size % w:
            with pytest.raises(ConfigError, match="the nearest global batch that can is"):
                deepspeed_config(cfg, w, lr=1e-4)
            continue
        ds = deepspeed_config(cfg, w, lr=1e-4)
        micro, accumulation = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
        assert micro <= cfg.micro_batch_size and micro * w * accumulation == ds["train_batch_size"]
        split.append(w)
    assert split == [w for w in RANKS if cfg.global_batch_size % w == 0]
    if path.name in ("bert-base.yaml", "bert-large.yaml"):  # the README's 8, 16 (2 nodes) and 32 (4 nodes) GPUs
        assert {1, 2, 4, 8, 16, 32, 64} <= set(split)


def test_demo_on_a_gpu_node_splits_over_1_2_4_and_8_gpus():
    cfg = load_pretrain_config(str(REPO / "launch" / "configs" / "demo.yaml"), demo_gpu_overrides())
    got = {w: deepspeed_config(cfg, w) for w in (1, 2, 4, 8)}
    assert {w: (d["train_micro_batch_size_per_gpu"], d["gradient_accumulation_steps"]) for w, d in got.items()} == {
        1: (64, 4),
        2: (64, 2),
        4: (64, 1),
        8: (32, 1),
    }


def test_micro_batch_size_no_longer_has_to_divide_the_global_batch(tmp_path):
    cfg = load_shipped(REPO / "launch" / "configs" / "finetune-squad.yaml", ["micro_batch_size=16"])
    ds = deepspeed_config(cfg, 1, lr=1e-4)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (12, 2)


def test_a_resumed_run_keeps_its_global_batch(tmp_path):
    cfg = load_shipped(REPO / "launch" / "configs" / "tiny.yaml")  # global 32
    check_resumed_batch(cfg, RunState(step=10, samples=320), "step_00000010")  # any ranks, same global batch
    check_resumed_batch(cfg, RunState(), "fresh")
    with pytest.raises(ConfigError, match="step_00000010 was trained with global_batch_size=64, the config says 32"):
        check_resumed_batch(cfg, RunState(step=10, samples=640), "step_00000010")


def test_independent_problems_are_named_together():
    def fail(msg):
        raise ConfigError(msg)

    assert gather_problems((ConfigError,), lambda: 1, lambda: 2) == [1, 2]
    with pytest.raises(KeyError):  # not one of the errors: not a problem of the config
        gather_problems((ConfigError,), lambda: {}["x"])
    one = pytest.raises(ConfigError, gather_problems, (ConfigError,), lambda: 1, lambda: fail("a")).value
    assert str(one) == "a" and not isinstance(one, Problems)
    nested = lambda: gather_problems((ConfigError,), lambda: fail("b"), lambda: fail("c"))  # noqa: E731
    many = pytest.raises(Problems, gather_problems, (ConfigError,), lambda: fail("a"), nested).value
    assert str(many) == "3 problems:\n  - a\n  - b\n  - c"
