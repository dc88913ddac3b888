"""Gated BERT for EarlyBERT pre-training and fine-tuning, in one file.

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
`modeling_bert.py`, so standard BERT checkpoints load with `from_pretrained`, and so do the heads:
EarlyBertForPreTraining, ForMaskedLM, ForSequenceClassification, ForQuestionAnswering and
ForTokenClassification compute what transformers' BertFor* classes compute (same weights, same
losses, same output fields and tuples) with the gates at 1.

Outputs: transformers' fields first (`loss` where labels are given, the logits, `hidden_states`,
`attentions`), then EarlyBERT's: `task_loss` (the loss without the gate penalty), `gate_penalty`
(only with `gate_lambdas`) and `gate_l1` = (sum |c_head|, sum |c_ffn|) over all layers (only with gates:
a model without gates returns what transformers' BERT returns).

This file imports nothing from the project and registers nothing on import: it is shipped as-is next to
exported weights (`trust_remote_code`), so keep it self-contained. `from pipeline import ...` calls
`register_auto_classes()` to register the classes with transformers' Auto classes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from importlib import metadata

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
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
# EarlyBERT's output fields, which transformers' Trainer must not take for predictions.
EXTRA_OUTPUTS = [
    "task_loss",
    "mlm_loss",
    "nsp_loss",
    "gate_penalty",
    "gate_l1",
    "mlm_correct",
    "mlm_count",
    "token_count",
    "token_pairs",
]


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

    Training-efficiency options: they change speed and memory, not the losses and gradients (equal in fp32;
    with dropout, `unpad` draws other masks of the same distribution), and travel with the config through
    pruning, engine rebuilds and exports:
    unpad                     drop the padding tokens before the encoder and restore them after: every
                              per-token layer runs on the real tokens only (outputs at the padding are 0),
                              attention runs per sequence
                              (flash-attention's varlen kernel on GPU where installed, else SDPA on the
                              batch re-packed to its longest sequence); question answering stays padded
                              (its span softmax reads the logits of the padding, as transformers')
    activation_checkpointing  recompute each layer's activations in the backward instead of keeping them
                              (what `activation_checkpointing_enable()` / `gradient_checkpointing_enable()` set)
    fused_qkv                 one GEMM for Q, K and V (their weights concatenated at compute time; the
                              parameters stay transformers' query/key/value, so checkpoints and the pruner
                              see the usual names)
    All three default to off, so that a config without them (an existing checkpoint, export or run directory)
    computes what it computed before, bit for bit; run configs turn them on (`model.overrides`).
    """

    model_type = "earlybert"
    keys_to_ignore_at_inference = EXTRA_OUTPUTS

    def __init__(
        self,
        num_heads_per_layer: list[int] | None = None,
        intermediate_size_per_layer: list[int] | None = None,
        head_size: int | None = None,
        use_gates: bool = True,
        use_nsp: bool = True,
        unpad: bool = False,
        activation_checkpointing: bool = False,
        fused_qkv: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        layers = self.num_hidden_layers
        self.num_heads_per_layer = list(num_heads_per_layer or [self.num_attention_heads] * layers)
        self.intermediate_size_per_layer = list(intermediate_size_per_layer or [self.intermediate_size] * layers)
        self.head_size = int(head_size or self.hidden_size // self.num_attention_heads)
        self.use_gates = bool(use_gates)
        self.use_nsp = bool(use_nsp)
        self.unpad = bool(unpad)
        self.activation_checkpointing = bool(activation_checkpointing)
        self.fused_qkv = bool(fused_qkv)
        for name in ("num_heads_per_layer", "intermediate_size_per_layer"):
            values = getattr(self, name)
            if len(values) != layers or any(int(v) < 1 for v in values):
                raise ValueError(
                    f"EarlyBertConfig.{name} must list {layers} positive sizes (one per layer), got {values}"
                )

    @classmethod
    def get_config_dict(cls, *args, **kwargs):
        # A `config.json` of model_type "bert" is an EarlyBERT config too: transformers' BERT checkpoints, and
        # pruned exports (which say "bert" so that AutoConfig and AutoTokenizer read them without remote code).
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        if config_dict.get("model_type") == "bert":
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs

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


GateL1 = tuple[torch.Tensor, torch.Tensor]


@dataclass
class EarlyBertModelOutput(ModelOutput):
    """transformers' BaseModelOutputWithPooling, plus gate_l1 (None without gates)."""

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    gate_l1: GateL1 | None = None


@dataclass
class EarlyBertForPreTrainingOutput(ModelOutput):
    """transformers' BertForPreTrainingOutput, then EarlyBERT's fields.

    loss = task_loss (+ gate_penalty), task_loss = mlm_loss (+ nsp_loss). prediction_logits are (B, T, V), or
    (N_masked, V) with `masked_logits_only=True` and labels. mlm_correct / mlm_count: masked tokens predicted
    right / masked tokens (with labels). token_count / token_pairs: real tokens / query-key pairs inside the
    sequences, the sum of their squared lengths (with labels): what the model FLOPs of a step count
    (pipeline/run/metrics.py model_flops), summed on the device so that logging them never waits for it."""

    loss: torch.Tensor | None = None
    prediction_logits: torch.Tensor | None = None
    seq_relationship_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    task_loss: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    nsp_loss: torch.Tensor | None = None
    gate_penalty: torch.Tensor | None = None
    gate_l1: GateL1 | None = None
    mlm_correct: torch.Tensor | None = None
    mlm_count: torch.Tensor | None = None
    token_count: torch.Tensor | None = None
    token_pairs: torch.Tensor | None = None


@dataclass
class EarlyBertTaskOutput(ModelOutput):
    """transformers' SequenceClassifierOutput / TokenClassifierOutput / MaskedLMOutput, then EarlyBERT's fields.
    loss = task_loss (+ gate_penalty)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    task_loss: torch.Tensor | None = None
    gate_penalty: torch.Tensor | None = None
    gate_l1: GateL1 | None = None


@dataclass
class EarlyBertQuestionAnsweringOutput(ModelOutput):
    """transformers' QuestionAnsweringModelOutput, then EarlyBERT's fields. loss = task_loss (+ gate_penalty)."""

    loss: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    task_loss: torch.Tensor | None = None
    gate_penalty: torch.Tensor | None = None
    gate_l1: GateL1 | None = None


def _l1(gates: nn.Parameter | None) -> torch.Tensor | float:
    return gates.float().abs().sum() if gates is not None else 0.0


def _varlen_kernel():
    """flash-attention's variable-length kernel (q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, dropout_p),
    or None where the package is not installed."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def attention_kernels(config: EarlyBertConfig, device: torch.device, dtype: torch.dtype) -> str:
    """One line for the start of a run: the attention kernel each path of `config`'s model takes on `device` in
    `dtype`. Padded batches go to SDPA with a padding mask, which rules out its flash kernel, or with the `unpad`
    option to flash-attention's varlen kernel where installed (the `gpu` extra), else to SDPA on the batch
    re-packed to its longest sequence; batches without padding (all_real) go mask-free, so SDPA can take flash."""
    if device.type != "cuda":
        return f"attention: SDPA's CPU kernels in {dtype} (no GPU kernels on {device.type})"
    half = dtype in (torch.float16, torch.bfloat16)
    if not config.unpad:
        padded = "SDPA (mem-efficient: a padding mask rules out flash)"
    elif _varlen_kernel() is None:
        padded = "unpadded, SDPA on the re-packed batch (fallback: flash-attn is not installed: earlybert[gpu])"
    elif not half:
        padded = f"unpadded, SDPA on the re-packed batch (fallback: flash-attn takes fp16/bf16, not {dtype})"
    else:  # the version from the package's metadata: an import statement here would make transformers require
        # flash_attn for every export (it checks the imports of the shipped model.py)
        padded = f"unpadded, flash-attn {metadata.version('flash-attn')} (varlen)"
    if half and config.head_size % 8 == 0 and config.head_size <= 256:
        full = "SDPA (flash)"
    else:
        full = "SDPA (mem-efficient: flash needs fp16/bf16 and a head size that is a multiple of 8, at most 256)"
    return f"attention: padded batches -> {padded}; batches without padding -> {full}"


class Unpadded:
    """The real tokens of a padded batch, one after the other (the `unpad` option).

    attention_mask (B, T), 1 = token. Tokens are flattened to (N, ...), N = number of real tokens, in row order,
    so sequence b is tokens cu_seqlens[b]:cu_seqlens[b + 1]. Attention without a varlen kernel runs on the
    sequences re-packed to (B, L, ...), L = the longest sequence, each left-aligned and masked after its length:
    exact for any padding pattern (attention does not depend on where the padding was)."""

    varlen_kernel = staticmethod(_varlen_kernel)

    # the index tensors, moved to the device by `to` (batch, seq_len and max_seqlen are Python ints)
    TENSORS = ("indices", "cu_seqlens", "packed", "packed_mask")

    def __init__(self, attention_mask: torch.Tensor):
        # On a GPU mask, nonzero and max_seqlen wait for the device: the loader builds this on the CPU (BatchLayout).
        mask = attention_mask.bool()  # (B, T)
        self.batch, self.seq_len = mask.shape
        self.indices = mask.flatten().nonzero().squeeze(1)  # (N,) into B * T
        lengths = mask.sum(1)  # (B,)
        self.cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))  # (B + 1,)
        self.max_seqlen = int(lengths.max())
        # (N,) into B * L: row b, column = the token's rank among the row's real tokens
        rank = mask.cumsum(1) - 1  # (B, T)
        self.packed = (self.indices // self.seq_len) * self.max_seqlen + rank.flatten().index_select(0, self.indices)
        positions = torch.arange(self.max_seqlen, device=mask.device)
        self.packed_mask = (positions[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, L)

    def _map(self, fn) -> "Unpadded":
        out = copy.copy(self)
        for name in self.TENSORS:
            setattr(out, name, fn(getattr(self, name)))
        return out

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Unpadded":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Unpadded":
        return self._map(torch.Tensor.pin_memory)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, ...) -> (N, ...)
        return x.flatten(0, 1).index_select(0, self.indices)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        # (N, ...) -> (B, T, ...), zeros at the padding
        out = x.new_zeros(self.batch * self.seq_len, *x.shape[1:]).index_copy(0, self.indices, x)
        return out.view(self.batch, self.seq_len, *x.shape[1:])

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        # q, k, v: (N, H, d) -> context (N, H, d), each token attending to the real tokens of its sequence
        kernel = self.varlen_kernel() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
        if kernel is not None:
            return kernel(q, k, v, self.cu_seqlens, self.cu_seqlens, self.max_seqlen, self.max_seqlen, dropout_p)
        B, L, (_, H, d) = self.batch, self.max_seqlen, q.shape
        q, k, v = (
            x.new_zeros(B * L, H, d).index_copy(0, self.packed, x).view(B, L, H, d).transpose(1, 2) for x in (q, k, v)
        )  # (B, H, L, d)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=self.packed_mask, dropout_p=dropout_p)
        return context.transpose(1, 2).reshape(B * L, H, d).index_select(0, self.packed)  # (N, H, d)


@dataclass
class BatchLayout:
    """What a forward would otherwise read back from the device, computed on the CPU from a batch's attention mask
    and labels (`BatchLayout.of`, in the data loader's thread) and moved with the batch (`to`, non_blocking; pinned
    by `pin_memory`): with it, a training step enqueues its kernels without waiting for the GPU. Optional: without
    it the model computes the same from the tensors (transformers' callers, exports, fine-tuning), with the same
    outputs.

    all_real        no padding in the batch: the encoder runs without a mask (SDPA can take flash attention)
    masked_indices  (N_masked,) flat indices into B * T of the labelled positions (labels != -100), in row order
    unpadded        the `unpad` option's indices (None when all_real)"""

    all_real: bool
    masked_indices: torch.Tensor | None
    unpadded: Unpadded | None

    @classmethod
    def of(cls, attention_mask: torch.Tensor, labels: torch.Tensor | None = None) -> "BatchLayout":
        # attention_mask, labels: (B, T) CPU tensors
        all_real = bool(attention_mask.all())
        masked = None if labels is None else (labels != -100).flatten().nonzero().squeeze(1)
        return cls(all_real, masked, None if all_real else Unpadded(attention_mask))

    def _map(self, tensor_fn, unpadded_fn) -> "BatchLayout":
        return BatchLayout(
            self.all_real,
            None if self.masked_indices is None else tensor_fn(self.masked_indices),
            None if self.unpadded is None else unpadded_fn(self.unpadded),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "BatchLayout":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking), lambda u: u.to(device, non_blocking))

    def pin_memory(self) -> "BatchLayout":
        return self._map(torch.Tensor.pin_memory, Unpadded.pin_memory)


