"""Early-bird detector: masks from gates, distances, the FIFO window, epsilon, min/max steps, ties."""

import json

import pytest
import torch

from pipeline.earlybert.detector import (
    DetectorConfig,
    DetectorState,
    Masks,
    broadcast_decision,
    keep_mask,
    mask_distance,
    masks_from_gates,
    observe,
)


def test_layerwise_heads_keep_two_thirds_by_magnitude():
    gates = [torch.tensor([0.9, -1.5, 0.1, 0.5, 0.2, 0.05]), torch.tensor([1.0, 2.0, 3.0])]
    masks = keep_mask([g.abs() for g in gates], 1 / 3, "layer")
    assert masks[0].tolist() == [True, True, False, True, True, False]  # keep 4 of 6; |-1.5| counts as large
    assert masks[1].tolist() == [False, True, True]


def test_global_ffn_prunes_across_layers_but_keeps_one_per_layer():
    scores = [torch.tensor([5.0, 4.0, 3.0, 6.0]), torch.tensor([0.1, 0.2, 0.3, 0.05])]
    masks = keep_mask(scores, 0.4, "global")  # keep round(8 * 0.6) = 5 of 8
    assert masks[0].tolist() == [True, True, True, True]
    assert masks[1].tolist() == [False, False, True, False]  # the best of the starved layer survives
    starved = keep_mask([torch.tensor([9.0, 8.0, 7.0]), torch.tensor([0.1, 0.2])], 0.5, "global")
    assert starved[1].tolist() == [False, True]


def test_ties_go_to_the_lower_index():
    assert keep_mask([torch.ones(6)], 0.5, "layer")[0].tolist() == [True] * 3 + [False] * 3
    assert keep_mask([torch.ones(3), torch.ones(3)], 0.5, "global")[0].tolist() == [True] * 3


def test_mask_distance_is_normalized_hamming():
    a = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    assert mask_distance(a, a) == 0.0
    assert mask_distance(a, torch.tensor([1, 0, 0, 1], dtype=torch.bool)) == 0.5
    assert mask_distance(a, ~a) == 1.0
    with pytest.raises(ValueError):
        mask_distance(a, a[:3])


def masks(head_bits: str, ffn_bits: str) -> Masks:
    return Masks.from_json({"heads": [head_bits], "ffn": [ffn_bits]})


def run(cfg: DetectorConfig, sequence):
    state, decisions = DetectorState(), []
    for i, (h, f) in enumerate(sequence, start=1):
        decisions.append(observe(state, i * cfg.interval, masks(h, f), cfg))
    return state, decisions


def test_draw_needs_a_full_window_of_stable_head_and_ffn_masks():
    cfg = DetectorConfig(interval=10, window=3, epsilon=0.25, min_search_steps=0, max_search_steps=1000)
    steady = ("1100", "11110000")
    state, d = run(cfg, [steady, steady, steady])
    assert [x.draw for x in d] == [False, False, True]  # a window of 3 needs 3 masks
    assert state.drawn_step == 30 and not state.forced
    # FFN mask still moving (distance 0.5 > epsilon) while the heads are stable: no draw.
    _, d = run(cfg, [("1100", "11110000"), ("1100", "00001111"), ("1100", "11110000")])
    assert not any(x.draw for x in d)
    # Within epsilon (one of four heads differs = 0.25) counts as stable.
    _, d = run(cfg, [("1100", "11110000"), ("1101", "11110000"), ("1100", "11110000")])
    assert d[-1].draw


def test_window_compares_with_all_older_masks_and_forgets_beyond_it():
    cfg = DetectorConfig(interval=1, window=3, epsilon=0.0, min_search_steps=0, max_search_steps=1000)
    a, b = ("1100", "1100"), ("0011", "1100")
    state, d = run(cfg, [a, b, b, b])
    # step 3: [a, b, b] is not stable (a differs); step 4: [b, b, b] is: the old mask left the FIFO.
    assert [x.draw for x in d] == [False, False, False, True]
    assert (
        len(state.fifo) == 3 and state.history[2]["head_distance"] == 1.0 and state.history[3]["head_distance"] == 0.0
    )


