"""Gated BERT for EarlyBERT pre-training, in one file.

Original post-LayerNorm BERT (Devlin et al.) with two kinds of learnable gates (EarlyBERT, Chen et al.
2021), both initialised to 1.0:
  - one scalar per attention head, scaling that head's context output (B, H, T, d) before the
    head merge and W_O. This equals the official code's scaling of the post-softmax attention
    probabilities, and it leaves the attention itself to torch SDPA (flash attention on GPU);
  - one scalar per FFN neuron, scaling the post-GELU activation before the second dense layer.
The L1 norm of the gates is the search-stage penalty. Each gated module computes the L1 of its own
gates inside its forward: under ZeRO-3 a parameter is only materialised while its owner runs, so
the penalty cannot be computed from outside. `forward(..., gate_lambdas=(l_heads, l_ffn))` adds it
to the loss; `gate_penalty()` computes the same from materialised parameters.

Every layer has its own head count and FFN width (`num_heads_per_layer`, `intermediate_size_per_layer`)
so that any pruned structure is a plain config. Module and parameter names follow transformers'
`modeling_bert.py`, so standard BERT checkpoints load with `from_pretrained`.

This file imports nothing from the project and registers nothing on import: it is shipped as-is next to
exported weights (`trust_remote_code`), so keep it self-contained. `from pipeline import ...` calls
`register_auto_classes()` to register the classes with transformers' Auto classes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

# name -> (layers, hidden, heads, ffn). bert-base/large as Devlin et al.; the small ones follow
# Turc et al. (2019) and exist for CPU tests and the demo.
PRESETS = {
    "bert-large": (24, 1024, 16, 4096),
    "bert-base": (12, 768, 12, 3072),
    "bert-medium": (8, 512, 8, 2048),
    "bert-small": (4, 512, 8, 2048),
    "bert-mini": (4, 256, 4, 1024),
    "bert-tiny": (2, 64, 4, 256),
}


class EarlyBertConfig(BertConfig):
    """`BertConfig` plus a per-layer structure.

    num_heads_per_layer[i]          attention heads of layer i (>= 1)
    intermediate_size_per_layer[i]  FFN width of layer i (>= 1)
    head_size                       size of one head; hidden_size need not equal heads * head_size
                                    once heads are pruned
    use_gates                       False gives plain BERT (no gate parameters)
    use_nsp                         build the next-sentence head (and the pooler it needs)
    Missing per-layer fields are filled from the uniform BERT fields, so a standard BERT
    `config.json` loads as is.
    """

    model_type = "earlybert"

    def __init__(
        self,
        num_heads_per_layer: list[int] | None = None,
        intermediate_size_per_layer: list[int] | None = None,
        head_size: int | None = None,
        use_gates: bool = True,
        use_nsp: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        layers = self.num_hidden_layers
        self.num_heads_per_layer = list(num_heads_per_layer or [self.num_attention_heads] * layers)
        self.intermediate_size_per_layer = list(intermediate_size_per_layer or [self.intermediate_size] * layers)
        self.head_size = int(head_size or self.hidden_size // self.num_attention_heads)
        self.use_gates = bool(use_gates)
        self.use_nsp = bool(use_nsp)
        for name in ("num_heads_per_layer", "intermediate_size_per_layer"):
            values = getattr(self, name)
            if len(values) != layers or any(int(v) < 1 for v in values):
                raise ValueError(
                    f"EarlyBertConfig.{name} must list {layers} positive sizes (one per layer), got {values}"
                )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "EarlyBertConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        layers, hidden, heads, ffn = PRESETS[name]
        fields = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, intermediate_size=ffn)
        return cls(**{**fields, **overrides})

    @property
    def is_uniform(self) -> bool:
        """True when the structure is plain BERT's (same heads and FFN width in every layer)."""
        return (
            set(self.num_heads_per_layer) == {self.num_attention_heads}
            and set(self.intermediate_size_per_layer) == {self.intermediate_size}
            and self.head_size * self.num_attention_heads == self.hidden_size
        )


@dataclass
class EarlyBertPreTrainingOutput(ModelOutput):
    """loss = mlm_loss (+ nsp_loss) (+ gate_penalty). mlm_logits are (N_masked, V) when labels are given, else (B, T, V).
    gate_l1 = (sum |c_head|, sum |c_ffn|) over all layers (zeros without gates)."""

    loss: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    nsp_loss: torch.Tensor | None = None
    gate_penalty: torch.Tensor | None = None
    gate_l1: tuple[torch.Tensor, torch.Tensor] | None = None
    mlm_logits: torch.Tensor | None = None
    nsp_logits: torch.Tensor | None = None
    mlm_correct: torch.Tensor | None = None
    mlm_count: torch.Tensor | None = None


