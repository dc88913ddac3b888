"""Distributed sampling and dynamic masking over `earlybert prep` shards.

The data of a phase is one infinite stream: position p is sample `perm_e(p mod N)` of epoch
e = p // N, where perm_e is a keyed pseudorandom permutation of the N samples. An optimizer step
consumes the next `global_batch_size` positions; its micro-step m gives rank r the slice
[(m * ranks + r) * micro, ... + micro). Resuming therefore only needs the number of samples
consumed, whatever the number of ranks before and after: no sample is repeated or skipped.

Masking (15% of the maskable tokens; of those 80% [MASK], 10% a random token, 10% unchanged) is a
counter-based hash of (seed, phase, epoch, sample index, position): the same sample gets the same
mask on any rank count and after any resume, and a new one in each epoch. Both run in numpy
without per-sample Python loops, in a background thread that stays `prefetch` micro-batches ahead.

Each micro-batch also carries its `layout` (pipeline.model.BatchLayout: whether it has padding, the masked
positions, the unpad indices), computed here on the CPU, so that the model's forward never waits for the GPU
to find them.
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import torch

from pipeline.model import BatchLayout

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_FEISTEL_ROUNDS = 6
# Independent hash streams of one token: which tokens are selected, what happens to them, which random id.
_SELECT, _ACTION, _RANDOM_ID = np.uint64(1), np.uint64(2), np.uint64(3)
# Domain tags keep the permutation keys and the masking keys apart for the same (seed, phase, epoch).
_PERMUTATION, _MASKING = 0x5045524D, 0x4D41534B


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijective uint64 hash with good avalanche (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _keys(*words: int, n: int = 1) -> np.ndarray:
    return np.random.SeedSequence(list(words)).generate_state(n, dtype=np.uint64)


class Permutation:
    """A pseudorandom bijection of range(n): a balanced Feistel network on the next even power of two,
    with cycle walking back into range. O(1) memory, so no N-sized shuffle is held or rebuilt per epoch."""

    def __init__(self, n: int, seed: int, phase: int, epoch: int):
        bits = max(2, (n - 1).bit_length())
        bits += bits & 1
        self.n, self.half = n, np.uint64(bits // 2)
        self.mask = np.uint64((1 << (bits // 2)) - 1)
        self.round_keys = _keys(_PERMUTATION, seed, phase, epoch, n=_FEISTEL_ROUNDS)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for k in self.round_keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = self._feistel(np.asarray(x, dtype=np.uint64))
        # The walk from an in-range x returns to range: x's cycle under the bijection contains x.
        out = y >= self.n
        while out.any():
            y[out] = self._feistel(y[out])
            out = y >= self.n
        return y.astype(np.int64)


def stream_samples(positions: np.ndarray, n: int, seed: int, phase: int) -> tuple[np.ndarray, np.ndarray]:
    """(epoch, sample index) of each stream position."""
    epochs, offsets = np.divmod(np.asarray(positions, dtype=np.int64), n)
    indices = np.empty_like(offsets)
    for e in np.unique(epochs):
        at = epochs == e
        indices[at] = Permutation(n, seed, phase, int(e))(offsets[at])
    return epochs, indices


def rank_positions(start: int, micro: int, world: int, rank: int, micro_step: int) -> np.ndarray:
    """Stream positions of rank `rank`'s micro-batch `micro_step` in the step that starts at `start`."""
    first = start + (micro_step * world + rank) * micro
    return np.arange(first, first + micro, dtype=np.int64)