def test_min_and_max_search_steps():
    steady = ("1100", "1100")
    cfg = DetectorConfig(interval=10, window=2, epsilon=0.1, min_search_steps=40, max_search_steps=1000)
    _, d = run(cfg, [steady] * 5)
    assert [x.draw for x in d] == [False, False, False, True, True]  # stable from step 20, allowed from 40
    assert "min_search_steps" in d[1].reason
    cfg = DetectorConfig(interval=10, window=2, epsilon=0.1, min_search_steps=0, max_search_steps=30)
    state, d = run(cfg, [("1100", "1100"), ("0011", "0011"), ("1100", "1100")])
    assert [x.draw for x in d] == [False, False, True] and d[-1].forced and "anyway" in d[-1].reason
    assert state.forced


def test_state_round_trips_through_json_and_resumes_identically():
    cfg = DetectorConfig(interval=5, window=3, epsilon=0.2, min_search_steps=0, max_search_steps=100)
    seq = [("1100", "111000"), ("1010", "110100"), ("1100", "111000"), ("1100", "111000"), ("1100", "111000")]
    whole, d_whole = run(cfg, seq)
    part = DetectorState()
    for i, (h, f) in enumerate(seq[:2], start=1):
        observe(part, i * 5, masks(h, f), cfg)
    part = DetectorState.from_json(json.loads(json.dumps(part.to_json())))
    rest = [observe(part, i * 5, masks(h, f), cfg) for i, (h, f) in enumerate(seq[2:], start=3)]
    assert [x.draw for x in rest] == [x.draw for x in d_whole[2:]]
    assert part.to_json() == whole.to_json()


def test_masks_from_gates_never_empty_a_layer_and_digest_is_stable():
    torch.manual_seed(0)
    heads = [torch.randn(12) for _ in range(3)]
    ffn = [torch.randn(40) * (10 if i == 0 else 0.01) for i in range(3)]
    m = masks_from_gates(heads, ffn, DetectorConfig(ffn_prune_ratio=0.7))
    assert [int(h.sum()) for h in m.heads] == [8, 8, 8]
    assert all(f.any() for f in m.ffn)
    assert m.digest() == Masks.from_json(m.to_json()).digest()
    assert m.digest() != masks_from_gates(heads, ffn, DetectorConfig()).digest()


def test_broadcast_without_process_group_round_trips_the_decision():
    m = masks_from_gates([torch.tensor([3.0, 1.0, 2.0])], [torch.tensor([1.0, 5.0, 0.5, 2.0, 4.0])], DetectorConfig())
    state = DetectorState()
    cfg = DetectorConfig(interval=1, window=2, min_search_steps=0, max_search_steps=1)
    decision = observe(state, 1, m, cfg)
    got = broadcast_decision(decision, ([3], [5]))
    assert got.draw and got.forced and got.step == 1 and got.masks.digest() == m.digest()


def test_bad_detector_config_is_refused():
    with pytest.raises(ValueError, match="head_scope"):
        DetectorConfig(head_scope="row")
    with pytest.raises(ValueError, match="ffn_prune_ratio"):
        DetectorConfig(ffn_prune_ratio=1.0)
    with pytest.raises(ValueError, match="max_search_steps"):
        DetectorConfig(min_search_steps=10, max_search_steps=5)