@dataclass
class EarlyBertModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    gate_l1: tuple[torch.Tensor, torch.Tensor] | None = None


def _l1(gates: nn.Parameter | None, like: torch.Tensor) -> torch.Tensor:
    return gates.float().abs().sum() if gates is not None else like.new_zeros((), dtype=torch.float32)


class EarlyBertEmbeddings(nn.Module):
    def __init__(self, config: EarlyBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        # input_ids, token_type_ids: (B, T) -> (B, T, hidden)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(positions)[None]
        return self.dropout(self.LayerNorm(x))


class EarlyBertSelfAttention(nn.Module):
    def __init__(self, config: EarlyBertConfig, num_heads: int):
        super().__init__()
        self.num_heads, self.head_size = num_heads, config.head_size
        inner = num_heads * config.head_size
        self.query = nn.Linear(config.hidden_size, inner)
        self.key = nn.Linear(config.hidden_size, inner)
        self.value = nn.Linear(config.hidden_size, inner)
        self.dropout_p = config.attention_probs_dropout_prob
        self.head_gates = nn.Parameter(torch.ones(num_heads)) if config.use_gates else None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (B, T, hidden); attn_mask: (B, 1, 1, T) bool, True = attend, or None (no padding)
        # -> context (B, T, H * d) and sum |head gates|
        B, T, _ = x.shape
        q, k, v = (proj(x).view(B, T, self.num_heads, self.head_size).transpose(1, 2) for proj in (self.query, self.key, self.value))
        # (B, H, T, d): SDPA picks flash / memory-efficient kernels on GPU
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout_p if self.training else 0.0
        )
        if self.head_gates is not None:
            context = context * self.head_gates.to(context.dtype)[None, :, None, None]
        return context.transpose(1, 2).reshape(B, T, self.num_heads * self.head_size), _l1(self.head_gates, x)


class EarlyBertSelfOutput(nn.Module):
    def __init__(self, config: EarlyBertConfig, num_heads: int):
        super().__init__()
        self.dense = nn.Linear(num_heads * config.head_size, config.hidden_size)  # W_O
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(context)) + residual)


class EarlyBertAttention(nn.Module):
    def __init__(self, config: EarlyBertConfig, num_heads: int):
        super().__init__()
        self.self = EarlyBertSelfAttention(config, num_heads)
        self.output = EarlyBertSelfOutput(config, num_heads)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        context, l1 = self.self(x, attn_mask)
        return self.output(context, x), l1


class EarlyBertIntermediate(nn.Module):
    def __init__(self, config: EarlyBertConfig, width: int):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, width)  # W_1
        self.act = ACT2FN[config.hidden_act]
        self.ffn_gates = nn.Parameter(torch.ones(width)) if config.use_gates else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (B, T, hidden) -> (B, T, width) and sum |FFN gates|
        h = self.act(self.dense(x))
        if self.ffn_gates is not None:
            h = h * self.ffn_gates.to(h.dtype)
        return h, _l1(self.ffn_gates, x)


