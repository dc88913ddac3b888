"""Command line of `earlybert prep` (also `python -m data_prep`).

earlybert prep --input PATH [PATH ...] --output DIR --tokenizer PATH --seq-len N [--workers N] ...
earlybert prep tokenizer --input PATH [PATH ...] --output tokenizer.json [--vocab-size 30522] [--lowercase]
earlybert prep local-corpus --output FILE [--max-mb 20] [--from DIR ...]

Exit status, the same for the three (data_prep/stops.py): 0 done, 2 bad input or usage, 1 a failure during the
work, 75 stopped by SIGTERM, 130 stopped by Ctrl-C.
"""

import argparse
import sys
import time

from common.cli import HelpFormatter
from common.outputs import OutputError
from common.progress import DEFAULT_INTERVAL, INTERVAL_ENV
from data_prep import stops
from data_prep.readers import InputError


def _prep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="earlybert prep",
        formatter_class=HelpFormatter,
        description="Tokenize a corpus into memory-mapped BERT pre-training shards.\nOther actions: "
        "`earlybert prep tokenizer --help`, `earlybert prep local-corpus --help`.",
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="plain text (blank line between documents), JSONL, Parquet, a saved `datasets` "
        "directory; .gz/.bz2/.zst; files, directories or globs, local or fsspec URLs (hf://, "
        "s3://, gs://, ...); dataset:NAME[:CONFIG][:SPLIT] streams a `datasets` dataset "
        "(default split: train)",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="shard directory (rerun the same command to resume)")
    p.add_argument("--tokenizer", required=True, metavar="PATH", help="tokenizer.json or a directory holding one")
    p.add_argument("--seq-len", type=int, default=128, metavar="N", help="sequence length")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="worker processes per rank; 0: every usable core (1 per rank under MPI)",
    )
    p.add_argument(
        "--nsp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="sentence pairs with next-sentence labels, or --no-nsp: packed full sentences",
    )
    p.add_argument("--seed", type=int, default=12345, help="seed of the sentence pairing")
    p.add_argument("--short-seq-prob", type=float, default=0.1, help="NSP: chance of a shorter target length")
    p.add_argument(
        "--dedup", action=argparse.BooleanOptionalAction, default=True, help="drop exact duplicate documents"
    )
    p.add_argument("--text-field", default="text", help="text field of JSONL/Parquet/datasets input")
    p.add_argument("--shard-sequences", type=int, default=32768, metavar="N", help="sequences per shard")
    p.add_argument(
        "--unit-kb", type=int, default=1024, metavar="KB", help="input per work unit; part of the output's identity"
    )
    p.add_argument("--max-line-chars", type=int, default=100_000, metavar="N", help="longer lines are split")
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop on files of input directories that cannot be read (broken links, FIFOs) and on JSONL records "
        "whose text field is not a string, instead of skipping them with a warning",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="progress on stderr: a bar on a terminal, else a line every "
        f"${INTERVAL_ENV} seconds ({DEFAULT_INTERVAL:.0f} when unset)",
    )
    return p


def _tokenizer_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="earlybert prep tokenizer",
        formatter_class=HelpFormatter,
        description="Train a BERT-style WordPiece tokenizer.json on a corpus.",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="same inputs as `earlybert prep`")
    p.add_argument(
        "--output", required=True, metavar="PATH", help="tokenizer.json to write, or a directory to write it into"
    )
    p.add_argument("--vocab-size", type=int, default=30522, help="tokens in the vocabulary, special ones included")
    p.add_argument("--lowercase", action="store_true", help="lower-case and strip accents (BERT uncased)")
    p.add_argument("--min-frequency", type=int, default=2, help="rarer pieces are not merged into the vocabulary")
    p.add_argument("--text-field", default="text", help="text field of JSONL/Parquet/datasets input")
    return p


def _corpus_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="earlybert prep local-corpus",
        formatter_class=HelpFormatter,
        description="Write a plain-text corpus from text already on this machine: docstrings of the Python "
        "standard library and installed packages, and their .rst/.md/.txt documentation.",
    )
    p.add_argument("--output", required=True, metavar="FILE", help="plain-text corpus to write")
    p.add_argument("--max-mb", type=float, default=20.0, help="stop at this many MB")
    p.add_argument(
        "--from",
        dest="doc_roots",
        nargs="+",
        metavar="DIR",
        help="read only the .rst/.md/.txt files (optionally .gz) under these directories, e.g. "
        "/usr/share/doc/linux-doc-6.1/Documentation (the Linux kernel documentation)",
    )
    return p