def test_combined_criterion_and_per_type_epsilons():
    """You et al.'s rule on one mask of heads and neurons together, and a separate epsilon per unit type."""
    moving_heads = [("1100", "1111000011110000"), ("0110", "1111000011110000"), ("1100", "1111000011110000")]
    per_type = DetectorConfig(interval=10, window=3, epsilon=0.25, min_search_steps=0, max_search_steps=1000)
    _, d = run(per_type, moving_heads)  # two of four heads swapped: head distance 0.5 > 0.25
    assert not d[-1].draw
    combined = DetectorConfig(
        interval=10, window=3, epsilon=0.25, criterion="combined", min_search_steps=0, max_search_steps=1000
    )
    state, d = run(combined, moving_heads)  # 2 of 20 units differ: 0.1 <= 0.25
    assert d[-1].draw and "combined" in d[-1].reason and state.history[-1]["combined_distance"] == pytest.approx(0.1)
    loose_heads = DetectorConfig(
        interval=10, window=3, epsilon=0.0, head_epsilon=0.5, min_search_steps=0, max_search_steps=1000
    )
    _, d = run(loose_heads, moving_heads)
    assert d[-1].draw and "head masks within 0.5 and FFN masks within 0.0" in d[-1].reason


def test_ffn_widths_are_multiples_of_ffn_multiple_of():
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(100, generator=g), torch.rand(100, generator=g) * 0.5, torch.rand(3, generator=g) * 0.01]
    masks = keep_mask(scores, 0.4, "global", multiple_of=8)
    counts = [int(m.sum()) for m in masks]
    assert counts[0] % 8 == 0 and counts[1] % 8 == 0 and counts[2] == 3  # a layer narrower than 8 keeps itself
    for s, m in zip(scores, masks):  # each layer keeps its largest scores
        assert s[m].min() >= s[~m].max() if (~m).any() else True
    assert [int(m.sum()) for m in keep_mask(scores[:2], 0.4, "layer", multiple_of=64)] == [64, 64]
    cfg = DetectorConfig(ffn_multiple_of=8)
    widths = [int(m.sum()) for m in masks_from_gates([torch.ones(4)] * 2, scores[:2], cfg).ffn]
    assert all(w % 8 == 0 for w in widths)


def test_settings_that_leave_no_room_for_a_natural_draw_are_named():
    from pipeline.earlybert.detector import natural_draw_problems

    ok = DetectorConfig(interval=10, window=5, epsilon=0.15, min_search_steps=100, max_search_steps=240)
    assert natural_draw_problems(ok, heads=16, neurons=4096) == []
    late = natural_draw_problems(ok, heads=16, neurons=4096, first_step=200)  # warmup: masks from step 200 only
    assert len(late) == 1 and "first full at step 250" in late[0]
    strict = DetectorConfig(interval=10, window=5, epsilon=0.1, min_search_steps=100, max_search_steps=240)
    (swap,) = natural_draw_problems(strict, heads=16, neurons=4096)
    assert "below one swap of its 16 units (0.125)" in swap
    assert natural_draw_problems(DetectorConfig(epsilon=0.1, criterion="combined"), heads=16, neurons=4096) == []


def test_random_masks_at_a_tickets_own_counts_and_by_mask_seed(tmp_path):
    import json

    from pipeline.config import ConfigError, MethodConfig
    from pipeline.earlybert.search import random_masks, read_random_like
    from pipeline.model import EarlyBertConfig

    config = EarlyBertConfig.from_preset("bert-tiny")  # 2 layers, 4 heads, FFN 256
    ticket = tmp_path / "ticket.json"
    ticket.write_text(json.dumps({"heads_per_layer": [3, 2], "ffn_per_layer": [200, 40]}))
    like = read_random_like(MethodConfig(mode="random", random_like=str(ticket)), config)
    masks = random_masks(config, DetectorConfig(), seed=1, like=like)
    assert [int(m.sum()) for m in masks.heads] == [3, 2] and [int(m.sum()) for m in masks.ffn] == [200, 40]
    assert masks.digest() == random_masks(config, DetectorConfig(), seed=1, like=like).digest()
    assert masks.digest() != random_masks(config, DetectorConfig(), seed=2, like=like).digest()
    ticket.write_text(json.dumps({"heads_per_layer": [3, 2, 1], "ffn_per_layer": [200, 40, 1]}))
    with pytest.raises(ConfigError, match="the ticket of another model"):
        read_random_like(MethodConfig(mode="random", random_like=str(ticket)), config)