def masked_positions(labels: torch.Tensor, layout: BatchLayout | None) -> torch.Tensor:
    """(N_masked,) flat indices into B * T of the labelled positions: the layout's, or computed here (nonzero
    waits for the device)."""
    if layout is not None and layout.masked_indices is not None:
        return layout.masked_indices
    return (labels != -100).flatten().nonzero().squeeze(1)


class EarlyBertEmbeddings(nn.Module):
    def __init__(self, config: EarlyBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor):
        # input_ids, token_type_ids: (B, T); position_ids: (B, T) or (1, T) -> (B, T, hidden)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(position_ids)
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
        self.fused_qkv = config.fused_qkv
        self.head_gates = nn.Parameter(torch.ones(num_heads)) if config.use_gates else None

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # (..., hidden) -> q, k, v (..., H * d)
        if not self.fused_qkv:
            return self.query(x), self.key(x), self.value(x)
        weight = torch.cat((self.query.weight, self.key.weight, self.value.weight))  # (3 * H * d, hidden)
        bias = torch.cat((self.query.bias, self.key.bias, self.value.bias))  # (3 * H * d,)
        return F.linear(x, weight, bias).chunk(3, dim=-1)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | Unpadded | None, output_attentions: bool):
        # x: (B, T, hidden); attn_mask: (B, 1, 1, T) bool, True = attend, or None (no padding)
        # -> context (B, T, H * d), attention probabilities (B, H, T, T) or None, sum |head gates|
        # Unpadded: x (N, hidden) -> context (N, H * d), no probabilities
        dropout_p = self.dropout_p if self.training else 0.0
        if isinstance(attn_mask, Unpadded):
            q, k, v = (t.view(-1, self.num_heads, self.head_size) for t in self.qkv(x))  # (N, H, d)
            context = attn_mask.attention(q, k, v, dropout_p)  # (N, H, d)
            if self.head_gates is not None:
                context = context * self.head_gates.to(context.dtype)[None, :, None]
            return context.flatten(1), None, _l1(self.head_gates)
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, self.num_heads, self.head_size).transpose(1, 2) for t in self.qkv(x))  # (B, H, T, d)
        probs = None
        if output_attentions:  # the probabilities are asked for: computed explicitly, as transformers' eager attention
            scores = q @ k.transpose(-1, -2) * self.head_size**-0.5  # (B, H, T, T)
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
            probs = F.dropout(scores.softmax(-1), dropout_p)
            context = probs @ v
        else:  # SDPA picks flash / memory-efficient kernels on GPU
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        if self.head_gates is not None:
            context = context * self.head_gates.to(context.dtype)[None, :, None, None]
        return context.transpose(1, 2).reshape(B, T, self.num_heads * self.head_size), probs, _l1(self.head_gates)


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

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, output_attentions: bool):
        context, probs, l1 = self.self(x, attn_mask, output_attentions)
        return self.output(context, x), probs, l1


