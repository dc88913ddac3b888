"""`earlybert` console script: one subcommand per pipeline stage.

    earlybert prep    ...   corpus -> tokenized memory-mapped shards   (data_prep)
    earlybert train   ...   shards -> DeepSpeed pre-training run        (pipeline.train)
    earlybert finetune ...  model + task -> fine-tuned model, metrics   (pipeline.finetune)
    earlybert eval    ...   run + held-out shards -> MLM loss, accuracy (pipeline.tools.masked_lm_eval)
    earlybert export  ...   run -> Hugging Face directory               (pipeline.tools.export)
    earlybert report  ...   runs -> report.md and figures               (pipeline.tools.report)

Each stage owns its argument parser; this file only dispatches, importing the stage lazily so that
`earlybert prep --help` does not pay for importing DeepSpeed. `train` and `finetune` import torch and
DeepSpeed at the top, so their command line is checked here first: `--help` and `--print-config`
answer without them.
"""

import argparse
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import sys
import typing

from common.cli import HelpFormatter

STAGES = {
    "prep": ("data_prep.cli", "corpus -> tokenized memory-mapped training shards"),
    "train": ("pipeline.train", "gated BERT pre-training with DeepSpeed, early-bird draw, prune"),
    "finetune": ("pipeline.finetune", "EarlyBERT fine-tuning on GLUE, SQuAD or your own task data"),
    "eval": ("pipeline.tools.masked_lm_eval", "held-out MLM loss and accuracy of a run's model"),
    "export": ("pipeline.tools.export", "export a run to a Hugging Face model directory"),
    "report": ("pipeline.tools.report", "write RUN/report/ with report.md and figures"),
}
# The config-driven stages: (the config's dataclass, an example command line).
CONFIGS = {
    "train": (
        "pipeline.pretrain.config:PretrainConfig",
        "--config launch/configs/tiny.yaml optim.lr=5e-4 phases.0.steps=200",
    ),
    "finetune": (
        "pipeline.finetune.config:FinetuneConfig",
        "--config launch/configs/finetune-sst2.yaml earlybert.mode=dense seed=2",
    ),
}
REQUIRED = "(required)"


def _usage() -> str:
    lines = [
        "usage: earlybert <stage> [options]   (earlybert <stage> --help for details)",
        "       earlybert --version",
        "",
        "stages:",
    ]
    lines += [f"  {name:<10}{help_}" for name, (_, help_) in STAGES.items() if _available(name)]
    return "\n".join(lines)


def _available(stage: str) -> bool:
    return importlib.util.find_spec(STAGES[stage][0]) is not None


def config_parser(stage: str) -> argparse.ArgumentParser:
    """The command line of `earlybert train` and `earlybert finetune`."""
    example = CONFIGS[stage][1]
    p = argparse.ArgumentParser(
        prog=f"earlybert {stage}",
        description=STAGES[stage][1],
        formatter_class=HelpFormatter,
        epilog=f"Paths in the config file are relative to its directory, in overrides to the current one;\n"
        f"ds_configs/NAME.json is one of the project's DeepSpeed configs, from any directory.\n"
        f"Every key with its default: `earlybert {stage} --print-config`; what each means: README.md,\n"
        f'section "Config reference".\n\nexample: earlybert {stage} {example}',
    )
    p.add_argument("--config", help="YAML config (examples in launch/configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. checkpoint.interval=50")
    p.add_argument("--print-config", action="store_true", help="print every key with its default, then exit")
    p.add_argument(
        "--check",
        action="store_true",
        help="check everything a launch would (config, data, batch split, checkpoint, detector), print the plan "
        "and exit: 0 if it would start, 2 naming each problem; no process group, no GPU (e.g. on a login node)",
    )
    p.add_argument(
        "--world-size",
        type=int,
        metavar="N",
        help="with --check: the ranks to check the launch for (default: those of the launcher's environment, or 1)",
    )
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # appended by the deepspeed launcher
    return p


def default_config(cls) -> dict:
    """Every key of config dataclass `cls` with its default; REQUIRED where there is none."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        elif dataclasses.is_dataclass(hints[f.name]):
            value = default_config(hints[f.name])
        elif typing.get_origin(hints[f.name]) is list and dataclasses.is_dataclass(typing.get_args(hints[f.name])[0]):
            value = [default_config(typing.get_args(hints[f.name])[0])]
        else:
            value = REQUIRED
        out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def print_config(stage: str) -> None:
    import yaml

    module, _, name = CONFIGS[stage][0].partition(":")
    print(yaml.safe_dump(default_config(getattr(importlib.import_module(module), name)), sort_keys=False), end="")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(f"earlybert {importlib.metadata.version('earlybert')}")
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES or not _available(stage):
        print(f"earlybert: unknown stage {stage!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if stage in CONFIGS:  # before the stage's module imports torch and DeepSpeed
        parser = config_parser(stage)
        args = parser.parse_intermixed_args(rest)
        if args.print_config:
            print_config(stage)
            return 0
        if args.config is None:
            parser.error("the following arguments are required: --config")
    module = importlib.import_module(STAGES[stage][0])
    code = int(module.main(rest) or 0)
    ranks = sys.modules.get(
        "pipeline.engine.distributed"
    )  # loaded by the stages that run ranks; never imported for prep
    return ranks.end_rank_process(code) if ranks else code


if __name__ == "__main__":
    sys.exit(main())
