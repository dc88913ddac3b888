"""Pass 2: build BERT input sequences from the tokenized documents of one unit.

Two layouts, both without masking (masking is dynamic at load time):
- NSP pairs, as Google's create_pretraining_data.py: `[CLS] A [SEP] B [SEP]`, B the actual
  continuation or (50%, and always when A is a single segment) segments from another document,
  a short target length with probability short_seq_prob, random front/back truncation. A segment
  longer than a whole sequence (a line of 100 MB) is first cut into pieces of a quarter sequence,
  which are paired like sentences: truncation would keep one sequence's worth of it and drop the rest.
  The random document is drawn from the same unit, so a unit's sequences depend only on the
  unit and the seed: identical output for any number of workers and ranks.
- Packed full sentences, as RoBERTa's FULL-SENTENCES: `[CLS] s1 s2 ... [SEP]` filled with whole
  lines, crossing document boundaries with a [SEP] between documents; a line longer than a
  sequence is cut into sequence-sized pieces, so no token is lost.

Output: flat tokens (special tokens included) and an int32 [n, 3] table (length, len_a, label)
where len_a counts `[CLS] A [SEP]` and label is -1 without NSP.
"""

import itertools

import numpy as np


def unit_rng(seed: int, source: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, source, index])


def split_docs(tokens, line_tokens, doc_lines, keep) -> list[list[np.ndarray]]:
    """Kept documents as lists of per-line token arrays (views into `tokens`)."""
    lines = np.split(tokens, np.cumsum(line_tokens)[:-1]) if len(line_tokens) else []
    bounds = np.concatenate([[0], np.cumsum(doc_lines)])
    return [lines[bounds[d] : bounds[d + 1]] for d in range(len(doc_lines)) if keep[d]]


def split_segments(docs, max_tokens: int) -> list[list[np.ndarray]]:
    """Segments longer than max_tokens cut into pieces of max_tokens // 4 (views); the others as they are."""
    piece = max(1, max_tokens // 4)
    return [
        [
            part
            for seg in doc
            for part in ([seg] if len(seg) <= max_tokens else np.split(seg, range(piece, len(seg), piece)))
        ]
        for doc in docs
    ]


def _truncate_pair(len_a: int, len_b: int, max_tokens: int, rng) -> tuple[slice, slice]:
    """Closed form of BERT's truncate_seq_pair: repeatedly drop one token from the longer side
    (B on ties), from the front or the back with equal probability."""
    excess = len_a + len_b - max_tokens
    if excess <= 0:
        return slice(0, len_a), slice(0, len_b)
    if len_a - len_b >= excess:
        new_a, new_b = len_a - excess, len_b
    elif len_b - len_a >= excess:
        new_a, new_b = len_a, len_b - excess
    else:
        new_a, new_b = (max_tokens + 1) // 2, max_tokens // 2
    front_a = rng.binomial(len_a - new_a, 0.5)
    front_b = rng.binomial(len_b - new_b, 0.5)
    return slice(front_a, front_a + new_a), slice(front_b, front_b + new_b)


def nsp_pairs(docs, seq_len: int, short_seq_prob: float, rng, cls: int, sep: int):
    max_tokens = seq_len - 3
    out, table = [], []
    cls_, sep_ = np.array([cls]), np.array([sep])
    for d, doc in enumerate(docs):
        target = max_tokens
        if rng.random() < short_seq_prob:
            target = int(rng.integers(2, max_tokens + 1))
        chunk, length, i = [], 0, 0
        while i < len(doc):
            chunk.append(doc[i])
            length += len(doc[i])
            if i == len(doc) - 1 or length >= target:
                a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
                a = np.concatenate(chunk[:a_end])
                if len(chunk) == 1 or rng.random() < 0.5:
                    label = 1
                    # Another document of the unit; a unit holding a single document can only
                    # offer that document (as BERT does when its 10 draws all hit the same one).
                    other = d
                    if len(docs) > 1:
                        other = int(rng.integers(len(docs) - 1))
                        other += other >= d
                    rdoc = docs[other]
                    start = int(rng.integers(len(rdoc)))
                    b, size = [], 0
                    for seg in itertools.islice(rdoc, start, None):  # rdoc[start:] copied the list: quadratic
                        b.append(seg)
                        size += len(seg)
                        if size >= target - len(a):
                            break
                    b = np.concatenate(b)
                    i -= len(chunk) - a_end  # the unused segments go back for the next pair
                else:
                    label = 0
                    b = np.concatenate(chunk[a_end:])
                sa, sb = _truncate_pair(len(a), len(b), max_tokens, rng)
                a, b = a[sa], b[sb]
                out += [cls_, a, sep_, b, sep_]
                table.append((len(a) + len(b) + 3, len(a) + 2, label))
                chunk, length = [], 0
            i += 1
    return out, table


def packed(docs, seq_len: int, cls: int, sep: int):
    cap = seq_len - 2
    out, table = [], []
    cls_, sep_ = np.array([cls]), np.array([sep])
    current, size = [], 0

    def flush():
        nonlocal current, size
        if current and current[-1] is sep_:  # no document separator right before the final [SEP]
            current.pop()
            size -= 1
        if size:
            out.extend([cls_, *current, sep_])
            table.append((size + 2, size + 2, -1))
        current, size = [], 0

    for doc in docs:
        if size and size < cap:
            current.append(sep_)
            size += 1
        for line in doc:
            if size + len(line) > cap:
                flush()
            while len(line) > cap:  # longer than a whole sequence: cut into full pieces
                current, size = [line[:cap]], cap
                flush()
                line = line[cap:]
            if len(line):
                current.append(line)
                size += len(line)
    flush()
    return out, table


def build_sequences(
    arrays: dict, keep: np.ndarray, *, nsp: bool, seq_len: int, short_seq_prob: float, rng, cls: int, sep: int
) -> tuple[np.ndarray, np.ndarray]:
    docs = split_docs(arrays["tokens"], arrays["line_tokens"], arrays["doc_lines"], keep)
    if nsp:
        pieces, table = nsp_pairs(split_segments(docs, seq_len - 3), seq_len, short_seq_prob, rng, cls, sep)
    else:
        pieces, table = packed(docs, seq_len, cls, sep)
    dtype = arrays["tokens"].dtype
    tokens = np.concatenate(pieces).astype(dtype) if pieces else np.zeros(0, dtype)
    return tokens, np.array(table, dtype=np.int32).reshape(-1, 3)
