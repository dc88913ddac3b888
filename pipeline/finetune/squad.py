"""SQuAD v1.1 and v2.0: contexts cut into windows, answer spans decoded from logits, official EM and F1.

A context longer than the model's input is cut into overlapping windows (features), each with the whole
question; a training feature's start/end positions point at the answer's tokens, or at [CLS] when the
answer is not inside the window (or the question has none, v2.0). `doc_stride` is the distance between
the starts of two windows, as in BERT's run_squad.py. The fast tokenizer's offset mapping ties every
token to its characters in the context, which is how positions are found for training and how the best
span becomes answer text for evaluation. EM and F1 follow the official evaluation scripts v1.1 and v2.0.

Rows are SQuAD's: id, context, question, answers {text: [...], answer_start: [...]} (pipeline.finetune.tasks.load_task).
"""

from __future__ import annotations

import collections
import re
import string
from dataclasses import dataclass, field

import numpy as np
from datasets import Dataset

from pipeline.finetune.tasks import TaskError

MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")


@dataclass
class QAStats:
    """Counts for the log: what preprocessing did to the examples."""

    examples: int  # examples that were windowed
    features: int  # windows
    truncated_questions: int  # questions cut to max_query_length tokens
    skipped_ids: list[str] = field(default_factory=list)  # training: answer text not at answer_start; left out


# ---- features ---------------------------------------------------------------------------------


def _windows(batch: dict, tokenizer, max_seq_length: int, doc_stride: int, max_query_length: int) -> list[tuple]:
    """Tokenized windows of a batch of examples, in example order: (example index, model inputs, offsets with
    None outside the context, whether this is the first window of an example whose question was cut).

    The tokenizer's own `stride` is the overlap of two windows; it follows from doc_stride and the room the
    question leaves, so examples are tokenized in groups of equal question length.
    """
    questions = [q.lstrip() for q in batch["question"]]  # some SQuAD v2 questions start with many spaces
    question_offsets = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    lengths = [min(len(offsets), max_query_length) for offsets in question_offsets]
    cut = [
        q[: offsets[max_query_length - 1][1]] if len(offsets) > max_query_length else q
        for q, offsets in zip(questions, question_offsets)
    ]
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    windows = collections.defaultdict(list)
    for length in sorted(set(lengths)):
        group = [i for i, n in enumerate(lengths) if n == length]
        room = max_seq_length - length - specials
        if room < 1:
            raise TaskError(
                f"max_seq_length={max_seq_length} leaves no room for the context after a "
                f"{length}-token question; raise max_seq_length or lower max_query_length"
            )
        enc = tokenizer(
            [cut[i] for i in group],
            [batch["context"][i] for i in group],
            truncation="only_second",
            max_length=max_seq_length,
            stride=room - min(doc_stride, room),
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            return_token_type_ids=True,
        )
        for w, j in enumerate(enc["overflow_to_sample_mapping"]):
            offsets = [o if s == 1 else None for o, s in zip(enc["offset_mapping"][w], enc.sequence_ids(w))]
            windows[group[j]].append(({key: enc[key][w] for key in MODEL_INPUTS}, offsets))
    return [
        (i, inputs, offsets, n == 0 and len(question_offsets[i]) > max_query_length)
        for i in sorted(windows)
        for n, (inputs, offsets) in enumerate(windows[i])
    ]


def _featurize(
    examples: Dataset, tokenizer, max_seq_length: int, doc_stride: int, max_query_length: int, columns
) -> tuple[Dataset, QAStats]:
    """Map examples to windows with the model inputs plus `columns(batch, i, offsets)` of each window.

    Truncated questions are counted from a flag column, not inside the map function, so a map result that
    `datasets` loads from its cache reports them too.
    """

    def encode(batch):
        out = collections.defaultdict(list)
        for i, inputs, offsets, truncated in _windows(batch, tokenizer, max_seq_length, doc_stride, max_query_length):
            for key, value in {**inputs, **columns(batch, i, offsets), "question_truncated": truncated}.items():
                out[key].append(value)
        return out

    features = examples.map(encode, batched=True, remove_columns=examples.column_names)
    stats = QAStats(len(examples), len(features), sum(features["question_truncated"]))
    return features.remove_columns("question_truncated"), stats


