"""pipeline/finetune/squad.py: windows and answer positions, span decoding from logits, official SQuAD EM/F1."""

import numpy as np
import pytest
from datasets import Dataset

from pipeline.finetune.squad import (
    exact_match,
    f1,
    normalize_answer,
    postprocess_predictions,
    prepare_train_features,
    prepare_validation_features,
    squad_metrics,
)
from pipeline.finetune.tasks import TaskError

QUESTION = "what is the capital of france?"


def example(qid, context, answer=None, start=None, question=QUESTION):
    """A SQuAD row; the answer's start defaults to where its text first stands in the context."""
    answers = (
        {"text": [answer], "answer_start": [context.index(answer) if start is None else start]}
        if answer
        else {"text": [], "answer_start": []}
    )
    return {"id": qid, "title": "t", "context": context, "question": question, "answers": answers}


def long_example(tokenizer, max_seq_length, qid="long"):
    """A context of three windows (8 tokens apart) whose answer lies past the first window, inside the second."""
    room = max_seq_length - len(tokenizer.tokenize(QUESTION)) - 3
    return example(qid, " ".join(["the"] * (room + 1)) + " so paris is in france." + " the" * 12, "paris")


def answer_text(context, offsets, start, end):
    return context[offsets[start][0] : offsets[end][1]]


# ---- training features ------------------------------------------------------------------------


def test_positions_map_back_to_the_answer(tokenizer):
    context = "Paris is the capital of France. It is on the Seine."
    rows = Dataset.from_list([example("q", context, "France"), example("q2", context, "the Seine", question="where?")])
    features, stats = prepare_train_features(rows, tokenizer, max_seq_length=64, doc_stride=16, max_query_length=16)
    assert (stats.examples, stats.features, stats.skipped_ids, stats.truncated_questions) == (2, 2, [], 0)
    offsets = prepare_validation_features(rows, tokenizer, 64, 16, 16)[0]["offset_mapping"]
    for feature, answer, window_offsets in zip(features, ["France", "the Seine"], offsets):
        assert answer_text(context, window_offsets, feature["start_positions"], feature["end_positions"]) == answer
    assert features.column_names == [
        "input_ids",
        "token_type_ids",
        "attention_mask",
        "start_positions",
        "end_positions",
    ]


def test_answer_in_the_second_window(tokenizer):
    rows = Dataset.from_list([long_example(tokenizer, 32)])
    features, stats = prepare_train_features(rows, tokenizer, max_seq_length=32, doc_stride=8, max_query_length=16)
    valid, _ = prepare_validation_features(rows, tokenizer, max_seq_length=32, doc_stride=8, max_query_length=16)
    assert stats.features == len(valid) >= 3
    positions = list(zip(features["start_positions"], features["end_positions"]))
    assert positions[0] == (0, 0)  # the answer is past the first window: [CLS]
    context = rows[0]["context"]
    assert answer_text(context, valid[1]["offset_mapping"], *positions[1]) == "paris"
    for (start, end), offsets in zip(positions, valid["offset_mapping"]):
        assert (start, end) == (0, 0) or answer_text(context, offsets, start, end) == "paris"
    # doc_stride is the step between window starts, in context tokens
    full = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    full = [tuple(o) for o in full]
    starts = [full.index(tuple(next(o for o in offsets if o is not None))) for offsets in valid["offset_mapping"]]
    assert starts == [8 * i for i in range(len(starts))]
    assert all(len(ids) <= 32 for ids in valid["input_ids"])


def test_mismatched_answers_are_skipped_and_reported(tokenizer):
    context = "Paris is the capital of France."
    rows = Dataset.from_list(
        [example("good", context, "France"), example("bad", context, "France", start=3), example("none", context)]
    )  # unanswerable (v2.0): [CLS]
    features, stats = prepare_train_features(rows, tokenizer, max_seq_length=64, doc_stride=16, max_query_length=16)
    assert stats.skipped_ids == ["bad"] and stats.examples == 2 and len(features) == 2
    assert (features[1]["start_positions"], features[1]["end_positions"]) == (0, 0)


def test_long_questions_are_cut(tokenizer):
    question = "what is the capital of france " * 10
    rows = Dataset.from_list([example("q", "Paris is the capital of France.", "France", question=question)])
    features, stats = prepare_train_features(rows, tokenizer, max_seq_length=64, doc_stride=16, max_query_length=8)
    assert stats.truncated_questions == 1
    assert features[0]["token_type_ids"].count(0) == 8 + 2  # [CLS] question [SEP]


def test_validation_features_keep_ids_and_context_offsets(tokenizer):
    rows = Dataset.from_list([long_example(tokenizer, 32, qid="q7")])
    features, stats = prepare_validation_features(rows, tokenizer, max_seq_length=32, doc_stride=8, max_query_length=16)
    assert set(features["example_id"]) == {"q7"} and stats.features == len(features)
    for ids, types, offsets in zip(features["input_ids"], features["token_type_ids"], features["offset_mapping"]):
        context_tokens = [i for i, t in enumerate(types) if t == 1][:-1]  # the last [SEP] has type 1 too
        assert [i for i, o in enumerate(offsets) if o is not None] == context_tokens
        assert offsets[0] is None and len(offsets) == len(ids)


