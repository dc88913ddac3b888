"""Worker side of pass 1: parse a unit into documents and lines, hash documents for dedup, and
tokenize every line with one `encode_batch_fast` call (Rust; no offsets computed).

Documents are lists of lines ("segments": one sentence or paragraph each, BERT's convention).
A unit's output is stored as flat token ids plus per-line token counts and per-document line
counts, so pass 2 can rebuild the segments without re-tokenizing.
"""

import hashlib
import itertools
import json
import re
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from data_prep.readers import InputError, Unit

# Statistics a unit reports, in this order (stored as an int64 array in the unit file). wrong_type: JSONL records
# whose text field is not a string (a number, null, a list, an object); input_bytes: of text and JSONL, decoded.
STATS = (
    "input_documents",
    "empty_documents",
    "replaced_bytes",
    "split_lines",
    "split_documents",
    "wrong_type",
    "input_bytes",
)
WRONG_TYPE_LINES = 5  # line numbers of wrong_type records kept per unit, for the message
ENCODE_BATCH_CHARS = 1 << 20  # characters per tokenizer call: its Encoding objects take ~100 bytes a token
SPECIAL_NAMES = {
    "cls": ("[CLS]", "<s>"),
    "sep": ("[SEP]", "</s>"),
    "mask": ("[MASK]", "<mask>"),
    "pad": ("[PAD]", "<pad>"),
    "unk": ("[UNK]", "<unk>"),
}
_ESCAPED = re.compile("[\udc80-\udcff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def load_tokenizer(path) -> tuple[Tokenizer, str, str]:
    """(tokenizer, its JSON text, the file it came from) from a tokenizer.json or a Hugging Face
    tokenizer directory."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise InputError(
            f"{file}: tokenizer not found; pass a tokenizer.json or a directory holding one "
            f"(train one with `earlybert prep tokenizer`)"
        )
    try:
        text = file.read_text(encoding="utf-8")
        tok = tokenizer_from_json(text)
    except Exception as e:  # not UTF-8, not JSON, or JSON the Rust parser refuses (it raises plain Exception)
        raise InputError(f"{file}: not a Hugging Face fast tokenizer ({type(e).__name__}: {e})") from e
    return tok, text, str(file.resolve())


def tokenizer_from_json(text: str) -> Tokenizer:
    """Truncation and padding are switched off: prep must see every token."""
    tok = Tokenizer.from_str(text)
    tok.no_truncation()
    tok.no_padding()
    return tok


def special_ids(tok: Tokenizer, file: str) -> dict:
    ids = {}
    for name, candidates in SPECIAL_NAMES.items():
        found = [tok.token_to_id(c) for c in candidates if tok.token_to_id(c) is not None]
        if not found:
            raise InputError(
                f"{file}: no {' or '.join(candidates)} token; BERT pre-training needs "
                f"[CLS], [SEP], [MASK], [PAD] and [UNK]"
            )
        ids[name] = found[0]
    return ids


def _decode(raw: bytes) -> tuple[str, int]:
    """UTF-8 text and the number of invalid bytes, each replaced by U+FFFD."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        # surrogateescape maps each invalid byte to one lone surrogate: count them exactly.
        return _ESCAPED.subn("\ufffd", raw.decode("utf-8", "surrogateescape"))


def _split_long(line: str, limit: int) -> list[str]:
    """Pieces of at most `limit` characters, cut at a space where there is one nearby."""
    pieces = []
    while len(line) > limit:
        cut = line.rfind(" ", limit // 2, limit)
        cut = cut if cut > 0 else limit
        pieces.append(line[:cut])
        line = line[cut:].lstrip()
    return pieces + [line] if line else pieces


def _lines(text: str) -> list[str]:
    return [s for s in (line.strip() for line in text.split("\n")) if s]


def parse_unit(unit: Unit, text_field: str) -> tuple[list[list[str]], dict]:
    """Documents (lists of non-blank, stripped lines) and statistics of one unit; stats["wrong_type_lines"]: the
    first line numbers of JSONL records whose text is not a string."""
    stats = dict.fromkeys(STATS, 0)
    stats["split_lines"] = unit.split_lines
    stats["split_documents"] = unit.split_documents
    stats["wrong_type_lines"] = []
    if unit.kind == "records":
        texts = unit.payload
    else:
        text, stats["replaced_bytes"] = _decode(unit.payload)
        stats["input_bytes"] = len(unit.payload)
        if unit.kind == "text":
            docs, doc = [], []
            for line in text.split("\n"):
                line = line.strip()
                if line:
                    doc.append(line)
                elif doc:
                    docs.append(doc)
                    doc = []
            if doc:
                docs.append(doc)
            return docs, stats
        texts = []
        for offset, line in enumerate(text.split("\n")):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise InputError(
                    f"{unit.path}:{unit.first_line + offset}: invalid JSON ({e}); JSONL needs one JSON object per line"
                ) from e
            if not isinstance(record, dict) or text_field not in record:
                keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise InputError(
                    f"{unit.path}:{unit.first_line + offset}: no {text_field!r} field "
                    f"(found: {keys}); pass --text-field"
                )
            value = record[text_field]
            if not isinstance(value, str):
                stats["wrong_type"] += 1
                if len(stats["wrong_type_lines"]) < WRONG_TYPE_LINES:
                    stats["wrong_type_lines"].append(unit.first_line + offset)
                continue
            # JSON escapes can encode lone surrogates, which are not text: replace and count them.
            value, bad = _SURROGATE.subn("\ufffd", value)
            stats["replaced_bytes"] += bad
            texts.append(value)
    docs = []
    for text in texts:
        lines = _lines(text)
        if lines:
            docs.append(lines)
        else:
            stats["empty_documents"] += 1
    return docs, stats


def encode_unit(unit: Unit, tok: Tokenizer, *, text_field: str, max_line_chars: int, token_dtype) -> dict:
    """Arrays of one unit: tokens, line_tokens (per kept line), doc_lines (per kept document),
    doc_hash ([docs, 16] bytes of BLAKE2b of the document's text), stats and wrong_type_lines."""
    docs, stats = parse_unit(unit, text_field)
    lines, doc_sizes, hashes = [], [], []
    for doc in docs:
        n = 0
        for line in doc:
            if len(line) > max_line_chars:
                pieces = _split_long(line, max_line_chars)
                stats["split_lines"] += 1
                lines += pieces
                n += len(pieces)
            else:
                lines.append(line)
                n += 1
        doc_sizes.append(n)
        hashes.append(hashlib.blake2b("\n".join(doc).encode(), digest_size=16).digest())
    line_tokens, tokens = _tokenize(tok, lines, token_dtype)
    # Lines that tokenize to nothing (only characters the normalizer drops) are no segments;
    # documents left with no tokens count as empty.
    line_doc = np.repeat(np.arange(len(doc_sizes)), doc_sizes)
    keep_line = line_tokens > 0
    doc_lines = np.bincount(line_doc[keep_line], minlength=len(doc_sizes))
    keep_doc = doc_lines > 0
    stats["empty_documents"] += int((~keep_doc).sum())
    stats["input_documents"] = int(keep_doc.sum())
    hashes = np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(-1, 16)
    return {
        "tokens": tokens,
        "line_tokens": line_tokens[keep_line].astype(np.int32),
        "doc_lines": doc_lines[keep_doc].astype(np.int32),
        "doc_hash": hashes[keep_doc],
        "stats": np.array([stats[k] for k in STATS], dtype=np.int64),
        "wrong_type_lines": np.array(stats["wrong_type_lines"], dtype=np.int64),
    }


def _tokenize(tok: Tokenizer, lines: list[str], token_dtype) -> tuple[np.ndarray, np.ndarray]:
    """(tokens per line, every token) of `lines`, tokenized ENCODE_BATCH_CHARS at a time: a unit cut out of one
    enormous line is 8 MB of text, whose Encoding objects at once would take about a gigabyte."""
    counts, tokens, batch, size = [], [], [], 0
    for i, line in enumerate(lines):
        batch.append(line)
        size += len(line)
        if size >= ENCODE_BATCH_CHARS or i == len(lines) - 1:
            ids = [e.ids for e in tok.encode_batch_fast(batch, add_special_tokens=False)]
            counts.append(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)))
            n = int(counts[-1].sum())
            tokens.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=token_dtype, count=n))
            batch, size = [], 0
    if not counts:
        return np.zeros(0, np.int64), np.zeros(0, token_dtype)
    return np.concatenate(counts), np.concatenate(tokens)
