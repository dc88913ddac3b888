"""The faults and bad inputs tried by tests/test_faults.py, and docs/faults.md generated from them.

    python -m tests.faults_table      rewrite docs/faults.md from CASES

Every case here is tried by exactly one test of test_faults.py (`@tried(CASE)`, or a parametrize over
case ids), and test_faults.py fails when docs/faults.md is not what render() writes: the table stays
the list of what the tests try.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "faults.md"


@dataclass(frozen=True)
class Case:
    command: str  # what a user runs (RUN, CFG, OUT: the run directory, config, output)
    fault: str  # what is wrong
    outcome: str  # what happens: the message, the exit status, what is left on disk


EXIT_1 = "exit 1"
EXIT_2 = "exit 2, before any process group"
CASES = {
    # ---- checkpoints ------------------------------------------------------------------------------------------
    "damaged_latest": Case(
        "earlybert train --config CFG",
        "the latest checkpoint's optimizer shard truncated",
        "message naming the shard; resumes from the newest intact checkpoint (the damaged one "
        "moved to step_N.set-aside) and reproduces the uninterrupted run's losses",
    ),
    "manifest_checks": Case(
        "earlybert train / finetune (resume)",
        "a checkpoint file truncated, missing, or a bit flipped",
        "found by size, or by sha256 (checkpoint.verify: checksum); checkpoint.verify: size checks sizes only",
    ),
    "no_manifest_accepted": Case(
        "earlybert train (resume)",
        "a checkpoint written before manifests existed (tests/fixtures/v0_runs)",
        "accepted as it is",
    ),
    "no_intact_checkpoint": Case(
        "earlybert train (resume)",
        "the only checkpoint damaged",
        "exit 2: message naming the file, 'no intact checkpoint before it'",
    ),
    "resume_from_missing": Case(
        "earlybert train --config CFG resume_from=step_00000099",
        "a tag that is not there",
        f"{EXIT_2}: message listing the intact checkpoints",
    ),
    "resume_from_malformed": Case(
        "earlybert train --config CFG resume_from=latest",
        "not a tag",
        f"{EXIT_2}: 'expected a checkpoint tag such as step_00001000'",
    ),
    "resume_from_older": Case(
        "earlybert train --config CFG resume_from=step_00000009",
        "resume from an older checkpoint by hand",
        "resumes from it, later checkpoints moved aside, the run finishes with the uninterrupted run's losses",
    ),
    "disk_full": Case(
        "earlybert train (2 ranks) on a 10 MB tmpfs",
        "the disk fills during a checkpoint",
        "exit non-zero within the collective timeout: 'saving checkpoint ... failed: ... (0.1 MiB "
        "free on its filesystem)', the previous checkpoint intact and still `latest`, the partial "
        "one removed",
    ),
    # ---- locks ------------------------------------------------------------------------------------------------
    "second_train": Case(
        "earlybert train on a RUN in use",
        "RUN/.earlybert.lock held by a live process",
        "exit 2: 'RUN is in use by ... host H, pid P'; the holder's lock left alone",
    ),
    "stale_lock": Case(
        "earlybert train / finetune / prep",
        "a lock left by a killed process (same host, pid gone)",
        "taken over, with a message",
    ),
    "lock_other_host": Case(
        "earlybert train / finetune / prep",
        "a lock of another host",
        "refused, naming the host and the file to delete if that job is gone",
    ),
    "second_prep": Case("earlybert prep --output OUT", "OUT in use by another prep", "exit 1: 'OUT is in use by ...'"),
    # ---- ranks and collectives ---------------------------------------------------------------------------------
    "rank_stopped": Case(
        "earlybert train (2 ranks), dist_timeout.step_s=5",
        "rank 1 stopped with SIGSTOP",
        "rank 0 exits 1 within the timeout: 'step N: a collective ... failed or waited more than "
        "dist_timeout.step_s=5 s ...; rank(s) [1] did not reach it'; the relaunch resumes exactly",
    ),
    "nan_stop": Case(
        "earlybert train (fp32), nonfinite.action=stop",
        "a NaN loss at step 5",
        "exit 1: 'step 5: the loss is nan; stopping'; latest is the step-3 checkpoint, intact",
    ),
    "nan_skip": Case(
        "earlybert train (fp32), nonfinite: {action: skip, max_skipped: 1}",
        "a NaN loss at step 5",
        "DeepSpeed skips the update; the run finishes; nonfinite_skipped 1 in metrics.jsonl from step 5",
    ),
    "nan_skip_limit": Case(
        "earlybert train (fp32), nonfinite: {action: skip, max_skipped: 1}",
        "NaN losses at steps 5 and 7",
        "exit 1 at step 7: 'after 1 skipped'",
    ),
    # ---- bad input: train -------------------------------------------------------------------------------------
    "train_config_missing": Case(
        "earlybert train --config nothere.yaml", "no such file", f"{EXIT_2}: 'cannot read run config nothere.yaml'"
    ),
    "train_config_not_mapping": Case(
        "earlybert train --config CFG", "the YAML is a list", f"{EXIT_2}: 'expected a mapping at the top level'"
    ),
    "train_wrong_type": Case(
        "earlybert train --config CFG phases.0.steps=ten",
        "a string for an int",
        f"{EXIT_2}: 'phases.0.steps: expected int'",
    ),
    "train_bad_choice": Case(
        "earlybert train --config CFG nonfinite.action=ignore", "not a choice", f"{EXIT_2}: 'choose one of stop, skip'"
    ),
    "train_bad_timeout": Case(
        "earlybert train --config CFG dist_timeout.step_s=0",
        "a timeout of 0",
        f"{EXIT_2}: 'dist_timeout.step_s must be > 0'",
    ),
    "train_bad_verify": Case(
        "earlybert train --config CFG checkpoint.verify=md5",
        "not a choice",
        f"{EXIT_2}: 'choose one of checksum, size'",
    ),
    "train_run_dir_is_file": Case(
        "earlybert train --config CFG run_dir=FILE",
        "run_dir is a file",
        f"{EXIT_2}: 'run_dir FILE is a file, not a directory'",
    ),
    "train_no_shards": Case(
        "earlybert train --config CFG phases.0.shards=EMPTY_DIR",
        "not a prep output",
        f"{EXIT_2}: 'manifest.json: not found'",
    ),
    "train_other_model": Case(
        "earlybert train --config CFG model.preset=bert-mini (RUN of bert-tiny)",
        "a checkpoint of another model",
        f"{EXIT_2}: 'checkpoint of another model', the fields that differ",
    ),
    # ---- bad input: finetune ----------------------------------------------------------------------------------
    "finetune_config_missing": Case(
        "earlybert finetune --config nothere.yaml", "no such file", f"{EXIT_2}: 'cannot read run config nothere.yaml'"
    ),
    "finetune_wrong_type": Case(
        "earlybert finetune --config CFG seed=abc", "a string for an int", f"{EXIT_2}: 'seed: expected int'"
    ),
    "finetune_init_from_missing": Case(
        "earlybert finetune --config CFG model.init_from=MISSING",
        "no such model",
        f"{EXIT_2}: 'model.init_from MISSING does not exist'",
    ),
    "finetune_pretraining_run_dir": Case(
        "earlybert finetune --config CFG run_dir=PRETRAINING_RUN",
        "a run directory of the wrong kind",
        f"{EXIT_2}: 'a checkpoint of another task head'",
    ),
    "finetune_resume_from_missing": Case(
        "earlybert finetune --config CFG resume_from=step_00000099",
        "a tag that is not there",
        f"{EXIT_2}: 'resume_from step_00000099: ... missing'",
    ),
    # ---- bad input: eval, export, report, prep -----------------------------------------------------------------
    "eval_run_missing": Case("earlybert eval MISSING --shards S", "no such run", "exit 1: names MISSING/checkpoints"),
    "eval_shards_missing": Case(
        "earlybert eval RUN --shards MISSING", "no such shards", "exit 1: 'MISSING/manifest.json: not found'"
    ),
    "eval_damaged": Case(
        "earlybert eval RUN --shards S", "the latest checkpoint's shard truncated", "exit 1: names the truncated file"
    ),
    "export_run_missing": Case(
        "earlybert export MISSING --output OUT", "no such run", "exit 2: 'has no complete checkpoint'; OUT not created"
    ),
    "export_bad_tag": Case(
        "earlybert export RUN --tag step_00000099 --output OUT",
        "no such checkpoint",
        "exit 2: 'has no complete checkpoint step_00000099'; OUT not created",
    ),
    "export_damaged": Case(
        "earlybert export RUN --output OUT",
        "the latest checkpoint's shard truncated",
        "exit 2: names the truncated file; OUT not created",
    ),
    "export_output_is_file": Case(
        "earlybert export RUN --output FILE",
        "the output is a file",
        "exit 2: 'FILE exists and is not a directory'; FILE left alone",
    ),
    "report_run_missing": Case("earlybert report MISSING", "no such run", "exit 1: 'MISSING/metrics.jsonl not found'"),
    "report_metrics_corrupt": Case(
        "earlybert report RUN",
        "metrics.jsonl with a broken line",
        "exit 1: 'RUN/metrics.jsonl: line N is not JSON'; no report written",
    ),
    "report_metrics_empty": Case("earlybert report RUN", "an empty metrics.jsonl", "exit 1: 'has no records yet'"),
    "prep_output_is_file": Case(
        "earlybert prep --output FILE", "the output is a file", "exit 1: 'exists and is not a directory'"
    ),
}


def render() -> str:
    lines = [
        "# Faults and bad inputs tried",
        "",
        "Generated by `python -m tests.faults_table` from the cases of `tests/test_faults.py`, each tried by one test;",
        f"`tests/test_faults.py` fails when this file is out of date. {len(CASES)} cases.",
        "",
        "| case | command | fault | what happens |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{name}` | `{c.command}` | {c.fault} | {c.outcome} |".replace("\n", " ") for name, c in CASES.items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    DOC.parent.mkdir(exist_ok=True)
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(render())
    tmp.replace(DOC)
    print(f"{DOC}: {len(CASES)} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