class EarlyBertIntermediate(nn.Module):
    def __init__(self, config: EarlyBertConfig, width: int):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, width)  # W_1
        self.act = ACT2FN[config.hidden_act]
        self.ffn_gates = nn.Parameter(torch.ones(width)) if config.use_gates else None

    def forward(self, x: torch.Tensor):
        # (B, T, hidden) -> (B, T, width) and sum |FFN gates|
        h = self.act(self.dense(x))
        if self.ffn_gates is not None:
            h = h * self.ffn_gates.to(h.dtype)
        return h, _l1(self.ffn_gates)


class EarlyBertOutput(nn.Module):
    def __init__(self, config: EarlyBertConfig, width: int):
        super().__init__()
        self.dense = nn.Linear(width, config.hidden_size)  # W_2
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class EarlyBertLayer(GradientCheckpointingLayer):
    def __init__(self, config: EarlyBertConfig, layer_idx: int):
        super().__init__()
        heads, width = config.num_heads_per_layer[layer_idx], config.intermediate_size_per_layer[layer_idx]
        self.attention = EarlyBertAttention(config, heads)
        self.intermediate = EarlyBertIntermediate(config, width)
        self.output = EarlyBertOutput(config, width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, output_attentions: bool):
        # (B, T, hidden) -> (B, T, hidden), attention probabilities or None, sum |head gates|, sum |FFN gates|
        x, probs, head_l1 = self.attention(x, attn_mask, output_attentions)
        h, ffn_l1 = self.intermediate(x)
        return self.output(h, x), probs, head_l1, ffn_l1


