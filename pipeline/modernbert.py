"""Gated ModernBERT for EarlyBERT, in one file (issue 23).

ModernBERT (Warner et al. 2024, transformers' modeling_modernbert.py): pre-LayerNorm without biases, fused QKV
(`Wqkv`), rotary position embeddings (theta 160000 on global layers, 10000 on local ones), attention alternating
between a sliding window of `local_attention` tokens (|i - j| <= local_attention // 2) and global attention every
`global_attn_every_n_layers`-th layer (layer 0 is global), a GeGLU FFN (Wi -> input, gate; act(input) * gate -> Wo),
an embedding norm, a final norm and an MLM head (dense + act + norm, decoder tied to the embeddings). MLM only.

EarlyBERT's gates, both initialised to 1.0, as pipeline/model.py has them:
  - one scalar per head (`attn.head_gates`), scaling the head's context before Wo;
  - one scalar per GLU neuron (`mlp.ffn_gates`), scaling act(input) * gate before Wo.
Each gated module computes the L1 of its own gates inside its forward (ZeRO-3 only materialises a parameter while
its owner runs); `forward(..., gate_lambdas=(l_heads, l_ffn))` adds the penalty to the loss. Every layer has its
own head count and GLU width (`num_heads_per_layer`, `intermediate_size_per_layer`), so a pruned model is a plain
config; `prune_model` / `prune_tensors` cut the weights to a ticket.

Module and parameter names are transformers' ModernBERT's, so its checkpoints (ModernBertModel, ForMaskedLM and the
task heads) load with `from_pretrained` (gates set to 1). Output fields are model.py's. This file imports nothing
from the project: an export ships it as remote code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

# name -> (layers, hidden, heads, GLU width). base and large as published; the small ones are for CPU tests.
PRESETS = {
    "modernbert-large": (28, 1024, 16, 2624),
    "modernbert-base": (22, 768, 12, 1152),
    "modernbert-mini": (6, 256, 4, 384),
    "modernbert-tiny": (4, 64, 4, 96),
}
# model.py's EXTRA_OUTPUTS: fields transformers' Trainer must not take for predictions.
EXTRA_OUTPUTS = ["task_loss", "mlm_loss", "nsp_loss", "gate_penalty", "gate_l1", "mlm_correct", "mlm_count",
                 "token_count", "token_pairs", "window_pairs"]  # fmt: skip
GLOBAL, LOCAL = "full_attention", "sliding_attention"  # transformers' layer_types

# ModernBertConfig's fields and defaults (answerdotai/ModernBERT-base), under ModernBertConfig's names.
MODERNBERT_DEFAULTS = dict(
    vocab_size=50368, hidden_size=768, intermediate_size=1152, num_hidden_layers=22, num_attention_heads=12,
    hidden_activation="gelu", max_position_embeddings=8192, initializer_range=0.02, initializer_cutoff_factor=2.0,
    norm_eps=1e-5, norm_bias=False, attention_bias=False, mlp_bias=False, decoder_bias=True,
    attention_dropout=0.0, embedding_dropout=0.0, mlp_dropout=0.0,
    local_attention=128, global_attn_every_n_layers=3, global_rope_theta=160000.0, local_rope_theta=10000.0,
    classifier_pooling="cls", classifier_dropout=0.0, classifier_bias=False, classifier_activation="gelu",
    pad_token_id=50283, bos_token_id=50281, eos_token_id=50282, cls_token_id=50281, sep_token_id=50282,
    tie_word_embeddings=True,
)  # fmt: skip


class EarlyModernBertConfig(PretrainedConfig):
    """ModernBertConfig's fields (MODERNBERT_DEFAULTS) plus EarlyBERT's, as EarlyBertConfig names them:

    num_heads_per_layer[i]          attention heads of layer i (>= 1)
    intermediate_size_per_layer[i]  GLU width of layer i (>= 1): Wi has 2x this many rows
    head_size                       size of one head (hidden_size // num_attention_heads unless given)
    layer_types[i]                  "full_attention" or "sliding_attention" (from global_attn_every_n_layers)
    use_gates                       False gives plain ModernBERT (no gate parameters)
    unpad                           run every per-token layer on the real tokens only and attention per sequence
                                    (on by default: it is how ModernBERT trains); outputs at padding are 0
    activation_checkpointing        recompute each layer's activations in the backward
    """

    model_type = "earlymodernbert"
    keys_to_ignore_at_inference = EXTRA_OUTPUTS

    def __init__(self, num_heads_per_layer: list[int] | None = None,
                 intermediate_size_per_layer: list[int] | None = None, head_size: int | None = None,
                 layer_types: list[str] | None = None, use_gates: bool = True, unpad: bool = True,
                 activation_checkpointing: bool = False, **kwargs):  # fmt: skip
        for name, default in MODERNBERT_DEFAULTS.items():
            setattr(self, name, kwargs.pop(name, default))
        super().__init__(**kwargs)
        layers, every = self.num_hidden_layers, self.global_attn_every_n_layers
        self.layer_types = list(layer_types or [LOCAL if i % every else GLOBAL for i in range(layers)])
        self.num_heads_per_layer = list(num_heads_per_layer or [self.num_attention_heads] * layers)
        self.intermediate_size_per_layer = list(intermediate_size_per_layer or [self.intermediate_size] * layers)
        self.head_size = int(head_size or self.hidden_size // self.num_attention_heads)
        self.use_gates, self.unpad = bool(use_gates), bool(unpad)
        self.activation_checkpointing = bool(activation_checkpointing)
        for name in ("num_heads_per_layer", "intermediate_size_per_layer"):
            values = getattr(self, name)
            if len(values) != layers or any(int(v) < 1 for v in values):
                raise ValueError(f"EarlyModernBertConfig.{name} must list {layers} positive sizes, got {values}")
        if len(self.layer_types) != layers or set(self.layer_types) - {GLOBAL, LOCAL}:
            raise ValueError(f"layer_types must list {layers} of {GLOBAL!r} / {LOCAL!r}, got {self.layer_types}")

    @classmethod
    def get_config_dict(cls, *args, **kwargs):
        # A transformers ModernBERT config.json is one of ours: its rotary thetas are `rope_parameters` per layer
        # type (transformers >= 5) or global_rope_theta / local_rope_theta (4.x, local None = the global one).
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        if config_dict.get("model_type") == "modernbert":
            config_dict = modernbert_config_dict(config_dict)
        return config_dict, kwargs

    @classmethod
    def from_preset(cls, name: str, **overrides) -> EarlyModernBertConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        layers, hidden, heads, width = PRESETS[name]
        fields = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, intermediate_size=width)
        return cls(**{**fields, **overrides})

    @property
    def is_uniform(self) -> bool:
        """True when the structure is ModernBERT's (same heads and GLU width in every layer)."""
        return (
            set(self.num_heads_per_layer) == {self.num_attention_heads}
            and set(self.intermediate_size_per_layer) == {self.intermediate_size}
            and self.head_size * self.num_attention_heads == self.hidden_size
        )

    def rope_theta(self, layer_type: str) -> float:
        local = self.local_rope_theta if self.local_rope_theta is not None else self.global_rope_theta
        return float(local if layer_type == LOCAL else self.global_rope_theta)


def modernbert_config_dict(config_dict: dict) -> dict:
    """transformers' ModernBertConfig dict -> EarlyModernBertConfig's (plain rotary embeddings only)."""
    out = {k: v for k, v in config_dict.items() if k not in ("rope_parameters", "rope_scaling", "sliding_window")}
    out["model_type"] = EarlyModernBertConfig.model_type
    rope = config_dict.get("rope_parameters") or {}
    for layer_type, key in ((GLOBAL, "global_rope_theta"), (LOCAL, "local_rope_theta")):
        params = rope.get(layer_type) or {}
        if params.get("rope_type", "default") != "default" or config_dict.get("rope_scaling"):
            raise ValueError(f"only ModernBERT's default rotary embeddings are supported, got {rope or 'rope_scaling'}")
        if "rope_theta" in params:
            out[key] = params["rope_theta"]
    return out


GateL1 = tuple[torch.Tensor, torch.Tensor]


@dataclass
class EarlyModernBertModelOutput(ModelOutput):
    """transformers' BaseModelOutput plus gate_l1 = (sum |c_head|, sum |c_ffn|) (None without gates)."""

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    gate_l1: GateL1 | None = None


@dataclass
class EarlyModernBertMaskedLMOutput(ModelOutput):
    """transformers' MaskedLMOutput, then model.py's pre-training fields (nsp_loss is always None: MLM only).
    loss = task_loss (+ gate_penalty), task_loss = mlm_loss; logits (B, T, V), or (N_masked, V) with
    masked_logits_only; mlm_correct / mlm_count / token_count / token_pairs as EarlyBertForPreTrainingOutput's;
    window_pairs: the query-key pairs within the sliding window, summed over the sequences (what a local layer's
    attention costs: pipeline/run/metrics.py model_flops)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
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
    window_pairs: torch.Tensor | None = None


@dataclass
class EarlyModernBertTaskOutput(ModelOutput):
    """Sequence / token classification: model.py's EarlyBertTaskOutput."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    task_loss: torch.Tensor | None = None
    gate_penalty: torch.Tensor | None = None
    gate_l1: GateL1 | None = None


@dataclass
class EarlyModernBertQuestionAnsweringOutput(ModelOutput):
    """model.py's EarlyBertQuestionAnsweringOutput."""

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
    """flash-attention's variable-length kernel, or None where the package is not installed."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


class Unpadded:
    """The real tokens of a padded batch, one after the other: the same attributes as model.py's Unpadded, so the
    data loader's BatchLayout serves both families. Sequence b is tokens cu_seqlens[b]:cu_seqlens[b + 1]; without a
    varlen kernel attention runs on the sequences re-packed to (B, L), L = the longest, left-aligned (`packed`)."""

    def __init__(self, attention_mask: torch.Tensor):
        mask = attention_mask.bool()  # (B, T)
        self.batch, self.seq_len = mask.shape
        self.indices = mask.flatten().nonzero().squeeze(1)  # (N,) into B * T
        lengths = mask.sum(1)
        self.cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))  # (B + 1,)
        self.max_seqlen = int(lengths.max())
        rank = mask.cumsum(1) - 1  # a token's rank among its row's real tokens
        self.packed = (self.indices // self.seq_len) * self.max_seqlen + rank.flatten().index_select(0, self.indices)
        positions = torch.arange(self.max_seqlen, device=mask.device)
        self.packed_mask = (positions[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, L)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, ...) -> (N, ...)
        return x.flatten(0, 1).index_select(0, self.indices)

    def pad(self, x: torch.Tensor) -> torch.Tensor:  # (N, ...) -> (B, T, ...), zeros at the padding
        out = x.new_zeros(self.batch * self.seq_len, *x.shape[1:]).index_copy(0, self.indices, x)
        return out.view(self.batch, self.seq_len, *x.shape[1:])


def local_mask(real: torch.Tensor | None, columns: torch.Tensor, half_window: int):
    """The sliding-window mask (B or 1, 1, T, T), True = attend, and `keep` (B, 1, T, 1) or None.

    real (B, T) or None (no padding); columns (B or 1, T): each token's column in the padded batch, so the window is
    transformers' (|column_i - column_j| <= half_window, among real keys). A padding query far from the text has no
    such key: SDPA gives it a zero context (on CPU; NaN in some kernels, which would reach the real tokens through
    the values, 0 * NaN). Here it attends to its window instead, and `keep` zeroes its context: no empty rows."""
    near = (columns[:, :, None] - columns[:, None, :]).abs() <= half_window  # (B, T, T)
    if real is None:
        return near[:, None], None
    allowed = near & real[:, None, :]
    empty = ~allowed.any(-1)  # (B, T)
    return (allowed | (near & empty[:, :, None]))[:, None], (~empty)[:, None, :, None]


def window_pairs(lengths, half_window: int):
    """Query-key pairs with |i - j| <= half_window in a sequence of `lengths` tokens (an int or a tensor of them):
    each of the L queries sees 2k + 1 keys, k = min(L - 1, half_window), less the k(k + 1) beyond the ends."""
    k = lengths.clamp(max=half_window + 1) - 1 if torch.is_tensor(lengths) else min(lengths, half_window + 1) - 1
    return lengths * (2 * k + 1) - k * (k + 1)


@dataclass
class AttentionInputs:
    """What every layer's attention needs, built once per forward: an SDPA mask per layer type (True = attend,
    None = none), the Unpadded tokens (None: padded (B, T) layout), the half window, the local layers' `keep`
    (local_mask's) and whether to use the varlen kernel."""

    masks: dict[str, torch.Tensor | None]
    unpadded: Unpadded | None
    half_window: int
    keep_local: torch.Tensor | None = None
    varlen: bool = False


def rotary(positions: torch.Tensor, theta: float, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (..., 1, dim) for positions (...): transformers' default RoPE (computed in fp32, cast to dtype)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=positions.device) / dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[..., None, :], emb.sin().to(dtype)[..., None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (..., H, d); in fp32 as transformers, which rotates the two halves of each head (rotate_half)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class EarlyModernBertEmbeddings(nn.Module):
    def __init__(self, config: EarlyModernBertConfig):
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.drop = nn.Dropout(config.embedding_dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(self.tok_embeddings(input_ids)))


class EarlyModernBertAttention(nn.Module):
    """Fused QKV, RoPE, global or sliding-window attention, head gates, Wo."""

    def __init__(self, config: EarlyModernBertConfig, layer_idx: int):
        super().__init__()
        self.num_heads, self.head_size = config.num_heads_per_layer[layer_idx], config.head_size
        inner = self.num_heads * self.head_size
        # rows: q of every head, then k, then v (transformers' view(..., 3, H, d))
        self.Wqkv = nn.Linear(config.hidden_size, 3 * inner, bias=config.attention_bias)
        self.Wo = nn.Linear(inner, config.hidden_size, bias=config.attention_bias)
        self.Wo.init_std = "out"
        self.layer_type = config.layer_types[layer_idx]
        self.dropout_p = config.attention_dropout
        self.out_drop = nn.Dropout(config.attention_dropout)
        self.head_gates = nn.Parameter(torch.ones(self.num_heads)) if config.use_gates else None

    def forward(self, x: torch.Tensor, rope, inputs: AttentionInputs, output_attentions: bool):
        # x (B, T, hidden) or, unpadded, (N, hidden) -> (same shape), probabilities (B, H, T, T) or None, sum |gates|
        dropout_p = self.dropout_p if self.training else 0.0
        q, k, v = self.Wqkv(x).view(*x.shape[:-1], 3, self.num_heads, self.head_size).unbind(-3)  # (..., H, d)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        mask, probs = inputs.masks.get(self.layer_type), None
        if inputs.varlen:  # flash-attention on the real tokens; its window counts tokens, = columns without holes
            u, w = inputs.unpadded, inputs.half_window if self.layer_type == LOCAL else -1
            L = u.max_seqlen
            context = _varlen_kernel()(q, k, v, u.cu_seqlens, u.cu_seqlens, L, L, dropout_p, window_size=(w, w))
        elif inputs.unpadded is not None:  # SDPA on the re-packed sequences
            u = inputs.unpadded
            B, L, H, d = u.batch, u.max_seqlen, self.num_heads, self.head_size
            q, k, v = (t.new_zeros(B * L, H, d).index_copy(0, u.packed, t).view(B, L, H, d).transpose(1, 2)
                       for t in (q, k, v))  # fmt: skip
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
            context = context.transpose(1, 2).reshape(B * L, H, d).index_select(0, u.packed)  # (N, H, d)
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, d)
            if output_attentions:  # explicit probabilities, as transformers' eager attention
                scores = q @ k.transpose(-1, -2) * self.head_size**-0.5
                if mask is not None:
                    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
                probs = F.dropout(scores.softmax(-1, dtype=torch.float32).to(q.dtype), dropout_p)
                context = probs @ v
            else:
                context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
            if self.layer_type == LOCAL and inputs.keep_local is not None:
                context = context * inputs.keep_local
            context = context.transpose(1, 2)  # (B, T, H, d)
        if self.head_gates is not None:  # a head's gate scales its context, before Wo mixes the heads
            context = context * self.head_gates.to(context.dtype)[:, None]
        return self.out_drop(self.Wo(context.flatten(-2))), probs, _l1(self.head_gates)


class EarlyModernBertMLP(nn.Module):
    """GeGLU: Wi -> (input, gate), act(input) * gate, neuron gates, Wo."""

    def __init__(self, config: EarlyModernBertConfig, layer_idx: int):
        super().__init__()
        width = config.intermediate_size_per_layer[layer_idx]
        self.Wi = nn.Linear(config.hidden_size, 2 * width, bias=config.mlp_bias)  # rows: input half, gate half
        self.act = ACT2FN[config.hidden_activation]
        self.drop = nn.Dropout(config.mlp_dropout)
        self.Wo = nn.Linear(width, config.hidden_size, bias=config.mlp_bias)
        self.Wo.init_std = "out"
        self.ffn_gates = nn.Parameter(torch.ones(width)) if config.use_gates else None

    def forward(self, x: torch.Tensor):
        inp, gate = self.Wi(x).chunk(2, dim=-1)
        h = self.act(inp) * gate
        if self.ffn_gates is not None:
            h = h * self.ffn_gates.to(h.dtype)
        return self.Wo(self.drop(h)), _l1(self.ffn_gates)


class EarlyModernBertEncoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: EarlyModernBertConfig, layer_idx: int):
        super().__init__()
        # layer 0 reads the embedding norm's output directly (transformers' nn.Identity: no weights)
        norm = lambda: nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.attn_norm = norm() if layer_idx else nn.Identity()
        self.attn = EarlyModernBertAttention(config, layer_idx)
        self.mlp_norm = norm()
        self.mlp = EarlyModernBertMLP(config, layer_idx)

    def forward(self, x: torch.Tensor, rope, inputs: AttentionInputs, output_attentions: bool):
        attn, probs, head_l1 = self.attn(self.attn_norm(x), rope, inputs, output_attentions)
        x = x + attn
        mlp, ffn_l1 = self.mlp(self.mlp_norm(x))
        return x + mlp, probs, head_l1, ffn_l1


