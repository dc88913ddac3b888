"""The faults and bad inputs the tests try, and docs/faults.md generated from them.

    python -m tests.faults_table      rewrite docs/faults.md from CASES

Every case here is tried by exactly one test in one of tests/test_*.py: a test decorated `@tried(CASE, ...)`, or
parametrized by `@cases(CASE, ...)` (its `case` argument). test_faults.py fails when a case is tried by no test or
by two, or when docs/faults.md is not what render() writes: the table stays the list of what the tests try.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
DOC = TESTS.parent / "docs" / "faults.md"


@dataclass(frozen=True)
class Case:
    command: str  # what a user runs (RUN, CFG, OUT: the run directory, config, output)
    fault: str  # what is wrong
    outcome: str  # what happens: the message, the exit status, what is left on disk
    exit: int  # the command's exit status: 2 bad input, 1 a failure during the work, 130 Ctrl-C, 0 recovered from


EXIT_1 = "exit 1"
EXIT_2 = "exit 2, before any process group"
CASES = {
    # ---- checkpoints ------------------------------------------------------------------------------------------
    "damaged_latest": Case(
        "earlybert train --config CFG",
        "the latest checkpoint's optimizer shard truncated",
        "message naming the shard; resumes from the newest intact checkpoint (the damaged one "
        "moved to step_N.set-aside) and reproduces the uninterrupted run's losses",
        0,
    ),
    "manifest_checks": Case(
        "earlybert train / finetune (resume)",
        "a checkpoint file truncated, missing, or a bit flipped",
        "found by size, or by sha256 (checkpoint.verify: checksum); checkpoint.verify: size checks sizes only",
        0,
    ),
    "no_manifest_accepted": Case(
        "earlybert train (resume)",
        "a checkpoint written before manifests existed (tests/fixtures/v0_runs)",
        "accepted as it is",
        0,
    ),
    "no_intact_checkpoint": Case(
        "earlybert train (resume)",
        "the only checkpoint damaged",
        "exit 2: message naming the file, 'no intact checkpoint before it'",
        2,
    ),
    "latest_unreadable": Case(
        "earlybert train / finetune (resume)",
        "checkpoints/latest holds bytes that are not a tag (not UTF-8)",
        "as a `latest` naming a missing checkpoint: message naming it; resumes from the newest intact checkpoint",
        0,
    ),
    "metrics_torn_line": Case(
        "earlybert train (resume)",
        "metrics.jsonl's last line torn by a crash while it was appended",
        "message 'line N is not a metrics record ...; dropped'; the resume goes on and logs the step again",
        0,
    ),
    "resume_from_missing": Case(
        "earlybert train --config CFG resume_from=step_00000099",
        "a tag that is not there",
        f"{EXIT_2}: message listing the intact checkpoints",
        2,
    ),
    "resume_from_malformed": Case(
        "earlybert train --config CFG resume_from=latest",
        "not a tag",
        f"{EXIT_2}: 'expected a checkpoint tag such as step_00001000'",
        2,
    ),
    "resume_from_older": Case(
        "earlybert train --config CFG resume_from=step_00000009",
        "resume from an older checkpoint by hand",
        "resumes from it, later checkpoints moved aside, the run finishes with the uninterrupted run's losses",
        0,
    ),
    "disk_full": Case(
        "earlybert train (2 ranks) on a 10 MB tmpfs",
        "the disk fills during a checkpoint",
        "exit non-zero within the collective timeout: 'saving checkpoint ... failed: ... (0.1 MiB "
        "free on its filesystem)', the previous checkpoint intact and still `latest`, the partial "
        "one removed",
        1,
    ),
    # ---- locks ------------------------------------------------------------------------------------------------
    "second_train": Case(
        "earlybert train on a RUN in use",
        "RUN/.earlybert.lock held by a live process",
        "exit 2: 'RUN is in use by ... host H, pid P'; the holder's lock left alone",
        2,
    ),
    "stale_lock": Case(
        "earlybert train / finetune / prep",
        "a lock left by a killed process (same host, pid gone)",
        "taken over, with a message",
        0,
    ),
    "lock_other_host": Case(
        "earlybert train / finetune / prep",
        "a lock of another host",
        "refused, naming the host and the file to delete if that job is gone",
        2,
    ),
    "second_prep": Case(
        "earlybert prep --output OUT", "OUT in use by another prep", "exit 2: 'OUT is in use by ...'", 2
    ),
    # ---- ranks and collectives ---------------------------------------------------------------------------------
    "exit_finalizing": Case(
        "earlybert train / finetune (ZeRO-3, gloo), at the end of a finished run",
        "a gloo worker thread releases the last collectives' tensors while the interpreter finalizes (DeepSpeed keeps "
        "the process groups alive; pytorch/pytorch#190489)",
        "every rank ends through distributed.end_rank_process (pipeline/engine): atexit handlers run, output "
        "flushed, then os._exit before finalization; exit 0 (before: SIGABRT 'terminate called without an active "
        "exception' in 4 of 48 two-rank rebuild runs under load, bench/zero3_exit_loop.py)",
        0,
    ),
    "rank_stopped": Case(
        "earlybert train (2 ranks), dist_timeout.step_s=5",
        "rank 1 stopped with SIGSTOP",
        "rank 0 exits 1 within the timeout: 'step N: a collective ... failed or waited more than "
        "dist_timeout.step_s=5 s ...; rank(s) [1] did not reach it'; the relaunch resumes exactly",
        1,
    ),
    "nan_stop": Case(
        "earlybert train (fp32), nonfinite.action=stop",
        "a NaN loss at step 5",
        "exit 1: 'step 5: the loss is nan; stopping'; latest is the step-3 checkpoint, intact",
        1,
    ),
    "nan_skip": Case(
        "earlybert train (fp32), nonfinite: {action: skip, max_skipped: 1}",
        "a NaN loss at step 5",
        "DeepSpeed skips the update; the run finishes; nonfinite_skipped 1 in metrics.jsonl from step 5",
        0,
    ),
    "train_ctrl_c": Case(
        "earlybert train --config CFG",
        "Ctrl-C (SIGINT) during a step",
        "exit 130: 'interrupted (Ctrl-C); RUN/checkpoints/latest names the last complete checkpoint', no traceback; "
        "that checkpoint intact",
        130,
    ),
    "nan_skip_limit": Case(
        "earlybert train (fp32), nonfinite: {action: skip, max_skipped: 1}",
        "NaN losses at steps 5 and 7",
        "exit 1 at step 7: 'after 1 skipped'",
        1,
    ),
    # ---- bad input: train -------------------------------------------------------------------------------------
    "train_config_missing": Case(
        "earlybert train --config nothere.yaml",
        "no such file",
        f"{EXIT_2}: 'cannot read run config nothere.yaml'",
        2,
    ),
    "train_config_not_mapping": Case(
        "earlybert train --config CFG",
        "the YAML is a list",
        f"{EXIT_2}: 'expected a mapping at the top level'",
        2,
    ),
    "train_wrong_type": Case(
        "earlybert train --config CFG phases.0.steps=ten",
        "a string for an int",
        f"{EXIT_2}: 'phases.0.steps: expected int'",
        2,
    ),
    "train_bad_choice": Case(
        "earlybert train --config CFG nonfinite.action=ignore",
        "not a choice",
        f"{EXIT_2}: 'choose one of stop, skip'",
        2,
    ),
    "train_bad_timeout": Case(
        "earlybert train --config CFG dist_timeout.step_s=0",
        "a timeout of 0",
        f"{EXIT_2}: 'dist_timeout.step_s must be > 0'",
        2,
    ),
    "train_bad_verify": Case(
        "earlybert train --config CFG checkpoint.verify=md5",
        "not a choice",
        f"{EXIT_2}: 'choose one of checksum, size'",
        2,
    ),
    "train_run_dir_is_file": Case(
        "earlybert train --config CFG run_dir=FILE",
        "run_dir is a file",
        f"{EXIT_2}: 'run_dir FILE is a file, not a directory'",
        2,
    ),
    "train_no_shards": Case(
        "earlybert train --config CFG phases.0.shards=EMPTY_DIR",
        "not a prep output",
        f"{EXIT_2}: 'manifest.json: not found'",
        2,
    ),
    "train_other_model": Case(
        "earlybert train --config CFG model.preset=bert-mini (RUN of bert-tiny)",
        "a checkpoint of another model",
        f"{EXIT_2}: 'checkpoint of another model', the fields that differ",
        2,
    ),
    "train_config_not_utf8": Case(
        "earlybert train --config CFG",
        "bytes that are not UTF-8",
        f"{EXIT_2}: 'cannot read run config CFG: not UTF-8'",
        2,
    ),
    "train_python_tag": Case(
        "earlybert train --config CFG",
        "a `!!python/object` tag",
        f"{EXIT_2}: 'could not determine a constructor for the tag ... line N'",
        2,
    ),
    "train_duplicate_key": Case(
        "earlybert train --config CFG", "a key given twice", f"{EXIT_2}: 'duplicate key ... line N'", 2
    ),
    "train_cyclic_alias": Case(
        "earlybert train --config CFG",
        "a YAML alias inside its own anchor",
        f"{EXIT_2}: 'nested deeper than 32 levels (an alias that contains itself?)'",
        2,
    ),
    "train_deep_nesting": Case(
        "earlybert train --config CFG", "lists nested 5000 deep", f"{EXIT_2}: 'nested deeper than 32 levels'", 2
    ),
    "train_yaml_bomb": Case(
        "earlybert train --config CFG",
        "a billion-laughs alias bomb under deepspeed_overrides",
        f"{EXIT_2} in under a second: 'more than 100000 values once its aliases are expanded'",
        2,
    ),
    "train_not_finite": Case(
        "earlybert train --config CFG optim.lr=.nan (or .inf timeouts, lambdas)",
        "NaN or infinity",
        f"{EXIT_2}: 'optim.lr: expected a finite number'",
        2,
    ),
    "train_bad_override_value": Case(
        "earlybert train --config CFG optim.lr=[1", "a malformed YAML value", f"{EXIT_2}: names the override", 2
    ),
    "train_out_of_range": Case(
        "earlybert train --config CFG seed=2**70 / model.overrides={hidden_dropout_prob: 1.5, intermediate_size: -3}",
        "a seed beyond 64 bits, a dropout above 1, a negative size",
        f"{EXIT_2}: names the key and its range",
        2,
    ),
    "train_deepspeed_unknown_key": Case(
        "earlybert train --config CFG deepspeed_overrides={zero_optimization: {bogus: 1}} (or {bogus: 1})",
        "a DeepSpeed key that does not exist",
        f"{EXIT_2}: 'DeepSpeed refuses it: ... bogus' / 'bogus are not DeepSpeed settings'",
        2,
    ),
    "train_micro_batch_beyond_data": Case(
        "earlybert train --config CFG micro_batch_size=N global_batch_size=N",
        "a micro-batch larger than a phase's shards",
        f"{EXIT_2}: 'holds S sequences, fewer than one micro-batch of N'",
        2,
    ),
    "train_vocab_beyond_model": Case(
        "earlybert train --config CFG model.overrides={vocab_size: 1000}",
        "shards of a tokenizer larger than the model's embeddings (any phase)",
        f"{EXIT_2}: names the phase, the tokenizer's size, the largest id in the shards (manifest max_token_id) "
        "and the model's vocabulary",
        2,
    ),
    "resume_model_changed": Case(
        "earlybert train --config CFG model.overrides={intermediate_size: N} (resume)",
        "a model shape other than the checkpoint's",
        f"{EXIT_2}: 'model.overrides.intermediate_size: checkpoint 128, config N'",
        2,
    ),
    "resume_shards_changed": Case(
        "earlybert train --config CFG phases.0.shards=SEQ64 (resume)",
        "a begun phase's shards swapped for another sequence length",
        f"{EXIT_2}: names the old and new shards, seq_len and sequences; accept_new_shards=true goes on",
        2,
    ),
    # ---- bad input: finetune ----------------------------------------------------------------------------------
    "finetune_config_missing": Case(
        "earlybert finetune --config nothere.yaml",
        "no such file",
        f"{EXIT_2}: 'cannot read run config nothere.yaml'",
        2,
    ),
    "finetune_wrong_type": Case(
        "earlybert finetune --config CFG seed=abc",
        "a string for an int",
        f"{EXIT_2}: 'seed: expected int'",
        2,
    ),
    "finetune_init_from_missing": Case(
        "earlybert finetune --config CFG model.init_from=MISSING",
        "no such model",
        f"{EXIT_2}: 'model.init_from MISSING does not exist'",
        2,
    ),
    "finetune_pretraining_run_dir": Case(
        "earlybert finetune --config CFG run_dir=PRETRAINING_RUN",
        "a run directory of the wrong kind",
        f"{EXIT_2}: 'a checkpoint of another task head'",
        2,
    ),
    "finetune_resume_from_missing": Case(
        "earlybert finetune --config CFG resume_from=step_00000099",
        "a tag that is not there",
        f"{EXIT_2}: 'resume_from step_00000099: ... missing'",
        2,
    ),
    "finetune_validation_files_list": Case(
        "earlybert finetune --config CFG task.validation_files=[dev.csv]",
        "a list where the example configs give a mapping (as task.train_files takes it)",
        "accepted: the split 'validation'",
        0,
    ),
    "finetune_validation_only_label": Case(
        "earlybert finetune --config CFG",
        "a validation label that no training row has",
        f"{EXIT_2}: 'label(s) X are not among the labels in the training data (FILE)'",
        2,
    ),
    "finetune_squad_answers_outside": Case(
        "earlybert finetune --config CFG (qa)",
        "a SQuAD training file whose answers all lie outside their contexts",
        f"{EXIT_2}: 'no training question has its answer text at its answer_start'",
        2,
    ),
    "finetune_init_from_junk": Case(
        "earlybert finetune --config CFG model.init_from=JUNK_DIR",
        "a directory that holds no model",
        f"{EXIT_2}: 'model.init_from JUNK_DIR holds no tokenizer', not sentencepiece's error",
        2,
    ),
    "finetune_tokenizer_beyond_model": Case(
        "earlybert finetune --config CFG model.tokenizer=BIGGER.json",
        "a tokenizer with more ids than the model's embeddings",
        f"{EXIT_2}: 'the tokenizer (... ids) is larger than the model's vocabulary'",
        2,
    ),
    # ---- bad input: eval, export, report, prep -----------------------------------------------------------------
    "eval_run_missing": Case(
        "earlybert eval MISSING --shards S", "no such run", "exit 2: names MISSING/checkpoints", 2
    ),
    "eval_shards_missing": Case(
        "earlybert eval RUN --shards MISSING",
        "no such shards",
        "exit 2: 'MISSING/manifest.json: not found'",
        2,
    ),
    "eval_damaged": Case(
        "earlybert eval RUN --shards S",
        "the latest checkpoint's shard truncated",
        "exit 2: names the truncated file",
        2,
    ),
    "eval_bad_arguments": Case(
        "earlybert eval RUN --shards S --batch-size 0 (--max-sequences -1, --device tpu9)",
        "a size below 1, a device that does not exist",
        "exit 2: usage and 'expected a whole number >= 1' / 'is not a torch device'",
        2,
    ),
    "export_run_missing": Case(
        "earlybert export MISSING --output OUT",
        "no such run",
        "exit 2: 'has no complete checkpoint'; OUT not created",
        2,
    ),
    "export_bad_tag": Case(
        "earlybert export RUN --tag step_00000099 --output OUT",
        "no such checkpoint",
        "exit 2: 'has no complete checkpoint step_00000099'; OUT not created",
        2,
    ),
    "export_damaged": Case(
        "earlybert export RUN --output OUT",
        "the latest checkpoint's shard truncated",
        "exit 2: names the truncated file; OUT not created",
        2,
    ),
    "export_output_is_file": Case(
        "earlybert export RUN --output FILE",
        "the output is a file",
        "exit 2: 'FILE exists and is not a directory'; FILE left alone",
        2,
    ),
    "export_latest_unreadable": Case(
        "earlybert export RUN --output OUT",
        "checkpoints/latest holds bytes that are not UTF-8",
        "exit 2: 'RUN/checkpoints/latest cannot be read as a checkpoint tag'; OUT not created",
        2,
    ),
    "report_run_missing": Case(
        "earlybert report MISSING", "no such run", "exit 2: 'MISSING/metrics.jsonl not found'", 2
    ),
    "report_metrics_corrupt": Case(
        "earlybert report RUN",
        "metrics.jsonl with a broken line",
        "exit 2: 'RUN/metrics.jsonl: line N is not JSON'; no report written",
        2,
    ),
    "report_metrics_empty": Case("earlybert report RUN", "an empty metrics.jsonl", "exit 2: 'has no records yet'", 2),
    "report_metrics_binary": Case(
        "earlybert report RUN", "a metrics.jsonl of random bytes", "exit 2: 'line N is not JSON'; no report written", 2
    ),
    # ---- hostile input, property-based (tests/test_hostile_input.py) ------------------------------------------
    "hostile_run_config": Case(
        "earlybert train --config CFG [key=value ...]",
        "generated: random bytes, zero bytes, invalid UTF-8, NUL, deep or cyclic YAML, bombs, wrong types, unknown "
        "and duplicate keys, in the file and in overrides",
        f"loads, or {EXIT_2} naming the file or key (ConfigError); nothing else",
        2,
    ),
    "hostile_finetune_config": Case(
        "earlybert finetune --config CFG [key=value ...]",
        "generated, as for the run config",
        f"loads, or {EXIT_2} naming the file or key (ConfigError or TaskError); nothing else",
        2,
    ),
    "hostile_task_files": Case(
        "earlybert finetune (task.train_files: CSV, TSV, JSONL, Parquet, SQuAD JSON)",
        "generated: random bytes, zero bytes, invalid UTF-8, NUL, wrong columns and types",
        f"read, or {EXIT_2} naming the file (TaskError); nothing else",
        2,
    ),
    "prep_output_is_file": Case(
        "earlybert prep --output FILE",
        "the output is a file",
        "exit 2: 'exists and is not a directory'",
        2,
    ),
    # ---- prep: outputs, inputs that are not files, stops, hostile corpora (tests/test_prep_hostile.py) ----------
    "prep_output_is_input": Case(
        "earlybert prep / prep tokenizer / prep local-corpus --output OUT",
        "OUT is, contains or lies inside an input (the corpus, its directory, the tokenizer, a --from directory)",
        "exit 2 before any work: '--output OUT is / lies inside / contains the input IN'; every input unchanged",
        2,
    ),
    "prep_output_in_run": Case(
        "earlybert prep --output RUN/data",
        "the output inside a run directory",
        "exit 2: 'lies inside the run directory'",
        2,
    ),
    "prep_output_special": Case(
        "earlybert prep / tokenizer / local-corpus --output FIFO (or /dev/null)",
        "the output is a FIFO or a character device",
        "exit 2: 'exists and is not a regular file or a directory'; it stays a FIFO / device",
        2,
    ),
    "prep_output_under_file": Case(
        "earlybert prep / tokenizer / local-corpus --output FILE/sub/out",
        "the output lies under a regular file (or in a read-only directory)",
        "exit 2 before any work (the tokenizer before training): 'lies under FILE, which is not a directory'",
        2,
    ),
    "prep_output_read_only": Case(
        "earlybert prep / tokenizer / local-corpus --output RO/out",
        "the output on a read-only filesystem (a traceback, after the tokenizer's training)",
        "exit 2 before any work: 'cannot write in RO (read-only filesystem or no permission)'",
        2,
    ),
    "tokenizer_output_missing_dir": Case(
        "earlybert prep tokenizer --output NEW/DIR/tok.json", "the output's directory does not exist", "created", 0
    ),
    "tokenizer_leftovers": Case(
        "earlybert prep tokenizer --output tok.json",
        "temporary files of an interrupted write beside it (this host; dead and live pids)",
        "the dead process's removed, the live one's kept",
        0,
    ),
    "prep_bad_options": Case(
        "earlybert prep --workers -1 / --seq-len 1000000000 / --shard-sequences 0 / --unit-kb 0 / --text-field "
        "content on plain text ...",
        "an option out of range, or one that does not apply",
        "exit 2: a message naming that option and its value only",
        2,
    ),
    "tokenizer_vocab_size": Case(
        "earlybert prep tokenizer --vocab-size -1 / 0 / 3 / 5",
        "no room beyond the 5 special tokens",
        "exit 2 (usage): 'must be more than the 5 special tokens'",
        2,
    ),
    "prep_zero_byte_input": Case(
        "earlybert prep --input EMPTY", "a zero-byte input", "exit 2: 'no documents in EMPTY'", 2
    ),
    "prep_workers_absurd": Case(
        "earlybert prep --workers 10000",
        "more workers than usable cores (it forked over 1,000 processes)",
        "'this process may use N cores; starting N workers'; the output is the same",
        0,
    ),
    "prep_device_input": Case(
        "earlybert prep --input /dev/zero (or /dev/urandom)",
        "an input that never ends",
        "exit 2 at once: 'a character device, not a file or a pipe'",
        2,
    ),
    "prep_fifo_no_writer": Case(
        "earlybert prep --input FIFO",
        "a FIFO nobody writes to (it ran until killed)",
        "exit 2 after 1 s: 'a pipe with no writer and no data'",
        2,
    ),
    "prep_pipe_input": Case(
        "earlybert prep --input - / <(zcat corpus.jsonl.gz) / FIFO with a writer",
        "a pipe (it blocked forever)",
        "streamed, JSONL told by its first line: the same shards as the file",
        0,
    ),
    "prep_skipped_files": Case(
        "earlybert prep --input DIR [--strict]",
        "a broken link and a FIFO among DIR's data files (dropped without a word)",
        "a warning naming each and the count; with --strict exit 2",
        0,
    ),
    "prep_wrong_type": Case(
        "earlybert prep --input X.jsonl [--strict]",
        "'text' values that are numbers, null, lists or objects (counted as empty documents)",
        "a warning with the count and line numbers; with --strict exit 2; all of them: exit 2 'not a string'",
        0,
    ),
    "prep_random_bytes": Case(
        "earlybert prep --input NOISE",
        "random bytes as a corpus (shards of garbage)",
        "exit 2: 'N of its M bytes (P%) are not UTF-8' above 10%; below, replaced and counted",
        2,
    ),
    "prep_truncated_compressed": Case(
        "earlybert prep --input X.txt.gz / .bz2 / .zst",
        "the compressed stream cut short (.zst was read as far as it went)",
        "exit 2: 'X: cannot read ... truncated'",
        2,
    ),
    "prep_long_record": Case(
        "earlybert prep --input X.jsonl --unit-kb 256",
        "a JSONL record longer than 8 units (held whole in memory)",
        "exit 2: 'X:LINE: a JSONL record longer than 2 MB ...; raise --unit-kb'",
        2,
    ),
    "shards_max_token_id": Case(
        "ShardDataset(OUT) (train, eval)",
        "a manifest whose max_token_id is not below its vocab_size",
        "ShardError naming manifest.json; prep records max_token_id for every shard and for the whole",
        2,
    ),
    "prep_enormous_line": Case(
        "earlybert prep --input LINE.txt (NSP)",
        "one 1 MB line (0.5% of its tokens reached the shards; 0.25% for 100 MB)",
        "every over-long segment cut into quarter-sequence pieces: > 95% of its tokens in the shards",
        0,
    ),
    "prep_enormous_line_memory": Case(
        "earlybert prep --input LINE.txt --workers 1",
        "one line of 2 MB and of 24 MB",
        "peak RSS grows < 64 MiB between them (measured 46), < 512 MiB in all",
        0,
    ),
    "prep_ctrl_c": Case(
        "earlybert prep --workers 2, Ctrl-C (SIGINT to the process group)",
        "a terminal's Ctrl-C (the main process waited forever)",
        "exit 130 within seconds, no process left; the rerun resumes to the uninterrupted run's shards",
        130,
    ),
    "prep_sigterm": Case(
        "earlybert prep --workers 2, SIGTERM to the main process",
        "a requested stop (Slurm)",
        "exit 75, no process left; the rerun resumes to the uninterrupted run's shards",
        75,
    ),
    "tokenizer_ctrl_c": Case(
        "earlybert prep tokenizer, Ctrl-C",
        "Ctrl-C during training (the Rust trainer ignores it)",
        "exit 130 within seconds; nothing written",
        130,
    ),
    # ---- prep: generated inputs (Hypothesis, tests/test_prep_properties.py) --------------------------------------
    "prep_generated_corpus": Case(
        "earlybert prep --input F1 [F2 F3]",
        "generated: random bytes, zero bytes, invalid UTF-8, NUL, JSON values of every type, gzip/bz2/zstd whole "
        "or cut anywhere",
        "prepared (the shards verify), or exit 2 naming the file and nothing under a final name; never a traceback",
        2,
    ),
    "prep_generated_parquet": Case(
        "earlybert prep --input X.parquet",
        "generated: text, null and integer columns, another column name, the file cut anywhere",
        "prepared, or exit 2 naming the file",
        2,
    ),
    "prep_generated_dataset_dir": Case(
        "earlybert prep --input DS (save_to_disk)",
        "one of its files cut, replaced by random bytes or a JSON value, or deleted",
        "prepared, or exit 2 naming the directory (a null dataset_info.json raised TypeError)",
        2,
    ),
    "prep_generated_tokenizer": Case(
        "earlybert prep --tokenizer TOK",
        "generated: random bytes, the file cut anywhere, a field deleted or replaced by any JSON value",
        "loaded, or exit 2 naming the file (non-UTF-8 raised UnicodeDecodeError)",
        2,
    ),
    "shards_generated_damage": Case(
        "ShardDataset(OUT).verify()",
        "a manifest field deleted or replaced by any JSON value; a shard file cut or a byte flipped",
        "reads back, or ShardError naming the directory (KeyError, OverflowError, a terabyte get_batch before)",
        2,
    ),
}


def tried(*names):
    """Marks a test as trying these cases of the table (any test file may; the names must be in CASES)."""
    unknown = set(names) - set(CASES)
    assert not unknown, f"not in tests/faults_table.py: {unknown}"
    return lambda test: test


def cases(*names):
    """A parametrize over table cases: the test's `case` argument is each name in turn."""
    tried(*names)
    return pytest.mark.parametrize("case", names)