def _uniform(row_keys: np.ndarray, seq_len: int, stream: np.uint64) -> np.ndarray:
    """[B, T] uniforms in [0, 1) from the per-row keys, the token position and a stream id."""
    pos = np.arange(seq_len, dtype=np.uint64)
    h = _mix(row_keys[:, None] ^ _mix(pos * _GOLDEN + stream))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def mask_tokens(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    epochs: np.ndarray,
    indices: np.ndarray,
    *,
    seed: int,
    phase: int,
    mask_prob: float,
    special_ids: dict,
    vocab_size: int,
):
    """BERT's dynamic masking. Returns (masked input_ids, labels with -100 where not selected).

    Each sample gets round(mask_prob * maskable) selections (at least one): the tokens with the
    smallest hash scores among real, non-special tokens.
    """
    epoch_keys = {int(e): _keys(_MASKING, seed, phase, int(e))[0] for e in np.unique(epochs)}
    row_keys = _mix(
        np.array([epoch_keys[int(e)] for e in epochs], dtype=np.uint64) ^ (indices.astype(np.uint64) * _GOLDEN)
    )
    B, T = input_ids.shape
    specials = [special_ids[k] for k in ("cls", "sep", "pad", "mask")]
    maskable = attention_mask.astype(bool) & ~np.isin(input_ids, specials)
    n_select = np.where(maskable.any(1), np.maximum(1, np.floor(mask_prob * maskable.sum(1) + 0.5)), 0).astype(np.int64)
    score = np.where(maskable, _uniform(row_keys, T, _SELECT), 2.0)
    threshold = np.sort(score, axis=1)[np.arange(B), np.maximum(n_select - 1, 0)]
    selected = maskable & (score <= threshold[:, None]) & (n_select > 0)[:, None]

    action = _uniform(row_keys, T, _ACTION)
    replace_ids = np.setdiff1d(np.arange(vocab_size), list(special_ids.values()))
    random_ids = replace_ids[(_uniform(row_keys, T, _RANDOM_ID) * len(replace_ids)).astype(np.int64)]
    masked = input_ids.copy()
    masked[selected & (action < 0.8)] = special_ids["mask"]
    to_random = selected & (action >= 0.8) & (action < 0.9)
    masked[to_random] = random_ids[to_random]
    labels = np.where(selected, input_ids, -100)
    return masked, labels


class PhaseLoader:
    """This rank's micro-batches for `steps` optimizer steps of one phase, from `start_sample` on.

    A daemon thread builds them in order (index, read, mask, to torch, pin) and keeps up to
    `prefetch` ready; `next_step()` returns the grad_accum micro-batches of the next step.
    `wait_s` accumulates the time the training loop spent blocked on data.
    """

    def __init__(
        self,
        dataset,
        *,
        seed: int,
        phase: int,
        start_sample: int,
        steps: int,
        micro_batch_size: int,
        grad_accum: int,
        world_size: int,
        rank: int,
        mask_prob: float,
        prefetch: int,
        pin_memory: bool,
    ):
        self.dataset, self.seed, self.phase = dataset, seed, phase
        self.start, self.steps, self.micro, self.grad_accum = start_sample, steps, micro_batch_size, grad_accum
        self.world, self.rank, self.mask_prob, self.pin = world_size, rank, mask_prob, pin_memory
        self.wait_s = 0.0
        self._queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name=f"loader-phase{phase}", daemon=True)
        self._thread.start()

    def micro_batch(self, step: int, micro_step: int) -> dict:
        """Micro-batch `micro_step` of the loader's `step`-th step (0-based), as int64 torch tensors, and its
        BatchLayout under "layout"."""
        start = self.start + step * self.micro * self.world * self.grad_accum
        positions = rank_positions(start, self.micro, self.world, self.rank, micro_step)
        epochs, indices = stream_samples(positions, len(self.dataset), self.seed, self.phase)
        b = self.dataset.get_batch(indices)
        b["input_ids"], b["labels"] = mask_tokens(
            b["input_ids"],
            b["attention_mask"],
            epochs,
            indices,
            seed=self.seed,
            phase=self.phase,
            mask_prob=self.mask_prob,
            special_ids=self.dataset.special_ids,
            vocab_size=self.dataset.vocab_size,
        )
        out = {k: torch.from_numpy(v) for k, v in b.items()}
        out["layout"] = BatchLayout.of(out["attention_mask"], out["labels"])
        # pinned, the copies to the GPU (non_blocking) run alongside the step instead of blocking the host
        return {k: v.pin_memory() for k, v in out.items()} if self.pin else out

    def _produce(self) -> None:
        try:
            for step in range(self.steps):
                for m in range(self.grad_accum):
                    self._put(self.micro_batch(step, m))
        except BaseException as e:  # re-raised in the training loop, not lost in the thread
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next_step(self) -> list[dict]:
        t0 = time.perf_counter()
        batches = [self._queue.get() for _ in range(self.grad_accum)]
        self.wait_s += time.perf_counter() - t0
        for b in batches:
            if isinstance(b, BaseException):
                raise RuntimeError(f"data loader thread of phase {self.phase} failed") from b
        return batches

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