class EarlyBertEncoder(nn.Module):
    def __init__(self, config: EarlyBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(EarlyBertLayer(config, i) for i in range(config.num_hidden_layers))
        self.use_gates = config.use_gates

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, output_attentions: bool, output_hidden_states: bool
    ):
        # x: (B, T, hidden) -> the last layer's output (B, T, hidden); the input and every layer's output
        # (output_hidden_states, else None); every layer's attention probabilities (output_attentions, else
        # None); (sum |head gates|, sum |FFN gates|) over the layers (None without gates)
        hidden_states = (x,) if output_hidden_states else None
        attentions = () if output_attentions else None
        head_l1 = ffn_l1 = 0.0
        for layer in self.layer:
            x, probs, h, f = layer(x, attn_mask, output_attentions)
            head_l1, ffn_l1 = head_l1 + h, ffn_l1 + f
            hidden_states = hidden_states + (x,) if output_hidden_states else None
            attentions = attentions + (probs,) if output_attentions else None
        return x, hidden_states, attentions, (head_l1, ffn_l1) if self.use_gates else None


class EarlyBertPooler(nn.Module):
    def __init__(self, config: EarlyBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))  # the [CLS] token


class EarlyBertPreTrainedModel(PreTrainedModel):
    config_class = EarlyBertConfig
    base_model_prefix = "bert"
    supports_gradient_checkpointing = True

    def post_init(self):
        super().post_init()
        if self.config.activation_checkpointing:  # set in the config: e.g. a pruned model rebuilt from it
            self.activation_checkpointing_enable()

    def _set_gradient_checkpointing(self, enable: bool = True, **kwargs):
        # transformers' switch (activation_checkpointing_enable / _disable and their gradient_checkpointing_*
        # aliases), recorded in the config so that it travels with it
        super()._set_gradient_checkpointing(enable, **kwargs)
        self.config.activation_checkpointing = enable

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
            raise ValueError(
                "EarlyBERT never loads with ignore_mismatched_sizes=True: it would silently re-initialise "
                "pruned weights"
            )
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
        return [
            layer.attention.self.head_gates for layer in self._layers() if layer.attention.self.head_gates is not None
        ]

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

    # ---- outputs -----------------------------------------------------------------------------
    def _return_dict(self, return_dict: bool | None) -> bool:
        return self.config.return_dict if return_dict is None else return_dict

    def _head_output(
        self,
        output_class,
        encoded: EarlyBertModelOutput,
        task_loss: torch.Tensor | None,
        gate_lambdas: tuple[float, float] | None,
        return_dict: bool | None,
        **fields,
    ):
        """What every head returns: `fields` (its logits, ...), the encoder's hidden states and attentions, and
        loss = task_loss + EarlyBERT's L1 penalty on the gates (with gate_lambdas, on a model with gates), as
        `output_class` or, with return_dict=False, its tuple (None fields left out, as in transformers)."""
        gate_l1, penalty = encoded.gate_l1, None
        if gate_lambdas is not None and gate_l1 is not None:
            penalty = gate_lambdas[0] * gate_l1[0] + gate_lambdas[1] * gate_l1[1]
        loss = task_loss + penalty if task_loss is not None and penalty is not None else task_loss
        out = output_class(
            loss=loss,
            **fields,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
            task_loss=task_loss,
            gate_penalty=penalty,
            gate_l1=gate_l1,
        )
        return out if self._return_dict(return_dict) else out.to_tuple()


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

    # With `unpad` the outputs at padding positions are zeros, not what the padded model computes there; a head
    # whose loss reads them (question answering's span softmax, as transformers') sets this and stays padded.
    keep_padding_outputs = False

    def __init__(self, config: EarlyBertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = EarlyBertEmbeddings(config)
        self.encoder = EarlyBertEncoder(config)
        self.pooler = EarlyBertPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        layout: BatchLayout | None = None,
    ) -> EarlyBertModelOutput | tuple:
        """input_ids, attention_mask (1 = token, 0 = padding), token_type_ids, position_ids: (B, T).
        output_attentions computes the attention probabilities explicitly (not with SDPA), only when asked.
        layout: the batch's BatchLayout, on the model's device (optional: computed here where absent)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, T)
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        # Padding mask (B, T) -> (B, 1, 1, T) bool. Without padding pass None, so SDPA can use flash attention.
        # With `unpad` (and no attention probabilities asked for) the encoder gets the real tokens only.
        # The layout, where given, answers both questions without reading the mask back from the device.
        attn_mask = None
        all_real = layout.all_real if layout is not None else attention_mask is None or bool(attention_mask.all())
        if attention_mask is not None and not all_real:
            attn_mask = attention_mask.bool()[:, None, None, :]
            if self.config.unpad and not output_attentions and not self.keep_padding_outputs:
                attn_mask = layout.unpadded if layout is not None else Unpadded(attention_mask)
        if isinstance(attn_mask, Unpadded):
            tokens = (input_ids, token_type_ids, position_ids.expand_as(input_ids))
            x = self.embeddings(*(attn_mask.unpad(t) for t in tokens))  # (N, hidden)
            x, hidden_states, attentions, gate_l1 = self.encoder(x, attn_mask, False, output_hidden_states)
            x = attn_mask.pad(x)  # (B, T, hidden)
            hidden_states = tuple(map(attn_mask.pad, hidden_states)) if output_hidden_states else None
        else:
            x = self.embeddings(input_ids, token_type_ids, position_ids)
            x, hidden_states, attentions, gate_l1 = self.encoder(x, attn_mask, output_attentions, output_hidden_states)
        out = EarlyBertModelOutput(
            last_hidden_state=x,
            pooler_output=self.pooler(x) if self.pooler is not None else None,
            hidden_states=hidden_states,
            attentions=attentions,
            gate_l1=gate_l1,
        )
        return out if self._return_dict(return_dict) else out.to_tuple()


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
        # weight tied to the word embeddings, bias to self.bias (MLM_TIED_WEIGHTS; transformers ties them after
        # loading, and initialises self.bias where a checkpoint has no MLM head)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # (..., hidden) -> (..., vocab)
        return self.decoder(self.transform(hidden))


class EarlyBertOnlyMLMHead(nn.Module):
    def __init__(self, config: EarlyBertConfig):
        super().__init__()
        self.predictions = EarlyBertLMPredictionHead(config)


class EarlyBertPreTrainingHeads(nn.Module):
    def __init__(self, config: EarlyBertConfig):
        super().__init__()
        self.predictions = EarlyBertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2) if config.use_nsp else None


# The MLM decoder's weight is the word embedding matrix; its bias is the head's `bias`.
MLM_TIED_WEIGHTS = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (in fp32) over the labelled positions (labels != -100); 0, not NaN, without any.
    logits (..., V), labels (...): every position, or the masked ones only."""
    count = (labels != -100).sum()
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), reduction="sum") / count.clamp(min=1)


