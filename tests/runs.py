"""Helpers of the end-to-end run tests: launching `earlybert train`, reading what a run wrote, comparing
losses, and injecting faults. The fixtures they work on (shards, the tiny config, the reference run)
are in conftest.py."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.engine.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS = (8, 4)  # phase 0 at seq 32, phase 1 at seq 64
TOTAL = sum(STEPS)


def run_env() -> dict:
    return {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        # One thread per rank whatever the machine shows: results are compared across launchers and node counts
        # (1e-6, identical tickets), and a matmul's float sums depend on its thread count. On a machine showing
        # more CPUs than ranks, set_cpu_threads gives one node's ranks several threads each and the two-node
        # cluster's one (its nodes have one CPU each): different losses, a different ticket.
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }


def train_cmd(config, run_dir, *overrides) -> list[str]:
    return ["--config", str(config), f"run_dir={run_dir}", *overrides]


def faulty_train(
    tmp_path, target: str, when: str = "before", condition: str = "True", command: str = "pipeline.pretrain.loop"
) -> str:
    """A script running `earlybert train` (or `command`'s main) that exits hard (os._exit: no clean-up, as kill -9 or a
    crash leaves things) before or after `target` runs, the first time `condition` holds.

    target: "module:attribute.path", e.g. "pipeline.engine.deepspeed_engine:prune_engine" or
    "pipeline.run.rundir:RunDir.write_ticket". condition: a Python expression of `args` and `kwargs`, the
    target's call arguments (for a method, args[0] is self)."""
    module, _, path = target.partition(":")
    *owners, name = path.split(".")
    script = tmp_path / f"exit_{when}_{name}.py"
    call = (
        "    if hit:\n        os._exit(9)\n    return original(*args, **kwargs)\n"
        if when == "before"
        else "    out = original(*args, **kwargs)\n    if hit:\n        os._exit(9)\n    return out\n"
    )
    script.write_text(
        "import functools, importlib, os, sys\n"
        f"from {command} import main\n"
        f"owner = importlib.import_module({module!r})\n"
        + "".join(f"owner = getattr(owner, {o!r})\n" for o in owners)
        + f"original = getattr(owner, {name!r})\n"
        "@functools.wraps(original)\n"
        "def faulty(*args, **kwargs):\n"
        f"    hit = {condition}\n" + call + f"setattr(owner, {name!r}, faulty)\n"
        "sys.exit(main([a for a in sys.argv[1:] if not a.startswith('--local_rank')]))\n"
    )
    return str(script)


def deepspeed(config, run_dir, *overrides, ranks=2, script=None, module="pipeline.train"):
    """Start `module` (`earlybert train`; `pipeline.finetune`: `earlybert finetune`), or a fault-injecting
    `script` (faulty_train), under the deepspeed launcher on `ranks` CPU ranks; returns the launcher's Popen."""
    target = [script] if script else ["--module", module]
    cmd = [
        str(BIN / "deepspeed"),
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(free_port()),
        *target,
        *train_cmd(config, run_dir, *overrides),
    ]
    return subprocess.Popen(cmd, env=run_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=240) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def finished_run(config, tmp_path_factory, name: str, *overrides, module="pipeline.train") -> Path:
    """The run directory of a run of `config` with `overrides` (of `module`, as deepspeed's) that finished (the
    reference runs)."""
    run_dir = tmp_path_factory.mktemp(name) / "run"
    code, out = finish(deepspeed(config, run_dir, *overrides, module=module))
    assert code == 0, out
    return run_dir


def metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def latest(run_dir) -> str:
    return (Path(run_dir) / "checkpoints" / "latest").read_text()