class EarlyBertOutput(nn.Module):
    def __init__(self, config: EarlyBertConfig, width: int):
        super().__init__()
        self.dense = nn.Linear(width, config.hidden_size)  # W_2
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class EarlyBertLayer(nn.Module):
    def __init__(self, config: EarlyBertConfig, layer_idx: int):
        super().__init__()
        heads, width = config.num_heads_per_layer[layer_idx], config.intermediate_size_per_layer[layer_idx]
        self.attention = EarlyBertAttention(config, heads)
        self.intermediate = EarlyBertIntermediate(config, width)
        self.output = EarlyBertOutput(config, width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, head_l1 = self.attention(x, attn_mask)
        h, ffn_l1 = self.intermediate(x)
        return self.output(h, x), head_l1, ffn_l1


class EarlyBertEncoder(nn.Module):
    def __init__(self, config: EarlyBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(EarlyBertLayer(config, i) for i in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        head_l1 = ffn_l1 = 0.0
        for layer in self.layer:
            x, h, f = layer(x, attn_mask)
            head_l1, ffn_l1 = head_l1 + h, ffn_l1 + f
        return x, (head_l1, ffn_l1)


class EarlyBertPooler(nn.Module):
    def __init__(self, config: EarlyBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))  # the [CLS] token


class EarlyBertPreTrainedModel(PreTrainedModel):
    config_class = EarlyBertConfig
    base_model_prefix = "bert"
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        super()._init_weights(module)  # normal(0, initializer_range) for Linear/Embedding, LayerNorm to (1, 0)
        if isinstance(module, EarlyBertSelfAttention) and module.head_gates is not None:
            with torch.no_grad():
                module.head_gates.fill_(1.0)
        elif isinstance(module, EarlyBertIntermediate) and module.ffn_gates is not None:
            with torch.no_grad():
                module.ffn_gates.fill_(1.0)
        elif isinstance(module, EarlyBertLMPredictionHead):
            with torch.no_grad():
                module.bias.zero_()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        # A pruned checkpoint loaded into the wrong structure must fail loudly, never re-initialise.
        if kwargs.get("ignore_mismatched_sizes"):
            raise ValueError("EarlyBERT never loads with ignore_mismatched_sizes=True: it would silently re-initialise pruned weights")
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except RuntimeError as err:
            if "ignore_mismatched_sizes" not in str(err):
                raise
            config = kwargs.get("config") or cls.config_class.from_pretrained(pretrained_model_name_or_path)
            raise ValueError(describe_shape_mismatch(cls, config, pretrained_model_name_or_path)) from None

    # ---- gates -------------------------------------------------------------------------------
    def head_gates(self) -> list[nn.Parameter]:
        """One (num_heads_i,) tensor per layer; empty when the model has no gates."""
        return [layer.attention.self.head_gates for layer in self._layers() if layer.attention.self.head_gates is not None]

    def ffn_gates(self) -> list[nn.Parameter]:
        """One (intermediate_size_i,) tensor per layer; empty when the model has no gates."""
        return [layer.intermediate.ffn_gates for layer in self._layers() if layer.intermediate.ffn_gates is not None]

    def gate_penalty(self, lambda_heads: float, lambda_ffn: float) -> torch.Tensor:
        """EarlyBERT's search-stage penalty: lambda_heads * sum|c_head| + lambda_ffn * sum|c_ffn| (sums, not means).

        Reads the gate parameters directly, so it is wrong under DeepSpeed ZeRO-3 (parameters are
        partitioned outside forward). Training code passes `gate_lambdas=(lambda_heads, lambda_ffn)`
        to `forward` instead, which adds the same penalty to `loss` (and reports it as `gate_penalty`).
        """
        heads, ffn = self.head_gates(), self.ffn_gates()
        if not heads:
            return torch.zeros((), device=self.device)
        l1_heads = sum(g.abs().sum() for g in heads)
        l1_ffn = sum(g.abs().sum() for g in ffn)
        return lambda_heads * l1_heads + lambda_ffn * l1_ffn

    def _layers(self):
        return getattr(self, self.base_model_prefix, self).encoder.layer


def checkpoint_shapes(directory: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape for the weights in a checkpoint directory, read without loading them."""
    import glob
    import os

    from safetensors import safe_open

    shapes = {}
    for file in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        with safe_open(file, framework="pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    for file in sorted(glob.glob(os.path.join(directory, "*.bin"))):
        state = torch.load(file, map_location="meta", weights_only=True, mmap=True)
        shapes.update({k: tuple(v.shape) for k, v in state.items()})
    return shapes


def describe_shape_mismatch(model_class, config: "EarlyBertConfig", directory: str) -> str:
    """Name every weight whose checkpoint shape differs from the shape the config builds."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in model_class(config).state_dict().items()}
    prefix = model_class.base_model_prefix + "."
    lines = []
    for name, shape in checkpoint_shapes(directory).items():
        # A base-model checkpoint has no "bert." prefix; a head model's has it: match either way.
        key = next((k for k in (name, prefix + name, name.removeprefix(prefix)) if k in expected), None)
        if key in expected and expected[key] != shape:
            lines.append(f"  {key}: checkpoint {shape}, config {expected[key]}")
    return (
        f"the weights in {directory} do not fit the model structure of the config "
        f"(heads per layer {config.num_heads_per_layer}, FFN widths {config.intermediate_size_per_layer}):\n"
        + "\n".join(lines)
        + "\nload with the config saved beside those weights (a pruned checkpoint needs its own per-layer structure)"
    )


class EarlyBertModel(EarlyBertPreTrainedModel):
    """The encoder: embeddings, layers, optional pooler. Outputs equal transformers' BertModel with gates at 1."""

    def __init__(self, config: EarlyBertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = EarlyBertEmbeddings(config)
        self.encoder = EarlyBertEncoder(config)
        self.pooler = EarlyBertPooler(config) if add_pooling_layer else None
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **_,
    ) -> EarlyBertModelOutput:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        # Padding mask (B, T) -> (B, 1, 1, T) bool. Without padding pass None, so SDPA can use flash attention.
        attn_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            attn_mask = attention_mask.bool()[:, None, None, :]
        x, gate_l1 = self.encoder(x, attn_mask)
        pooled = self.pooler(x) if self.pooler is not None else None
        return EarlyBertModelOutput(last_hidden_state=x, pooler_output=pooled, gate_l1=gate_l1)


class EarlyBertPredictionHeadTransform(nn.Module):
    def __init__(self, config: EarlyBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(hidden)))


class EarlyBertLMPredictionHead(nn.Module):
    def __init__(self, config: EarlyBertConfig):
        super().__init__()
        self.transform = EarlyBertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)  # weight tied to word embeddings
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # (..., hidden) -> (..., vocab)
        return self.decoder(self.transform(hidden))


class EarlyBertPreTrainingHeads(nn.Module):
    def __init__(self, config: EarlyBertConfig):
        super().__init__()
        self.predictions = EarlyBertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2) if config.use_nsp else None