def _answer_span(offsets: list, start_char: int, end_char: int) -> tuple[int, int]:
    """Token positions of the characters [start_char, end_char) in this window; (0, 0), i.e. [CLS], when the
    window does not hold all of them."""
    context = [t for t, o in enumerate(offsets) if o is not None]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return 0, 0
    start = max(t for t in context if offsets[t][0] <= start_char)
    end = min(t for t in context if offsets[t][1] >= end_char)
    return start, end


def answer_matches(context: str, answers: dict) -> bool:
    """Whether the first answer's text stands in the context at its answer_start (training uses the first)."""
    text, start = answers["text"][0], answers["answer_start"][0]
    return context[start : start + len(text)] == text


def prepare_train_features(
    examples: Dataset, tokenizer, max_seq_length: int, doc_stride: int, max_query_length: int
) -> tuple[Dataset, QAStats]:
    """Training windows with start_positions / end_positions; unanswerable questions point at [CLS] (0).

    An example whose answer text is not at its answer_start in the context is left out and its id is
    reported in stats.skipped_ids; it is found before the map, so a cached map result reports it too.
    """
    skipped = [
        i
        for i, (context, answers) in enumerate(zip(examples["context"], examples["answers"]))
        if answers["text"] and not answer_matches(context, answers)
    ]
    if skipped and len(skipped) == len(examples):  # nothing left to train on: the offsets are not SQuAD's
        raise TaskError(
            f"no training question has its answer text at its answer_start in the context ({len(skipped)} "
            f"questions, e.g. id {examples[skipped[0]]['id']!r}); answer_start is the answer's character offset "
            f"in its context"
        )
    kept = examples.select(sorted(set(range(len(examples))) - set(skipped))) if skipped else examples

    def positions(batch, i, offsets):
        answers = batch["answers"][i]
        if not answers["text"]:
            return {"start_positions": 0, "end_positions": 0}
        start_char = answers["answer_start"][0]
        start, end = _answer_span(offsets, start_char, start_char + len(answers["text"][0]))
        return {"start_positions": start, "end_positions": end}

    features, stats = _featurize(kept, tokenizer, max_seq_length, doc_stride, max_query_length, positions)
    stats.skipped_ids = [examples[i]["id"] for i in skipped]
    return features, stats


def prepare_validation_features(
    examples: Dataset, tokenizer, max_seq_length: int, doc_stride: int, max_query_length: int
) -> tuple[Dataset, QAStats]:
    """Evaluation windows with example_id and offset_mapping (None outside the context) for
    postprocess_predictions; drop those two columns before the forward pass."""
    return _featurize(
        examples,
        tokenizer,
        max_seq_length,
        doc_stride,
        max_query_length,
        lambda batch, i, offsets: {"example_id": batch["id"][i], "offset_mapping": offsets},
    )


# ---- post-processing --------------------------------------------------------------------------


