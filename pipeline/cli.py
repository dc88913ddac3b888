"""`earlybert` console script: one subcommand per pipeline stage.

    earlybert prep    ...   corpus -> tokenized memory-mapped shards   (data_prep)
    earlybert train   ...   shards -> DeepSpeed pre-training run        (pipeline.train)
    earlybert eval    ...   run + held-out shards -> MLM loss, accuracy (pipeline.evaluate)
    earlybert export  ...   run -> Hugging Face directory               (pipeline.export)
    earlybert report  ...   runs -> report.md and figures               (pipeline.report)

Each stage owns its argument parser; this file only dispatches, importing the stage lazily
so that `earlybert prep --help` does not pay for importing DeepSpeed.
"""
import importlib
import importlib.util
import sys

STAGES = {
    "prep": ("data_prep.cli", "corpus -> tokenized memory-mapped training shards"),
    "train": ("pipeline.train", "gated BERT pre-training with DeepSpeed, early-bird draw, prune"),
    "eval": ("pipeline.evaluate", "held-out MLM loss and accuracy of a run's model"),
    "export": ("pipeline.export", "export a run to a Hugging Face model directory"),
    "report": ("pipeline.report", "write RUN/report/ with report.md and figures"),
}


def _usage() -> str:
    lines = ["usage: earlybert <stage> [options]   (earlybert <stage> --help for details)", "", "stages:"]
    lines += [f"  {name:<8}{help_}" for name, (_, help_) in STAGES.items() if _available(name)]
    return "\n".join(lines)


def _available(stage: str) -> bool:
    return importlib.util.find_spec(STAGES[stage][0]) is not None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES or not _available(stage):
        print(f"earlybert: unknown stage {stage!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(STAGES[stage][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