class EarlyBertForPreTraining(EarlyBertPreTrainedModel):
    """Encoder + MLM head (decoder tied to the word embeddings) + optional NSP head.

    The MLM decoder runs on the masked positions only (labels != -100), gathered before the
    vocabulary projection: ~15% of the tokens, which is where most of the head's cost goes.
    """

    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: EarlyBertConfig):
        super().__init__(config)
        self.bert = EarlyBertModel(config, add_pooling_layer=config.use_nsp)
        self.cls = EarlyBertPreTrainingHeads(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
        gate_lambdas: tuple[float, float] | None = None,
        **_,
    ) -> EarlyBertPreTrainingOutput:
        """labels: (B, T), -100 where not masked. next_sentence_label: (B,), negative = no NSP for that row.
        gate_lambdas: (lambda_heads, lambda_ffn) adds EarlyBERT's L1 penalty on the gates to the loss."""
        encoded = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        hidden = encoded.last_hidden_state  # (B, T, hidden)
        nsp_logits = self.cls.seq_relationship(encoded.pooler_output) if self.cls.seq_relationship is not None else None

        gate_l1 = encoded.gate_l1
        if labels is None:
            return EarlyBertPreTrainingOutput(mlm_logits=self.cls.predictions(hidden), nsp_logits=nsp_logits, gate_l1=gate_l1)

        masked = labels != -100  # (B, T)
        targets = labels[masked]  # (N,)
        mlm_logits = self.cls.predictions(hidden[masked])  # (N, V): the decoder only sees masked tokens
        count = targets.numel()
        # A sum divided by max(N, 1): a batch with no masked token gives 0, not NaN.
        mlm_loss = F.cross_entropy(mlm_logits.float(), targets, reduction="sum") / max(count, 1)
        loss, nsp_loss = mlm_loss, None
        if nsp_logits is not None and next_sentence_label is not None:
            nsp_targets = next_sentence_label.masked_fill(next_sentence_label < 0, -100)
            valid = int((nsp_targets >= 0).sum())
            nsp_loss = F.cross_entropy(nsp_logits.float(), nsp_targets, ignore_index=-100, reduction="sum") / max(valid, 1)
            loss = loss + nsp_loss
        penalty = None
        if gate_lambdas is not None:
            penalty = gate_lambdas[0] * gate_l1[0] + gate_lambdas[1] * gate_l1[1]
            loss = loss + penalty
        with torch.no_grad():
            correct = (mlm_logits.argmax(-1) == targets).sum()
        return EarlyBertPreTrainingOutput(
            loss=loss,
            mlm_loss=mlm_loss,
            nsp_loss=nsp_loss,
            gate_penalty=penalty,
            gate_l1=gate_l1,
            mlm_logits=mlm_logits,
            nsp_logits=nsp_logits,
            mlm_correct=correct,
            mlm_count=torch.tensor(count, device=correct.device),
        )


def flops_per_sequence(config: EarlyBertConfig, seq_len: int, masked_fraction: float = 0.15) -> float:
    """Training FLOPs (forward + backward = 3x forward) of one sequence, counting matrix multiplies.

    Per layer and token: Q/K/V and W_O projections, the two attention products (scores and
    weighted values, over seq_len keys), and the two FFN matrices. The MLM head's transform and
    vocabulary projection run on the masked fraction of tokens only; embedding look-ups are free.
    """
    h, d = config.hidden_size, config.head_size
    per_token = 0.0
    for heads, width in zip(config.num_heads_per_layer, config.intermediate_size_per_layer):
        inner = heads * d
        per_token += 2 * h * 3 * inner + 2 * inner * h  # Q, K, V, W_O
        per_token += 2 * 2 * seq_len * inner  # Q K^T and attn V
        per_token += 2 * 2 * h * width  # W_1, W_2
    per_token += masked_fraction * (2 * h * h + 2 * h * config.vocab_size)
    return 3.0 * per_token * seq_len


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())



def register_auto_classes() -> None:
    """Make AutoConfig / AutoModel / AutoModelForPreTraining know model_type "earlybert"."""
    from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

    AutoConfig.register("earlybert", EarlyBertConfig, exist_ok=True)
    AutoModel.register(EarlyBertConfig, EarlyBertModel, exist_ok=True)
    AutoModelForPreTraining.register(EarlyBertConfig, EarlyBertForPreTraining, exist_ok=True)