def postprocess_predictions(
    examples: Dataset,
    features: Dataset,
    start_logits,
    end_logits,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2_with_negative: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> dict[str, str]:
    """Answer text per question id from the start/end logits of every window (feature) of the question.

    start_logits[f] and end_logits[f] are feature f's logits, one per token (padding after the feature's
    tokens is ignored). Candidate spans pair the n_best_size best starts with the n_best_size best ends
    of a window, inside the context, at most max_answer_length tokens; the best scores start + end logit.
    SQuAD v2.0: the null score is the lowest [CLS] start + end over the windows, and the answer is empty
    when null score - best span score > null_score_diff_threshold (or no span qualifies).
    """
    by_example = collections.defaultdict(list)
    for f, example_id in enumerate(features["example_id"]):
        by_example[example_id].append(f)
    all_offsets = list(features["offset_mapping"])
    predictions = {}
    for example_id, context in zip(examples["id"], examples["context"]):
        best_score, best_text, null_score = -np.inf, "", np.inf
        for f in by_example[example_id]:
            offsets = all_offsets[f]
            starts = np.asarray(start_logits[f], dtype=np.float64)[: len(offsets)]
            ends = np.asarray(end_logits[f], dtype=np.float64)[: len(offsets)]
            null_score = min(null_score, starts[0] + ends[0])
            for i in np.argsort(starts)[::-1][:n_best_size]:
                for j in np.argsort(ends)[::-1][:n_best_size]:
                    if offsets[i] is None or offsets[j] is None or not 0 <= j - i < max_answer_length:
                        continue
                    if starts[i] + ends[j] > best_score:
                        best_score, best_text = starts[i] + ends[j], context[offsets[i][0] : offsets[j][1]]
        if version_2_with_negative and null_score - best_score > null_score_diff_threshold:
            best_text = ""
        predictions[example_id] = best_text
    return predictions


# ---- official evaluation ----------------------------------------------------------------------

ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse whitespace: the official scripts' order."""
    s = "".join(ch for ch in s.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, gold: str) -> int:
    return int(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str, version_2: bool = False) -> float:
    """Token-overlap F1 of the normalised texts. When either side is empty, v2.0 scores 1 if both are (a
    correct "no answer") and 0 otherwise; v1.1 scores 0."""
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if version_2 and not (pred_tokens and gold_tokens):
        return float(pred_tokens == gold_tokens)
    same = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: dict[str, str], examples, version_2_with_negative: bool = False) -> dict[str, float]:
    """Exact match and F1 in percent, each the max over a question's gold answers, as the official scripts.

    v1.1: {exact_match, f1}. v2.0: {exact, f1, total} and the same for the questions with answers (HasAns_)
    and without (NoAns_); a question's golds are its non-empty answers, or [""] when it has none. Every
    question needs a prediction ("" for no answer).
    """
    rows = list(zip(examples["id"], examples["answers"]))
    missing = [qid for qid, _ in rows if qid not in predictions]
    if missing:
        raise TaskError(f"no prediction for {len(missing)} of {len(rows)} questions (e.g. {missing[0]!r})")
    exact, f1s, has_answer = {}, {}, {}
    for qid, answers in rows:
        if version_2_with_negative:
            golds = [t for t in answers["text"] if normalize_answer(t)] or [""]
        elif answers["text"]:
            golds = answers["text"]
        else:
            raise TaskError(f"question {qid!r} has no gold answer: score SQuAD v2.0 data with version_2_with_negative")
        has_answer[qid] = bool(answers["text"])
        exact[qid] = max(exact_match(predictions[qid], g) for g in golds)
        f1s[qid] = max(f1(predictions[qid], g, version_2_with_negative) for g in golds)
    if not version_2_with_negative:
        return {"exact_match": 100.0 * np.mean(list(exact.values())), "f1": 100.0 * np.mean(list(f1s.values()))}
    result = _summary(exact, f1s, list(exact), "")
    for prefix, wanted in (("HasAns_", True), ("NoAns_", False)):
        qids = [q for q in exact if has_answer[q] == wanted]
        if qids:
            result.update(_summary(exact, f1s, qids, prefix))
    return result


def _summary(exact: dict, f1s: dict, qids: list[str], prefix: str) -> dict[str, float]:
    return {
        f"{prefix}exact": 100.0 * sum(exact[q] for q in qids) / len(qids),
        f"{prefix}f1": 100.0 * sum(f1s[q] for q in qids) / len(qids),
        f"{prefix}total": len(qids),
    }