def claimed() -> Counter:
    """How many `tried(...)`/`cases(...)` calls in tests/test_*.py name each case: read from the sources, so a
    case tried in a file pytest did not import (another -k, one file run alone) still counts."""
    names = Counter()
    for path in sorted(TESTS.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
                "tried",
                "cases",
            ):
                names.update(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return names


OUTCOMES = {
    2: "end with a clear message and exit 2 (bad input or usage)",
    1: "end with a clear message and exit 1 (a failure during the work)",
    130: "stop on Ctrl-C with a message and exit 130",
    0: "are recovered from or accepted (the command goes on)",
    75: "stop on request (SIGTERM) with exit 75, resumable",
}


def render() -> str:
    counts = Counter(c.exit for c in CASES.values())
    lines = [
        "# Faults and bad inputs tried",
        "",
        "Generated by `python -m tests.faults_table` from the cases of `tests/faults_table.py`, each tried by one test",
        "in `tests/test_*.py`; `tests/test_faults.py` fails when this file is out of date.",
        "",
        f"{len(CASES)} cases tried:",
        "",
        *(f"- {counts[code]} {OUTCOMES[code]}" for code in OUTCOMES),
        "",
        "| case | command | fault | what happens | exit |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| `{name}` | `{c.command}` | {c.fault} | {c.outcome} | {c.exit} |".replace("\n", " ")
        for name, c in CASES.items()
    ]
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
