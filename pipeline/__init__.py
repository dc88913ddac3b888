"""EarlyBERT pre-training pipeline: gated BERT, DeepSpeed training, early-bird detection, pruning."""
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

from pipeline.model import EarlyBertConfig, EarlyBertForPreTraining, EarlyBertModel

AutoConfig.register("earlybert", EarlyBertConfig, exist_ok=True)
AutoModel.register(EarlyBertConfig, EarlyBertModel, exist_ok=True)
AutoModelForPreTraining.register(EarlyBertConfig, EarlyBertForPreTraining, exist_ok=True)

__all__ = ["EarlyBertConfig", "EarlyBertModel", "EarlyBertForPreTraining"]