class EarlyBertForPreTraining(EarlyBertPreTrainedModel):
    """Encoder + MLM head (decoder tied to the word embeddings) + optional NSP head."""

    _tied_weights_keys = MLM_TIED_WEIGHTS

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
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        gate_lambdas: tuple[float, float] | None = None,
        masked_logits_only: bool = False,
        layout: BatchLayout | None = None,
    ) -> EarlyBertForPreTrainingOutput | tuple:
        """labels: (B, T), -100 where not masked. next_sentence_label: (B,), negative = no NSP for that row.
        gate_lambdas: (lambda_heads, lambda_ffn) adds EarlyBERT's L1 penalty on the gates to the loss.
        masked_logits_only (with labels): the vocabulary projection runs on the masked positions only, gathered
        before the decoder (~15% of the tokens, where most of the head's cost goes), and prediction_logits are
        (N_masked, V); the loss is the same.
        layout: the batch's BatchLayout (the data loader's, on the model's device): the forward then never waits for
        the device; without it the same is computed here, with the same outputs."""
        encoded = self.bert(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            output_attentions,
            output_hidden_states,
            return_dict=True,
            layout=layout,
        )
        hidden = encoded.last_hidden_state  # (B, T, hidden)
        nsp_logits = None  # (B, 2)
        if self.cls.seq_relationship is not None:
            nsp_logits = self.cls.seq_relationship(encoded.pooler_output)
        if labels is not None and masked_logits_only:
            masked = masked_positions(labels, layout)
            hidden, labels = hidden.flatten(0, 1).index_select(0, masked), labels.flatten().index_select(0, masked)
        prediction_logits = self.cls.predictions(hidden)  # (B, T, V), or (N, V)
        if labels is None:
            return self._head_output(
                EarlyBertForPreTrainingOutput,
                encoded,
                None,
                gate_lambdas,
                return_dict,
                prediction_logits=prediction_logits,
                seq_relationship_logits=nsp_logits,
            )

        mlm_loss = task_loss = masked_lm_loss(prediction_logits, labels)
        nsp_loss = None
        if nsp_logits is not None and next_sentence_label is not None:
            # A sum divided by max(rows with a label, 1): a batch without NSP labels gives 0, not NaN.
            nsp_targets = next_sentence_label.masked_fill(next_sentence_label < 0, -100)
            valid = (nsp_targets >= 0).sum()
            nsp_loss = F.cross_entropy(nsp_logits.float(), nsp_targets, reduction="sum") / valid.clamp(min=1)
            task_loss = mlm_loss + nsp_loss
        with torch.no_grad():  # a label at its row's maximum (argmax's count but for exact ties; 8x faster on CPU)
            target = prediction_logits.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
            correct = ((target >= prediction_logits.amax(-1)) & (labels != -100)).sum()
            B, T = input_ids.shape
            lengths = attention_mask.sum(1) if attention_mask is not None else input_ids.new_full((B,), T)
        return self._head_output(
            EarlyBertForPreTrainingOutput,
            encoded,
            task_loss,
            gate_lambdas,
            return_dict,
            prediction_logits=prediction_logits,
            seq_relationship_logits=nsp_logits,
            mlm_loss=mlm_loss,
            nsp_loss=nsp_loss,
            mlm_correct=correct,
            mlm_count=(labels != -100).sum(),
            token_count=lengths.sum(),
            token_pairs=(lengths * lengths).sum(),
        )