def _tokenizer(argv: list[str]):
    from data_prep.wordpiece import SPECIAL_TOKENS, tokenizer_path, train_wordpiece

    parser = _tokenizer_parser()
    a = parser.parse_args(argv)
    if a.vocab_size <= len(SPECIAL_TOKENS):
        parser.error(f"--vocab-size {a.vocab_size}: must be more than the {len(SPECIAL_TOKENS)} special tokens")
    if a.min_frequency < 0:
        parser.error(f"--min-frequency {a.min_frequency}: must be >= 0")
    output = tokenizer_path(a.output)
    started = time.time()
    print(
        f"{output}: training a WordPiece vocabulary of {a.vocab_size} tokens on {' '.join(a.input)}",
        file=sys.stderr,
        flush=True,
    )
    tok = train_wordpiece(
        a.input,
        output,
        vocab_size=a.vocab_size,
        lowercase=a.lowercase,
        min_frequency=a.min_frequency,
        text_field=a.text_field,
        progress=True,
    )
    print(
        f"{output}: WordPiece vocabulary of {tok.get_vocab_size()} tokens in {time.time() - started:.1f} s",
        file=sys.stderr,
    )


def _local_corpus(argv: list[str]):
    from data_prep.local_corpus import gather_local_corpus

    parser = _corpus_parser()
    a = parser.parse_args(argv)
    if not a.max_mb > 0:
        parser.error(f"--max-mb {a.max_mb}: must be > 0")
    stats = gather_local_corpus(a.output, int(a.max_mb * 1e6), doc_roots=a.doc_roots)
    print(
        f"{a.output}: {stats['documents']} documents, {stats['bytes'] / 1e6:.1f} MB "
        f"from {stats['files_scanned']} files in {stats['seconds']:.1f} s",
        file=sys.stderr,
    )


def _prep(argv: list[str]):
    from data_prep.prep import PrepConfig, run_prep

    a = _prep_parser().parse_args(argv)
    cfg = PrepConfig(
        inputs=a.input,
        output=a.output,
        tokenizer=a.tokenizer,
        seq_len=a.seq_len,
        workers=a.workers,
        nsp=a.nsp,
        seed=a.seed,
        short_seq_prob=a.short_seq_prob,
        dedup=a.dedup,
        text_field=a.text_field,
        shard_sequences=a.shard_sequences,
        unit_bytes=a.unit_kb * 1024,
        max_line_chars=a.max_line_chars,
        progress=a.progress,
        strict=a.strict,
    )
    run_prep(cfg)


# action: (function, what an interrupted run leaves)
ACTIONS = {
    "prep": (_prep, "what is finished is kept: rerun the same command to resume"),
    "tokenizer": (_tokenizer, "nothing was written"),
    "local-corpus": (_local_corpus, "nothing was written"),
}


def main(argv: list[str] | None = None) -> int:
    """The one place where an outcome becomes an exit status (data_prep/stops.py)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    action = argv[0] if argv and argv[0] in ACTIONS and argv[0] != "prep" else "prep"
    run, leaves = ACTIONS[action]
    name = "earlybert prep" + ("" if action == "prep" else f" {action}")
    try:
        with stops.stop_on_sigterm():
            run(argv if action == "prep" else argv[1:])
    except (InputError, OutputError) as e:  # PrepError is an InputError
        print(f"{name}: error: {e}", file=sys.stderr)
        return stops.EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{name}: interrupted (Ctrl-C); {leaves}", file=sys.stderr)
        return stops.EXIT_INTERRUPTED
    except stops.StopRequested:
        print(f"{name}: stopped (SIGTERM); {leaves}", file=sys.stderr)
        return stops.EXIT_STOPPED
    except (OSError, stops.Failure) as e:  # the disk, not the input: the same command may work once it is fixed
        print(f"{name}: failed: {e}; {leaves}", file=sys.stderr)
        return stops.EXIT_FAILED
    return 0