class EarlyModernBertPredictionHead(nn.Module):
    def __init__(self, config: EarlyModernBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.classifier_bias)
        self.dense.init_std = "out"
        self.act = ACT2FN[config.classifier_activation]
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(hidden)))


def _init(tensor: torch.Tensor | None, fn) -> None:
    # transformers marks the tensors it loaded (and tied ones): never overwrite those
    if tensor is not None and not getattr(tensor, "_is_hf_initialized", False):
        fn(tensor)


class EarlyModernBertPreTrainedModel(PreTrainedModel):
    config_class = EarlyModernBertConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EarlyModernBertEmbeddings", "EarlyModernBertEncoderLayer"]

    def post_init(self):
        super().post_init()
        if self.config.activation_checkpointing:
            self.activation_checkpointing_enable()

    def _set_gradient_checkpointing(self, enable: bool = True, **kwargs):
        super()._set_gradient_checkpointing(enable, **kwargs)
        self.config.activation_checkpointing = enable  # travels with the config, as model.py's

    @torch.no_grad()
    def _init_weights(self, module):
        # ModernBERT's scheme: truncated normals, std initializer_range for embeddings and input projections, / sqrt(2
        # * layers) for the projections into the residual stream, hidden**-0.5 for classifiers; gates at 1. transformers
        # calls this on the modules that hold parameters themselves, so each Linear carries its role (`init_std`).
        cfg = self.config
        if isinstance(module, (nn.Linear, nn.Embedding)):
            role = getattr(module, "init_std", "in")
            std = cfg.initializer_range / (math.sqrt(2.0 * cfg.num_hidden_layers) if role == "out" else 1.0)
            std = cfg.hidden_size**-0.5 if role == "final" else std
            cut = (cfg.initializer_cutoff_factor or 3.0) * std
            _init(module.weight, lambda w: nn.init.trunc_normal_(w, 0.0, std, -cut, cut))
            _init(getattr(module, "bias", None), nn.init.zeros_)
        elif isinstance(module, nn.LayerNorm):
            _init(module.weight, nn.init.ones_)
            _init(module.bias, nn.init.zeros_)
        for name in ("head_gates", "ffn_gates"):
            _init(getattr(module, name, None), nn.init.ones_)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        if kwargs.get("ignore_mismatched_sizes"):  # as model.py: never re-initialise pruned weights silently
            raise ValueError("EarlyBERT never loads with ignore_mismatched_sizes=True")
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    # ---- gates (model.py's interface) -----------------------------------------------------------
    def _layers(self):
        return getattr(self, self.base_model_prefix, self).layers

    def head_gates(self) -> list[nn.Parameter]:
        """One (num_heads_i,) tensor per layer; empty without gates."""
        return [layer.attn.head_gates for layer in self._layers() if layer.attn.head_gates is not None]

    def ffn_gates(self) -> list[nn.Parameter]:
        """One (intermediate_size_i,) tensor per layer; empty without gates."""
        return [layer.mlp.ffn_gates for layer in self._layers() if layer.mlp.ffn_gates is not None]

    def gate_penalty(self, lambda_heads: float, lambda_ffn: float) -> torch.Tensor:
        """lambda_heads * sum|c_head| + lambda_ffn * sum|c_ffn| from the parameters (not under ZeRO-3: pass
        gate_lambdas to forward there)."""
        heads, ffn = self.head_gates(), self.ffn_gates()
        if not heads:
            return torch.zeros((), device=self.device)
        return lambda_heads * sum(g.abs().sum() for g in heads) + lambda_ffn * sum(g.abs().sum() for g in ffn)

    def _head_output(self, output_class, encoded, task_loss, gate_lambdas, return_dict, **fields):
        """loss = task_loss + the gates' L1 penalty (with gate_lambdas, on a model with gates), as model.py's."""
        gate_l1, penalty = encoded.gate_l1, None
        if gate_lambdas is not None and gate_l1 is not None:
            penalty = gate_lambdas[0] * gate_l1[0] + gate_lambdas[1] * gate_l1[1]
        loss = task_loss + penalty if task_loss is not None and penalty is not None else task_loss
        out = output_class(loss=loss, **fields, hidden_states=encoded.hidden_states, attentions=encoded.attentions,
                           task_loss=task_loss, gate_penalty=penalty, gate_l1=gate_l1)  # fmt: skip
        return out if (self.config.return_dict if return_dict is None else return_dict) else out.to_tuple()


