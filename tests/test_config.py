"""The typed configs of `earlybert train` and `earlybert finetune` (pipeline/config.py and each loop's own), in
one place: loading, overrides and paths, the checks both share, the DeepSpeed JSON, the defaults printed."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import yaml

from pipeline.cli import REQUIRED
from pipeline.cli import main as cli_main
from pipeline.config import SHIPPED_DS_CONFIGS, ConfigError, deepspeed_config
from pipeline.finetune.config import load_finetune_config
from pipeline.pretrain.config import PretrainConfig, load_pretrain_config
from pipeline.pretrain.start import phase_at

REPO = Path(__file__).resolve().parents[1]


def write_config(tmp_path, **top):
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "phases": [{"shards": "s128", "steps": 90}, {"shards": "s512", "steps": 10}],
        "deepspeed": os.path.join(REPO, "ds_configs/zero1.json"),
        **top,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def write_ds(tmp_path, ds):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return str(path)


# ---- run config ---------------------------------------------------------------------------------


def test_example_configs_load():
    names = sorted(os.listdir(os.path.join(REPO, "launch/configs")))
    assert {"tiny.yaml", "bert-base.yaml", "bert-large.yaml"} <= set(names)
    for name in names:
        path = os.path.join(REPO, "launch/configs", name)
        if name.startswith("finetune-"):
            assert load_finetune_config(path).task.max_seq_length > 0
            continue
        cfg = load_pretrain_config(path)
        assert cfg.total_steps == sum(p.steps for p in cfg.phases) > 0
    for name in ("bert-base", "bert-large"):  # BERT's recipe: 90% of the steps at seq 128, then 512
        phases = load_pretrain_config(os.path.join(REPO, f"launch/configs/{name}.yaml")).phases
        assert [p.shards[-6:] for p in phases] == [
            "seq128",
            "seq512",
        ]


def test_overrides_are_typed_and_reach_lists(tmp_path):
    cfg = load_pretrain_config(
        write_config(tmp_path),
        [
            "optim.lr=5e-4",
            "phases.1.steps=20",
            "earlybert.mode=dense",
            "model.overrides.hidden_dropout_prob=0.0",
            "log.peak_tflops=989",
        ],
    )
    assert cfg.optim.lr == 5e-4 and cfg.phases[1].steps == 20 and cfg.total_steps == 110
    assert (
        cfg.earlybert.use_gates is False
        and cfg.earlybert.mode == "dense"
        and cfg.model.overrides == {"hidden_dropout_prob": 0.0}
    )
    assert cfg.log.peak_tflops == 989.0 and cfg.earlybert.lambda_heads == cfg.earlybert.lambda_ffn == 1e-4


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optim.lrr=1"], "unknown key(s) optim.lrr"),
        (["checkpointing.interval=5"], "unknown key(s) checkpointing"),
        (["phases.0.shard=x"], "unknown key(s) phases.0.shard"),
        (["phases.5.steps=1"], "not an index of a 2-item list"),
        (["micro_batch_size=eight"], "micro_batch_size: expected int"),
        (["phases.0.steps=true"], "phases.0.steps: expected int"),
        (["optim.schedule=step"], "choose one of linear, cosine, constant, wsd"),
        (["optim.schedule=wsd", "optim.decay_fraction=0"], "optim.decay_fraction is the share of steps that decay"),
        (
            ["optim.schedule=wsd", "optim.decay_shape=cosine"],
            "optim.decay_shape 'cosine': choose one of linear, 1-sqrt",
        ),
        (["optim.decay_fraction=0.2"], "optim.decay_fraction=0.2: only optim.schedule=wsd reads it, not linear"),
        (["optim.schedule=cosine", "optim.decay_shape=linear"], "optim.decay_shape=linear: only optim.schedule=wsd"),
        (["optim.schedule=wsd", "optim.warmup_steps=95"], "the warmup (95 steps) and the decay (the last 10 of 100"),
        (
            ["optim.schedule=wsd", "optim.decay_fraction=0.5", "earlybert.detector.min_search_steps=60"],
            "min_search_steps=60: the draw would fall in optim.schedule=wsd's decay (from step 50 of 100)",
        ),
        (
            ["optim.schedule=wsd", "earlybert.mode=random", "earlybert.draw_step=95"],
            "earlybert.draw_step=95: the draw would fall in optim.schedule=wsd's decay (from step 90 of 100)",
        ),
        (["optim.warmup_steps=1000"], "warmup_steps=1000"),
        (["deepspeed_overrides.zero_optimization.stage=4"], "stage=4; DeepSpeed ZeRO has stages 0, 1, 2 and 3"),
        (["deepspeed=/nonexistent.json"], "cannot read /nonexistent.json"),
        (["seed"], "expected key=value"),
        (
            ["earlybert.after_draw=rewind", "earlybert.rewind_step=500", "earlybert.detector.min_search_steps=500"],
            "rewind_step=500: the weights of that step must be saved before the earliest draw (step 500)",
        ),
    ],
)
def test_bad_configs_fail_with_a_clear_message(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_pretrain_config(write_config(tmp_path), overrides)
    assert message in str(err.value)


def test_wsd_schedule_configs_that_load(tmp_path):
    """wsd with its draw in the stable phase; a run that never reaches the detector's min_search_steps (the
    default 500 of 100 steps) or draws nothing; wsd's fields at their defaults under another schedule (as
    --print-config writes them)."""
    wsd = ["optim.schedule=wsd", "optim.warmup_steps=10", "optim.decay_fraction=0.2", "optim.decay_shape=linear"]
    cfg = load_pretrain_config(write_config(tmp_path), [*wsd, "earlybert.detector.min_search_steps=79"])
    assert cfg.optim.wsd_decay_start(cfg.total_steps) == 80 and cfg.optim.decay_shape == "linear"
    load_pretrain_config(write_config(tmp_path), wsd)
    load_pretrain_config(
        write_config(tmp_path), [*wsd, "earlybert.mode=dense", "earlybert.detector.min_search_steps=90"]
    )
    assert load_pretrain_config(write_config(tmp_path), ["optim.decay_fraction=0.1"]).optim.schedule == "linear"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["recipe.decay_shape=linear"], "recipe.decay_shape=linear: only recipe.schedule=wsd reads it, not linear"),
        (["recipe.schedule=wsd", "recipe.decay_fraction=1.5"], "recipe.decay_fraction is the share of steps"),
        (
            ["recipe.schedule=wsd", "recipe.warmup_ratio=0.5", "recipe.decay_fraction=0.6"],
            "warmup_ratio (0.5) and decay_fraction (0.6) of each stage's steps overlap",
        ),
        (
            ["recipe.schedule=wsd", "earlybert.mode=fixed", "recipe.draw_epoch=2.8"],
            "recipe.draw_epoch=2.8: the draw would fall in schedule wsd's decay of the search stage (from epoch 2.7",
        ),
    ],
)
def test_finetune_wsd_schedule_is_checked(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_finetune_config(write_yaml(tmp_path / "ft.yaml", FINETUNE), overrides)
    assert message in str(err.value)
    load_finetune_config(write_yaml(tmp_path / "ft.yaml", FINETUNE), ["recipe.schedule=wsd", "recipe.warmup_ratio=0.1"])


def test_lamb_is_refused_with_zero_and_accepted_without(tmp_path):
    lamb = {"optimizer": {"type": "Lamb", "params": {}}}
    for stage in (1, 2, 3):
        ds = write_ds(tmp_path, {**lamb, "zero_optimization": {"stage": stage}})
        with pytest.raises(ConfigError, match=f"Lamb with ZeRO stage {stage} is refused.*trust ratio"):
            load_pretrain_config(write_config(tmp_path, deepspeed=ds))
    load_pretrain_config(write_config(tmp_path, deepspeed=os.path.join(REPO, "ds_configs/zero0_lamb_bf16.json")))


def test_every_shipped_deepspeed_config_is_valid(tmp_path):
    names = sorted(os.listdir(os.path.join(REPO, "ds_configs")))
    assert {"zero1.json", "zero2.json", "zero3.json", "zero2_fp16.json", "zero3_offload_bf16.json"} <= set(names)
    for name in names:
        cfg = load_pretrain_config(write_config(tmp_path, deepspeed=os.path.join(REPO, "ds_configs", name)))
        ds = deepspeed_config(cfg, world_size=2)
        assert ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == 2


def test_deepspeed_keys_owned_by_the_run_config_are_refused(tmp_path):
    for extra in (
        {"train_batch_size": 64},
        {"scheduler": {"type": "WarmupLR"}},
        {"optimizer": {"type": "AdamW", "params": {"lr": 1.0}}},
    ):
        ds = write_ds(tmp_path, {"zero_optimization": {"stage": 1}, **extra})
        with pytest.raises(ConfigError, match="set by the run config"):
            load_pretrain_config(write_config(tmp_path, deepspeed=ds))


def test_deepspeed_config_batch_arithmetic(tmp_path):
    cfg = load_pretrain_config(write_config(tmp_path, micro_batch_size=4, global_batch_size=32, optim={"lr": 3e-4}))
    ds = deepspeed_config(cfg, world_size=4)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (4, 2)
    assert ds["optimizer"]["params"]["lr"] == 3e-4 and ds["zero_optimization"]["stage"] == 1
    assert "load_universal" not in ds.get("checkpoint", {})
    assert deepspeed_config(cfg, world_size=1, load_universal=True)["checkpoint"]["load_universal"] is True
    with pytest.raises(ConfigError, match="cannot be split evenly over 3 ranks"):
        deepspeed_config(cfg, world_size=3)


def test_phase_at(tmp_path):
    cfg = load_pretrain_config(write_config(tmp_path))
    assert [phase_at(cfg, s) for s in (0, 89, 90, 99, 100)] == [0, 0, 1, 1, 2]


def test_print_config_is_a_loadable_config_of_defaults(tmp_path, capsys):
    assert cli_main(["train", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert list(printed) == [f.name for f in dataclasses.fields(PretrainConfig)]
    assert printed["run_dir"] == REQUIRED and printed["phases"] == [{"shards": REQUIRED, "steps": REQUIRED}]
    printed.update(run_dir=str(tmp_path / "run"), phases=[{"shards": "s", "steps": 10}])
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump(printed))
    cfg = load_pretrain_config(str(tmp_path / "printed.yaml"))
    assert cfg.to_dict() == {
        **PretrainConfig(run_dir=str(tmp_path / "run"), phases=[]).to_dict(),
        "phases": cfg.to_dict()["phases"],
        "deepspeed": str(SHIPPED_DS_CONFIGS / "zero1.json"),
    }
    capsys.readouterr()  # the loader parses the DeepSpeed JSON with DeepSpeed, whose first import logs to stdout
    assert cli_main(["finetune", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["init_from"] == REQUIRED


# ---- paths in configs -----------------------------------------------------------------------------


def write_yaml(path: Path, tree: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_config_paths_are_relative_to_the_file_and_overrides_to_the_cwd(tmp_path, monkeypatch):
    config = write_yaml(
        tmp_path / "cfgs" / "run.yaml",
        {"run_dir": "run", "deepspeed": "ds_configs/zero2.json", "phases": [{"shards": "data/s", "steps": 5}]},
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_pretrain_config(config)
    assert cfg.run_dir == str(tmp_path / "cfgs" / "run") and cfg.phases[0].shards == str(tmp_path / "cfgs/data/s")
    # no ds_configs/ beside the config: the project's own
    assert Path(cfg.deepspeed).read_bytes() == (REPO / "ds_configs" / "zero2.json").read_bytes()
    cfg = load_pretrain_config(config, ["phases.0.shards=mine", "run_dir=/abs/run"])
    assert cfg.phases[0].shards == str(tmp_path / "mine") and cfg.run_dir == "/abs/run"
    # a ds_configs/ of one's own beside the config comes first
    (tmp_path / "cfgs" / "ds_configs").mkdir()
    (tmp_path / "cfgs" / "ds_configs" / "zero2.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert load_pretrain_config(config).deepspeed == str(tmp_path / "cfgs" / "ds_configs" / "zero2.json")
    with pytest.raises(ConfigError, match="zero1_bf16.json"):  # the message lists the shipped ones
        load_pretrain_config(config, ["deepspeed=ds_configs/nope.json"])


def test_finetune_config_paths(tmp_path, monkeypatch):
    config = write_yaml(
        tmp_path / "cfgs" / "ft.yaml",
        {
            "run_dir": "ft",
            "model": {"init_from": "../model", "tokenizer": "tok.json"},
            "task": {
                "train_files": ["train.csv"],
                "validation_files": {"dev": "dev.csv", "test": ["t1.csv", "/t2.csv"]},
            },
        },
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_finetune_config(config, ["model.tokenizer=here/tok.json"])
    d = tmp_path / "cfgs"
    assert (cfg.run_dir, cfg.model.init_from, cfg.model.tokenizer) == (
        str(d / "ft"),
        str(tmp_path / "model"),
        str(tmp_path / "here/tok.json"),
    )
    assert cfg.task.train_files == [str(d / "train.csv")]
    assert cfg.task.validation_files == {"dev": [str(d / "dev.csv")], "test": [str(d / "t1.csv"), "/t2.csv"]}
    assert cfg.deepspeed == str(SHIPPED_DS_CONFIGS / "zero1.json")


def test_example_configs_mean_the_same_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo = load_pretrain_config(str(REPO / "launch/configs/demo.yaml"))
    assert demo.run_dir == str(REPO / "runs/demo/run") and demo.phases[0].shards == str(REPO / "runs/demo/data/seq128")
    local = load_finetune_config(str(REPO / "launch/configs/finetune-local.yaml"))
    assert local.model.init_from == str(REPO / "runs/demo/export")


FINETUNE = {"run_dir": "ft", "model": {"init_from": "model"}, "task": {"train_files": ["train.csv"]}}


@pytest.mark.parametrize("mode", ["earlybert", "fixed", "dense"])
def test_both_configs_refuse_random_like_outside_random_mode(tmp_path, mode):
    """One validation of the `earlybert:` section for both loops: fine-tuning used to accept random_like in any
    mode and then ignore the ticket it named."""
    overrides = [f"earlybert.mode={mode}", "earlybert.random_like=ticket.json"]
    with pytest.raises(ConfigError, match=f"random_like is for earlybert.mode=random, not {mode}"):
        load_finetune_config(write_yaml(tmp_path / "ft.yaml", FINETUNE), overrides)
    with pytest.raises(ConfigError, match=f"random_like is for earlybert.mode=random, not {mode}"):
        load_pretrain_config(write_config(tmp_path), [*overrides, "earlybert.draw_step=5"])
    load_finetune_config(write_yaml(tmp_path / "ft.yaml", FINETUNE), ["earlybert.mode=random", overrides[1]])


def test_the_fields_both_configs_share_are_declared_once():
    """TrainingConfig is the base of both; each loop's config adds its own fields and redeclares only defaults."""
    from pipeline.config import TrainingConfig
    from pipeline.finetune.config import FinetuneConfig

    shared = [f.name for f in dataclasses.fields(TrainingConfig)]
    for cls in (PretrainConfig, FinetuneConfig):
        assert issubclass(cls, TrainingConfig)
        assert [f.name for f in dataclasses.fields(cls)][: len(shared)] == shared
