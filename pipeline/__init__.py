"""EarlyBERT pre-training pipeline: gated BERT, DeepSpeed training, early-bird detection, pruning.

`from pipeline import EarlyBertConfig, EarlyBertForPreTraining, EarlyBertForSequenceClassification, ...`
imports the model (and torch and transformers) on first use only, so `earlybert prep` starts without them;
the classes are registered with transformers' Auto classes at that point.
"""

__all__ = [
    "EarlyBertConfig",
    "EarlyBertModel",
    "EarlyBertForPreTraining",
    "EarlyBertForMaskedLM",
    "EarlyBertForSequenceClassification",
    "EarlyBertForQuestionAnswering",
    "EarlyBertForTokenClassification",
]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    from pipeline import model

    model.register_auto_classes()
    return getattr(model, name)