class EarlyModernBertModel(EarlyModernBertPreTrainedModel):
    """Embeddings, layers, final norm. Equals transformers' ModernBertModel with the gates at 1."""

    # With `unpad` the outputs at padding are zeros; a head whose loss reads them (question answering's span
    # softmax, as transformers') sets this and stays padded.
    keep_padding_outputs = False

    def __init__(self, config: EarlyModernBertConfig):
        super().__init__(config)
        self.embeddings = EarlyModernBertEmbeddings(config)
        self.layers = nn.ModuleList(EarlyModernBertEncoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.tok_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.tok_embeddings = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, token_type_ids=None,
                position_ids: torch.Tensor | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None, layout=None):  # fmt: skip
        """input_ids, attention_mask (1 = token), position_ids: (B, T). token_type_ids are accepted so that BERT's
        batches fit, and ignored (ModernBERT has no segments). layout: model.py's BatchLayout (optional)."""
        cfg, (B, T) = self.config, input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None]
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        all_real = layout.all_real if layout is not None else attention_mask is None or bool(attention_mask.all())
        real = None if all_real else attention_mask.bool()  # (B, T)
        u, half = None, cfg.local_attention // 2
        if real is not None and cfg.unpad and not output_attentions and not self.keep_padding_outputs:
            u = layout.unpadded if layout is not None and layout.unpadded is not None else Unpadded(attention_mask)
        if u is None:
            x, positions = self.embeddings(input_ids), position_ids
            columns = torch.arange(T, device=input_ids.device)[None]
            local, keep = local_mask(real, columns, half)
            global_mask = None if real is None else real[:, None, None, :]
            inputs = AttentionInputs({GLOBAL: global_mask, LOCAL: local}, None, half, keep)
        else:
            x, positions = self.embeddings(u.unpad(input_ids)), u.unpad(position_ids.expand(B, T))  # (N, ...)
            varlen = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and _varlen_kernel() is not None
            masks = {}
            if not varlen:  # the packed sequences' masks; a packed slot's column is its token's column
                packed_real = u.packed_mask.view(B, -1)
                columns = torch.zeros(packed_real.numel(), dtype=torch.long, device=x.device)
                columns = columns.index_copy(0, u.packed, u.indices % T).view_as(packed_real)
                masks = {GLOBAL: u.packed_mask, LOCAL: local_mask(packed_real, columns, half)[0]}
            inputs = AttentionInputs(masks, u, half, varlen=varlen)
        ropes = {t: rotary(positions, cfg.rope_theta(t), cfg.head_size, x.dtype) for t in set(cfg.layer_types)}
        hidden_states = (x,) if output_hidden_states else None
        attentions = () if output_attentions else None
        head_l1 = ffn_l1 = 0.0
        for layer, layer_type in zip(self.layers, cfg.layer_types):
            x, probs, h, f = layer(x, ropes[layer_type], inputs, output_attentions)
            head_l1, ffn_l1 = head_l1 + h, ffn_l1 + f
            hidden_states = hidden_states + (x,) if output_hidden_states else None
            attentions = attentions + (probs,) if output_attentions else None
        x = self.final_norm(x)
        if u is not None:
            x = u.pad(x)
            hidden_states = tuple(map(u.pad, hidden_states)) if output_hidden_states else None
        out = EarlyModernBertModelOutput(x, hidden_states, attentions, (head_l1, ffn_l1) if cfg.use_gates else None)
        return out if (cfg.return_dict if return_dict is None else return_dict) else out.to_tuple()


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (fp32) over labels != -100; 0, not NaN, without any (model.py's)."""
    count = (labels != -100).sum()
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), reduction="sum") / count.clamp(min=1)