class EarlyBertLogitsModel(EarlyBertPreTrainedModel):
    """The forward shared by the heads with one `logits` output and `labels` (masked LM, sequence and token
    classification): encoder, `_logits`, and `_loss` where labels are given."""

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        gate_lambdas: tuple[float, float] | None = None,
    ) -> EarlyBertTaskOutput | tuple:
        """gate_lambdas: (lambda_heads, lambda_ffn) adds EarlyBERT's L1 penalty on the gates to the loss."""
        encoded = self.bert(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            output_attentions,
            output_hidden_states,
            return_dict=True,
        )
        logits = self._logits(encoded)
        task_loss = None if labels is None else self._loss(logits, labels)
        return self._head_output(EarlyBertTaskOutput, encoded, task_loss, gate_lambdas, return_dict, logits=logits)


class EarlyBertForMaskedLM(EarlyBertLogitsModel):
    """Encoder + MLM head, as transformers' BertForMaskedLM: logits (B, T, V); labels (B, T), -100 = no loss."""

    _tied_weights_keys = MLM_TIED_WEIGHTS

    def __init__(self, config: EarlyBertConfig):
        super().__init__(config)
        self.bert = EarlyBertModel(config, add_pooling_layer=False)
        self.cls = EarlyBertOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings

    def _logits(self, encoded: EarlyBertModelOutput) -> torch.Tensor:
        return self.cls.predictions(encoded.last_hidden_state)  # (B, T, V)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return masked_lm_loss(logits, labels)


