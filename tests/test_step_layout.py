"""Issue 19 items 10 and 11: the loader's BatchLayout lets the training forward run without reading anything back
from the device (same outputs as without it), batches without padding drop the mask, and the start-of-run line
names the attention kernels."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.model import BatchLayout, EarlyBertConfig, EarlyBertForPreTraining, attention_kernels
from pipeline.pretrain.loader import PhaseLoader
from tiny import NO_DROPOUT, per_layer_config, spread_gates

ROOT = Path(__file__).resolve().parent.parent


class Shards:
    """What PhaseLoader reads from `earlybert prep` shards: right-padded rows, or full ones (packed sequences)."""

    seq_len, vocab_size = 16, 61
    special_ids = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}

    def __init__(self, padded: bool):
        self.padded = padded

    def __len__(self):
        return 64

    def get_batch(self, indices):
        rows = np.asarray(indices)
        lengths = 5 + rows % 12 if self.padded else np.full(len(rows), self.seq_len)
        real = np.arange(self.seq_len)[None] < lengths[:, None]
        ids = np.where(real, 5 + (rows[:, None] * 7 + np.arange(self.seq_len)) % 56, 0)
        types = (real & (np.arange(self.seq_len)[None] >= lengths[:, None] // 2)).astype(np.int64)
        return {
            "input_ids": ids.astype(np.int64),
            "token_type_ids": types,
            "attention_mask": real.astype(np.int64),
            "next_sentence_label": rows % 2,
        }


def loader_batch(padded: bool) -> dict:
    loader = PhaseLoader(
        Shards(padded),
        seed=3,
        phase=0,
        start_sample=0,
        steps=1,
        micro_batch_size=6,
        grad_accum=1,
        world_size=1,
        rank=0,
        mask_prob=0.15,
        prefetch=1,
        pin_memory=False,
    )
    try:
        return loader.next_step()[0]
    finally:
        loader.close()


def model(**overrides) -> EarlyBertForPreTraining:
    torch.manual_seed(0)
    m = EarlyBertForPreTraining(per_layer_config(**NO_DROPOUT, **overrides)).train()
    spread_gates(m, seed=1)
    return m


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("unpad", [False, True])
def test_the_forward_with_the_loaders_layout_equals_the_forward_without_it(padded, unpad):
    batch = loader_batch(padded)
    layout = batch["layout"]
    assert isinstance(layout, BatchLayout) and layout.all_real == (not padded)
    assert torch.equal(layout.masked_indices, (batch["labels"] != -100).flatten().nonzero().squeeze(1))
    tensors = {k: v for k, v in batch.items() if k != "layout"}
    outputs, grads = [], []
    for given in (None, layout):
        m = model(unpad=unpad)
        out = m(**tensors, gate_lambdas=(1e-3, 1e-4), masked_logits_only=True, layout=given)
        out.loss.backward()
        outputs.append(out)
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    without, with_layout = outputs
    for field in ("loss", "prediction_logits", "seq_relationship_logits", "mlm_correct", "token_count", "token_pairs"):
        torch.testing.assert_close(with_layout[field], without[field], rtol=0, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("unpad", [False, True])
def test_with_the_layout_the_training_forward_never_reads_the_device(unpad):
    """On the meta device every op that needs a tensor's values (.item(), bool(), nonzero, boolean indexing)
    fails: a forward and backward that run there enqueue without a device->host sync on a GPU."""
    batch = loader_batch(padded=True)
    m = model(unpad=unpad).to("meta")
    on_meta = {k: v.to("meta") for k, v in batch.items()}
    out = m(**on_meta, gate_lambdas=(1e-3, 1e-4), masked_logits_only=True)
    out.loss.backward()
    assert out.loss.device.type == "meta"
    without = {k: v for k, v in on_meta.items() if k != "layout"}
    with pytest.raises((RuntimeError, NotImplementedError)):  # the proof bites: without the layout it reads back
        m(**without, masked_logits_only=True)


def test_a_batch_without_padding_drops_the_mask_so_sdpa_can_take_flash(monkeypatch):
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    batch = loader_batch(padded=False)
    model().to("meta")(**{k: v.to("meta") for k, v in batch.items()}, masked_logits_only=True)
    assert masks == [None] * 3  # every layer, mask-free
    masks.clear()
    model().to("meta")(**{k: v.to("meta") for k, v in loader_batch(padded=True).items()}, masked_logits_only=True)
    assert len(masks) == 3 and all(m is not None for m in masks)


def test_the_start_of_run_line_names_each_paths_kernel(monkeypatch):
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    bert_base = EarlyBertConfig.from_preset("bert-base")
    line = attention_kernels(bert_base, cuda, bf16)
    assert line == (
        "attention: padded batches -> SDPA (mem-efficient: a padding mask rules out flash); "
        "batches without padding -> SDPA (flash)"
    )
    monkeypatch.setattr("pipeline.model._varlen_kernel", lambda: None)
    unpad = EarlyBertConfig.from_preset("bert-base", unpad=True)
    assert "fallback: flash-attn is not installed: earlybert[gpu]" in attention_kernels(unpad, cuda, bf16)
    monkeypatch.setattr("pipeline.model._varlen_kernel", lambda: object())
    assert "fallback: flash-attn takes fp16/bf16" in attention_kernels(unpad, cuda, torch.float32)
    assert "no GPU kernels on cpu" in attention_kernels(unpad, torch.device("cpu"), torch.float32)


def test_the_gpu_extra_installs_flash_attention():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("flash-attn") for req in extras["gpu"])