def wait_for_step(proc, run_dir, step, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logged = metrics(run_dir)
        if logged and logged[-1]["step"] >= step:
            return logged[-1]["step"]
        assert proc.poll() is None, f"training exited ({proc.returncode}) before step {step}:\n{proc.stdout.read()}"
        time.sleep(0.01)
    raise TimeoutError(f"step {step} not reached in {timeout} s")


LOSS_KEYS = ("loss", "mlm_loss", "nsp_loss", "lr", "samples")  # what a pre-training run logs (BERT: with NSP)


def assert_same_losses(run_dir, reference, tol=1e-6, keys=LOSS_KEYS, until=TOTAL):
    """Every step's losses (up to step `until`) equal the reference run's within tol."""
    got, ref = metrics(run_dir), metrics(reference)
    assert [m["step"] for m in got] == list(range(1, TOTAL + 1)), "one metrics line per step, none twice"
    for g, r in zip(got[:until], ref[:until]):
        for k in keys:
            assert g[k] == pytest.approx(r[k], abs=tol), f"step {g['step']} {k}: {g[k]} != reference {r[k]}"


# Detector every 2 steps, FIFO of 3, draw allowed from step 4, forced at step 6 (of 12).
EARLYBERT = (
    "earlybert.mode=earlybert",
    "earlybert.lambda_heads=0.01",
    "earlybert.lambda_ffn=0.01",
    "earlybert.detector.interval=2",
    "earlybert.detector.window=3",
    "earlybert.detector.min_search_steps=4",
    "earlybert.detector.max_search_steps=6",
)


def ticket(run_dir) -> dict:
    return json.loads((Path(run_dir) / "ticket.json").read_text())


def architecture(run_dir) -> dict:
    ckpt = Path(run_dir) / "checkpoints"
    return json.loads((ckpt / (ckpt / "latest").read_text() / "architecture.json").read_text())


def assert_other_stage_resumes_from_the_pruned_checkpoint(
    config, reference, tmp_path, stage: int, search=EARLYBERT, keys=LOSS_KEYS
):
    """The EarlyBERT cycle of `config` (`search`: its overrides) on ZeRO `stage`, killed right after the checkpoint
    that follows the draw and resumed from it (the pruned model is built from architecture.json before DeepSpeed loads
    its partitions), against the uninterrupted ZeRO-1 `reference`: the same draw step and heads; the same losses to
    1e-4 up to the draw. Another stage sums gradients in another order, so the gates agree with ZeRO-1's to ~1e-6
    only; after a 6-step search many FFN gates lie that close to the cut, and a neuron or two can swap sides of it
    (more is a bug, not rounding): after the draw, the same losses with the same ticket, close ones with a near-tie
    swap."""
    run_dir = tmp_path / "run"
    args = (*search, f"deepspeed={REPO / 'ds_configs' / f'zero{stage}.json'}")
    after_draw_save = faulty_train(
        tmp_path, "pipeline.run.checkpoint:save", "after", condition="args[2].search['ticket']"
    )
    code, out = finish(deepspeed(config, run_dir, *args, script=after_draw_save))
    assert code != 0 and "ticket drawn at step" in out, out
    draw = ticket(reference)["draw_step"]
    assert latest(run_dir) == f"step_{draw:08d}"
    code, out = finish(deepspeed(config, run_dir, *args))
    assert code == 0, out
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{draw:08d}'}" in out and "ticket drawn" not in out
    got, ref = ticket(run_dir), ticket(reference)
    arch = architecture(run_dir)
    assert arch["num_heads_per_layer"] == got["heads_per_layer"]
    assert arch["intermediate_size_per_layer"] == got["ffn_per_layer"]
    assert got["draw_step"] == draw and got["kept_heads"] == ref["kept_heads"]
    neurons = lambda t: {(layer, n) for layer, kept in enumerate(t["kept_neurons"]) for n in kept}  # noqa: E731
    swapped = neurons(got) ^ neurons(ref)
    assert len(swapped) <= 4, f"ZeRO-{stage} kept other FFN neurons than ZeRO-1: {sorted(swapped)}"
    assert_same_losses(run_dir, reference, tol=1e-4, keys=keys, until=draw)
    assert_same_losses(run_dir, reference, tol=1e-4 if not swapped else 5e-2, keys=keys)


def finetune_test_config(run_dir, task_dir, init_from, deepspeed) -> dict:
    """The fine-tuning tests' config (also make gpu-check's): 10 steps per epoch of the two-class task in task_dir
    (train.csv, dev.csv); the detector looks every 2 steps, may draw from step 4 and must by step 6."""
    return {
        "run_dir": str(run_dir),
        "seed": 3,
        "task": {
            "kind": "classification",
            "train_files": [str(Path(task_dir) / "train.csv")],
            "validation_files": {"validation": [str(Path(task_dir) / "dev.csv")]},
            "text_fields": ["sentence"],
            "label_field": "label",
            "max_seq_length": 64,
        },
        "model": {"init_from": str(init_from)},
        "earlybert": {"mode": "earlybert", "lambda_heads": 0.01, "lambda_ffn": 0.01, "detector": {"window": 3}},
        "recipe": {
            "search_lr": 1e-3,
            "lr": 1e-3,
            "epochs": 1.0,
            "dense_epochs": 1.0,
            "search_epochs": 1.0,
            "detector_interval_epochs": 0.2,
            "min_search_epochs": 0.4,
            "max_search_epochs": 0.6,
        },
        "deepspeed": str(deepspeed),
        "micro_batch_size": 16,
        "global_batch_size": 32,
        "checkpoint": {"interval": 3, "keep": 2},
        "log": {"interval": 5},
    }


def finetune(config, run_dir, *overrides, script=None):
    """`earlybert finetune` (or a fault-injecting `script`) on 2 ranks under the deepspeed launcher."""
    return deepspeed(config, run_dir, *overrides, script=script, module="pipeline.finetune")


def read(run_dir, name) -> dict:
    return json.loads((Path(run_dir) / name).read_text())


def evals(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "eval.jsonl").read_text().splitlines()]


def assert_same_finetuning(run_dir, reference) -> None:
    """A fine-tuning run (resumed) drew the reference's ticket and logged its losses (1e-6) and final metrics."""
    assert read(run_dir, "ticket.json")["mask_digest"] == read(reference, "ticket.json")["mask_digest"]
    got, ref = metrics(run_dir), metrics(reference)
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for g, r in zip(got, ref):
        assert g["loss"] == pytest.approx(r["loss"], abs=1e-6), f"step {g['step']}"
    assert evals(run_dir)[-1]["metrics"] == evals(reference)[-1]["metrics"]


def write_squad_files(corpus: Path, out: Path) -> tuple[Path, Path]:
    """SQuAD-format train.json (40 questions) and dev.json (8) in `out`, made from the lines of `corpus` (the answer:
    the words after a phrase of the context). The first answer is deliberately not in its context."""
    paragraphs, n = [], 0
    for line in corpus.read_text().splitlines():
        words = line.split()
        if len(words) < 30 or n >= 48:
            continue
        context = " ".join(words[:60])
        answer = " ".join(words[10:13])
        qas = [
            {
                "id": f"q{n}",
                "question": f"what follows {' '.join(words[7:10])}?",
                "answers": [{"text": answer, "answer_start": context.index(answer)}],
            }
        ]
        paragraphs.append({"context": context, "qas": qas})
        n += 1
    paragraphs[0]["qas"][0]["answers"][0]["answer_start"] += 1  # not in its context any more
    files = out / "train.json", out / "dev.json"
    for path, part in zip(files, (paragraphs[:40], paragraphs[40:])):
        path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": part}]}))
    return files