def classifier_dropout(config: EarlyBertConfig) -> nn.Dropout:
    return nn.Dropout(config.hidden_dropout_prob if config.classifier_dropout is None else config.classifier_dropout)


class EarlyBertForSequenceClassification(EarlyBertLogitsModel):
    """Encoder + pooler + classifier, as transformers' BertForSequenceClassification: logits (B, num_labels).

    labels (B,): class ids (cross-entropy); floats with num_labels == 1 or problem_type "regression" (MSE);
    (B, num_labels) floats for problem_type "multi_label_classification" (binary cross-entropy). Without
    problem_type it is decided as transformers decides it (from num_labels and the labels' dtype)."""

    def __init__(self, config: EarlyBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = EarlyBertModel(config)
        self.dropout = classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _logits(self, encoded: EarlyBertModelOutput) -> torch.Tensor:
        return self.classifier(self.dropout(encoded.pooler_output))  # (B, num_labels)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        problem = self.config.problem_type
        if problem is None:
            if self.num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "regression" and self.num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze())
        if problem == "regression":
            return F.mse_loss(logits, labels)
        if problem == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits, labels)


class EarlyBertForTokenClassification(EarlyBertLogitsModel):
    """Encoder + per-token classifier, as transformers' BertForTokenClassification: logits (B, T, num_labels);
    labels (B, T), -100 = no loss."""

    def __init__(self, config: EarlyBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = EarlyBertModel(config, add_pooling_layer=False)
        self.dropout = classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _logits(self, encoded: EarlyBertModelOutput) -> torch.Tensor:
        return self.classifier(self.dropout(encoded.last_hidden_state))  # (B, T, num_labels)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))


class EarlyBertForQuestionAnswering(EarlyBertPreTrainedModel):
    """Encoder + span head, as transformers' BertForQuestionAnswering: start_logits, end_logits (B, T)."""

    def __init__(self, config: EarlyBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = EarlyBertModel(config, add_pooling_layer=False)
        self.bert.keep_padding_outputs = True
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        gate_lambdas: tuple[float, float] | None = None,
    ) -> EarlyBertQuestionAnsweringOutput | tuple:
        """start_positions, end_positions: (B,) token indices of the answer span; positions outside the sequence
        are clamped to T and ignored, as in transformers. loss = mean of the start and end cross-entropies.
        gate_lambdas: (lambda_heads, lambda_ffn) adds EarlyBERT's L1 penalty on the gates to the loss."""
        encoded = self.bert(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            output_attentions,
            output_hidden_states,
            return_dict=True,
        )
        logits = self.qa_outputs(encoded.last_hidden_state)  # (B, T, 2)
        start_logits, end_logits = (x.squeeze(-1).contiguous() for x in logits.split(1, dim=-1))  # (B, T) each
        task_loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.shape[1]
            start, end = (p.reshape(-1).clamp(0, ignored) for p in (start_positions, end_positions))
            task_loss = (
                F.cross_entropy(start_logits, start, ignore_index=ignored)
                + F.cross_entropy(end_logits, end, ignore_index=ignored)
            ) / 2
        return self._head_output(
            EarlyBertQuestionAnsweringOutput,
            encoded,
            task_loss,
            gate_lambdas,
            return_dict,
            start_logits=start_logits,
            end_logits=end_logits,
        )


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# transformers' Auto class -> the EarlyBERT class it builds (also the `auto_map` of exports).
AUTO_CLASSES = {
    "AutoModel": EarlyBertModel,
    "AutoModelForPreTraining": EarlyBertForPreTraining,
    "AutoModelForMaskedLM": EarlyBertForMaskedLM,
    "AutoModelForSequenceClassification": EarlyBertForSequenceClassification,
    "AutoModelForQuestionAnswering": EarlyBertForQuestionAnswering,
    "AutoModelForTokenClassification": EarlyBertForTokenClassification,
}


def register_auto_classes() -> None:
    """Make AutoConfig and the Auto model classes know model_type "earlybert"."""
    import transformers

    transformers.AutoConfig.register("earlybert", EarlyBertConfig, exist_ok=True)
    for auto_class, model_class in AUTO_CLASSES.items():
        getattr(transformers, auto_class).register(EarlyBertConfig, model_class, exist_ok=True)
