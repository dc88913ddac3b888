"""EarlyBERT pre-training pipeline: gated BERT, DeepSpeed training, early-bird detection, pruning."""
from pipeline.model import EarlyBertConfig, EarlyBertForPreTraining, EarlyBertModel

__all__ = ["EarlyBertConfig", "EarlyBertModel", "EarlyBertForPreTraining"]