# ---- post-processing --------------------------------------------------------------------------


def logits_for(features, spans: dict[int, tuple[int, int]], null: float = 0.0):
    """Start/end logits (ragged, one array per feature): 5 at the given span of a feature, `null` at [CLS]."""
    starts, ends = [], []
    for f, ids in enumerate(features["input_ids"]):
        s, e = np.zeros(len(ids)), np.zeros(len(ids))
        s[0] = e[0] = null
        if f in spans:
            s[spans[f][0]] = e[spans[f][1]] = 5.0
        starts.append(s)
        ends.append(e)
    return starts, ends


def test_postprocess_recovers_the_answer(tokenizer):
    rows = Dataset.from_list([long_example(tokenizer, 32)])
    features, _ = prepare_validation_features(rows, tokenizer, max_seq_length=32, doc_stride=8, max_query_length=16)
    train, _ = prepare_train_features(rows, tokenizer, max_seq_length=32, doc_stride=8, max_query_length=16)
    span = (train[1]["start_positions"], train[1]["end_positions"])
    starts, ends = logits_for(features, {1: span})
    assert postprocess_predictions(rows, features, starts, ends) == {"long": "paris"}
    # a span longer than max_answer_length is never chosen: the best short one is
    starts[1][span[0]] = 9.0
    ends[1][span[0] + 3] = 9.0
    assert postprocess_predictions(rows, features, starts, ends, max_answer_length=3) == {"long": "paris"}
    assert postprocess_predictions(rows, features, starts, ends, max_answer_length=4) != {"long": "paris"}


def test_postprocess_no_answer_threshold(tokenizer):
    rows = Dataset.from_list([long_example(tokenizer, 32)])
    features, _ = prepare_validation_features(rows, tokenizer, max_seq_length=32, doc_stride=8, max_query_length=16)
    span = next((i, i) for i, o in enumerate(features[1]["offset_mapping"]) if o is not None)
    starts, ends = logits_for(features, {1: span}, null=6.0)  # null score 12 vs best span 10
    assert postprocess_predictions(rows, features, starts, ends, version_2_with_negative=True) == {"long": ""}
    kept = postprocess_predictions(
        rows, features, starts, ends, version_2_with_negative=True, null_score_diff_threshold=2.5
    )
    assert kept["long"] != ""
    assert postprocess_predictions(rows, features, starts, ends) == kept  # v1.1 always answers


# ---- official evaluation ----------------------------------------------------------------------


def test_normalisation_and_scores():
    assert normalize_answer("  The  Cat!\tsat, on A mat. ") == "cat sat on mat"
    assert exact_match("The Cat!", "cat") == 1 and exact_match("cats", "cat") == 0
    assert f1("the cat sat", "a cat sat down") == pytest.approx(0.8)  # precision 2/2, recall 2/3
    assert f1("the", "an") == 0.0 and f1("the", "an", version_2=True) == 1.0  # both empty once normalised
    assert f1("", "paris", version_2=True) == 0.0


def golds(*texts):
    return {"text": list(texts), "answer_start": [0] * len(texts)}


def test_squad_v1_takes_the_best_gold():
    rows = Dataset.from_dict(
        {"id": ["a", "b"], "answers": [golds("Broncos", "Denver Broncos"), golds("Paris", "the city of Paris")]}
    )
    result = squad_metrics({"a": "Denver Broncos", "b": "in Paris"}, rows)
    # b: "in paris" vs "paris": precision 1/2 recall 1 -> F1 2/3 (vs "city of paris": 0.4)
    assert result == pytest.approx({"exact_match": 50.0, "f1": (100 + 200 / 3) / 2})
    with pytest.raises(TaskError, match="no prediction for 1 of 2 questions"):
        squad_metrics({"a": "Broncos"}, rows)


def test_squad_v2_breakdown():
    rows = Dataset.from_dict(
        {"id": ["a", "b", "c", "d"], "answers": [golds("France"), golds(), golds(), golds("the Seine river")]}
    )
    predictions = {"a": "france", "b": "", "c": "Paris", "d": "Seine"}
    result = squad_metrics(predictions, rows, version_2_with_negative=True)
    assert result == pytest.approx(
        {
            "exact": 50.0,
            "f1": (100 + 100 + 0 + 200 / 3) / 4,
            "total": 4,
            "HasAns_exact": 50.0,
            "HasAns_f1": (100 + 200 / 3) / 2,
            "HasAns_total": 2,
            "NoAns_exact": 50.0,
            "NoAns_f1": 50.0,
            "NoAns_total": 2,
        }
    )
    with pytest.raises(TaskError, match="question 'b' has no gold answer"):
        squad_metrics(predictions, rows)