class EarlyModernBertForMaskedLM(EarlyModernBertPreTrainedModel):
    """Encoder + MLM head (dense + act + norm, decoder tied to the embeddings): transformers' ModernBertForMaskedLM
    with the pre-training outputs of model.py's EarlyBertForPreTraining (MLM only: this is the pre-training model)."""

    _tied_weights_keys = {"decoder.weight": "model.embeddings.tok_embeddings.weight"}

    def __init__(self, config: EarlyModernBertConfig):
        super().__init__(config)
        self.model = EarlyModernBertModel(config)
        self.head = EarlyModernBertPredictionHead(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=config.decoder_bias)
        self.decoder.init_std = "out"
        self.post_init()

    def get_output_embeddings(self):
        return self.decoder

    def set_output_embeddings(self, new_embeddings):
        self.decoder = new_embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, token_type_ids=None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None, next_sentence_label=None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, gate_lambdas: tuple[float, float] | None = None,
                masked_logits_only: bool = False, layout=None) -> EarlyModernBertMaskedLMOutput | tuple:  # fmt: skip
        """labels (B, T), -100 where not masked. next_sentence_label is accepted (BERT's batches) and ignored.
        masked_logits_only (with labels): head and decoder on the masked positions only (transformers'
        sparse_prediction); logits are then (N_masked, V), the loss is the same."""
        encoded = self.model(input_ids, attention_mask, token_type_ids, position_ids, output_attentions,
                             output_hidden_states, return_dict=True, layout=layout)  # fmt: skip
        hidden = encoded.last_hidden_state
        if labels is not None and masked_logits_only:
            masked = layout.masked_indices if layout is not None and layout.masked_indices is not None else None
            masked = (labels != -100).flatten().nonzero().squeeze(1) if masked is None else masked
            hidden, labels = hidden.flatten(0, 1).index_select(0, masked), labels.flatten().index_select(0, masked)
        logits = self.decoder(self.head(hidden))
        if labels is None:
            return self._head_output(EarlyModernBertMaskedLMOutput, encoded, None, gate_lambdas, return_dict,
                                     logits=logits)  # fmt: skip
        mlm_loss = masked_lm_loss(logits, labels)
        with torch.no_grad():  # a label at its row's maximum (argmax's count but for exact ties; 5x faster on CPU)
            target = logits.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
            correct = ((target >= logits.amax(-1)) & (labels != -100)).sum()
            B, T = input_ids.shape
            lengths = attention_mask.sum(1) if attention_mask is not None else input_ids.new_full((B,), T)
        return self._head_output(
            EarlyModernBertMaskedLMOutput, encoded, mlm_loss, gate_lambdas, return_dict, logits=logits,
            mlm_loss=mlm_loss, mlm_correct=correct, mlm_count=(labels != -100).sum(), token_count=lengths.sum(),
            token_pairs=(lengths * lengths).sum(),  # what global attention costs
            window_pairs=window_pairs(lengths, self.config.local_attention // 2).sum(),
        )  # fmt: skip


EarlyModernBertForPreTraining = EarlyModernBertForMaskedLM  # MLM only: the same model


class EarlyModernBertTaskModel(EarlyModernBertPreTrainedModel):
    """ModernBERT's fine-tuning heads: encoder, head (dense + act + norm), dropout, classifier."""

    def __init__(self, config: EarlyModernBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = EarlyModernBertModel(config)
        self.head = EarlyModernBertPredictionHead(config)
        self.drop = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.classifier.init_std = "final"
        self.post_init()

    def _encode(self, input_ids, attention_mask, position_ids, output_attentions, output_hidden_states):
        return self.model(input_ids, attention_mask, None, position_ids, output_attentions, output_hidden_states,
                          return_dict=True)  # fmt: skip

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, token_type_ids=None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, gate_lambdas: tuple[float, float] | None = None):  # fmt: skip
        encoded = self._encode(input_ids, attention_mask, position_ids, output_attentions, output_hidden_states)
        logits = self.classifier(self.drop(self.head(self._pool(encoded.last_hidden_state, attention_mask))))
        task_loss = None if labels is None else self._loss(logits, labels)
        return self._head_output(EarlyModernBertTaskOutput, encoded, task_loss, gate_lambdas, return_dict,
                                 logits=logits)  # fmt: skip


class EarlyModernBertForSequenceClassification(EarlyModernBertTaskModel):
    """transformers' ModernBertForSequenceClassification: the CLS token or the mean of the real tokens
    (classifier_pooling) -> logits (B, num_labels); the loss as model.py's (problem_type as transformers). The CLS
    token is the first real one (as transformers' multiple-choice head takes it; its [:, 0] is padding on the left)."""

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.config.classifier_pooling == "cls":  # the first real token: [:, 0] unless padded on the left
            first = 0 if attention_mask is None else attention_mask.argmax(1)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
        mask = torch.ones(hidden.shape[:2], device=hidden.device) if attention_mask is None else attention_mask
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        problem = self.config.problem_type
        if problem is None:
            if self.num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
        if problem == "regression" and self.num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze())
        if problem == "regression":
            return F.mse_loss(logits, labels)
        if problem == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits, labels)


class EarlyModernBertForTokenClassification(EarlyModernBertTaskModel):
    """transformers' ModernBertForTokenClassification: logits (B, T, num_labels); labels (B, T), -100 = no loss."""

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return hidden

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))


class EarlyModernBertForQuestionAnswering(EarlyModernBertTaskModel):
    """transformers' ModernBertForQuestionAnswering: start_logits, end_logits (B, T). Stays padded (its span
    softmax reads the logits of the padding, as transformers')."""

    def __init__(self, config: EarlyModernBertConfig):
        super().__init__(config)
        self.model.keep_padding_outputs = True

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, token_type_ids=None,
                position_ids: torch.Tensor | None = None, start_positions: torch.Tensor | None = None,
                end_positions: torch.Tensor | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                gate_lambdas: tuple[float, float] | None = None):  # fmt: skip
        """Positions outside the sequence are clamped to T and ignored; loss = mean of the start and end losses."""
        encoded = self._encode(input_ids, attention_mask, position_ids, output_attentions, output_hidden_states)
        logits = self.classifier(self.drop(self.head(encoded.last_hidden_state)))  # (B, T, 2)
        start_logits, end_logits = (x.squeeze(-1).contiguous() for x in logits.split(1, dim=-1))
        task_loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.shape[1]
            start, end = (p.reshape(-1).clamp(0, ignored) for p in (start_positions, end_positions))
            task_loss = (F.cross_entropy(start_logits, start, ignore_index=ignored)
                         + F.cross_entropy(end_logits, end, ignore_index=ignored)) / 2  # fmt: skip
        return self._head_output(EarlyModernBertQuestionAnsweringOutput, encoded, task_loss, gate_lambdas,
                                 return_dict, start_logits=start_logits, end_logits=end_logits)  # fmt: skip


# ---- physical pruning (pipeline/pruner.py's functions, for ModernBERT's fused weights) -------------------------------
@dataclass
class PrunePlan:
    """The kept heads and GLU neurons per layer (original ids), as pipeline/pruner.py's PrunePlan (which serves too)."""

    kept_heads: list[list[int]]
    kept_neurons: list[list[int]]
    head_size: int
    fold_gates: bool


def _rows(units: list[int], size: int, blocks: int, block_size: int, device) -> torch.Tensor:
    # rows of the kept units (each `size` rows) in every one of `blocks` blocks of `block_size` rows
    unit = torch.tensor(units, dtype=torch.long, device=device)
    rows = (unit[:, None] * size + torch.arange(size, device=device)).flatten()
    return torch.cat([b * block_size + rows for b in range(blocks)])


def prune_tensors(tensors: dict[str, torch.Tensor], plan, gates: dict[str, torch.Tensor], power: int = 1):
    """Slice a name -> tensor dict (weights, or an optimizer moment of each) to the plan, as pruner.prune_tensors:
      attn.Wqkv   rows of the kept heads in each of the q, k and v blocks (weight and bias)
      attn.Wo     columns of the kept heads, times their gates if folded
      mlp.Wi      rows of the kept neurons in both GLU halves (input and gate)
      mlp.Wo      columns of the kept neurons, times their gates if folded
      gates       the kept entries, or dropped when folded
    gates: name -> every gate's value (used when plan.fold_gates). power: 1 for weights, -1 / -2 for first / second
    moments (W' = c W gives dL/dW' = g / c). Everything else is unchanged."""
    out, d = {}, plan.head_size
    for name, t in tensors.items():
        prefix, sep, rest = name.partition("layers.")
        layer_id, _, rest = rest.partition(".")
        if not sep or not layer_id.isdigit():
            out[name] = t
            continue
        i, stem = int(layer_id), f"{prefix}layers.{layer_id}."
        heads, neurons = plan.kept_heads[i], plan.kept_neurons[i]
        if rest.startswith("attn.Wqkv."):
            out[name] = t.index_select(0, _rows(heads, d, 3, t.shape[0] // 3, t.device))
        elif rest.startswith("mlp.Wi."):
            out[name] = t.index_select(0, _rows(neurons, 1, 2, t.shape[0] // 2, t.device))
        elif rest in ("attn.Wo.weight", "mlp.Wo.weight"):
            kept, size, gate_name = (heads, d, "attn.head_gates") if rest[0] == "a" else (neurons, 1, "mlp.ffn_gates")
            w = t.index_select(1, _rows(kept, size, 1, 0, t.device))
            if plan.fold_gates and stem + gate_name in gates:  # W[:, cols(u)] *= c_u: exact
                c = gates[stem + gate_name].index_select(0, torch.tensor(kept, device=gates[stem + gate_name].device))
                w = w * c.repeat_interleave(size).to(w.device, w.dtype)[None, :] ** power
            out[name] = w
        elif rest in ("attn.head_gates", "mlp.ffn_gates"):
            if not plan.fold_gates:
                out[name] = t.index_select(0, torch.tensor(heads if rest[0] == "a" else neurons, device=t.device))
        else:
            out[name] = t
    return out


def pruned_config(config: EarlyModernBertConfig, plan) -> EarlyModernBertConfig:
    """The pruned model's config: per-layer sizes from the plan; no gates if they are folded."""
    fields = config.to_dict()
    fields.update(
        num_heads_per_layer=[len(h) for h in plan.kept_heads],
        intermediate_size_per_layer=[len(n) for n in plan.kept_neurons],
        use_gates=config.use_gates and not plan.fold_gates,
    )
    return EarlyModernBertConfig.from_dict(fields)


def prune_model(model: EarlyModernBertPreTrainedModel, kept_heads, kept_neurons, fold_gates: bool = True):
    """A new, smaller model of the same class computing what `model` computes with the removed units' gates at 0;
    returns it and the plan. kept_heads / kept_neurons: per layer, the original ids to keep (sorted)."""
    plan = PrunePlan([sorted(h) for h in kept_heads], [sorted(n) for n in kept_neurons], model.config.head_size,
                     fold_gates)  # fmt: skip
    state = {k: v.detach() for k, v in model.state_dict().items()}
    gates = {k: v.float() for k, v in state.items() if k.endswith(("head_gates", "ffn_gates"))}
    new_model = type(model)(pruned_config(model.config, plan))
    new_model.load_state_dict(prune_tensors(state, plan, gates), strict=True)
    return new_model.to(next(model.parameters()).device), plan


AUTO_CLASSES = {
    "AutoModel": EarlyModernBertModel,
    "AutoModelForPreTraining": EarlyModernBertForMaskedLM,
    "AutoModelForMaskedLM": EarlyModernBertForMaskedLM,
    "AutoModelForSequenceClassification": EarlyModernBertForSequenceClassification,
    "AutoModelForQuestionAnswering": EarlyModernBertForQuestionAnswering,
    "AutoModelForTokenClassification": EarlyModernBertForTokenClassification,
}


def register_auto_classes() -> None:
    """Make AutoConfig and the Auto model classes know model_type "earlymodernbert"."""
    import transformers

    transformers.AutoConfig.register(EarlyModernBertConfig.model_type, EarlyModernBertConfig, exist_ok=True)
    for auto_class, model_class in AUTO_CLASSES.items():
        getattr(transformers, auto_class).register(EarlyModernBertConfig, model_class, exist_ok=True)
