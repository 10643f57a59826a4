"""engine/token_classes.py: per-step counts per (MoE layer, token class, expert) on a rank, and the
since-start summary with its share ratios and specialised experts."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from maverick_ray.engine.token_classes import MIN_EXPERT_TOKENS, TOKEN_CLASSES, RoutingTally, TokenClassLoad


@pytest.mark.parametrize("top_k", [1, 2])
def test_the_tally_counts_every_routed_row_by_layer_class_and_expert(top_k):
    g = torch.Generator().manual_seed(0)
    E, T, L, V = 8, 37, 3, 50
    table = torch.randint(0, len(TOKEN_CLASSES), (V,), generator=g)
    tokens = torch.randint(0, V, (T,), generator=g)
    routed = [torch.randint(0, E, (T, top_k), generator=g) for _ in range(L)]
    per_expert, (cells, counts) = RoutingTally(table, E).count(routed, tokens)
    want = Counter((layer, int(table[tokens[t]]), int(routed[layer][t, j]))
                   for layer in range(L) for t in range(T) for j in range(top_k))
    K = len(TOKEN_CLASSES)
    got = {(c // (K * E), c // E % K, c % E): n for c, n in zip(cells, counts)}
    assert got == dict(want)
    assert per_expert == [[sum(n for (la, _, e), n in want.items() if la == layer and e == x) for x in range(E)]
                          for layer in range(L)]




@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU"))])
@pytest.mark.parametrize("top_k", [1, 2])
def test_the_python_count_of_small_steps_matches_the_bincount(top_k, device, monkeypatch):
    g = torch.Generator().manual_seed(top_k)
    E, V = 128, 1000
    table = torch.randint(0, len(TOKEN_CLASSES), (V,), generator=g)
    tally = RoutingTally(table, E)
    paths = []
    for name in ("_count_small", "_count_bincount"):
        path = getattr(tally, name)
        monkeypatch.setattr(tally, name, lambda *a, path=path, name=name: paths.append(name) or path(*a))
    for L, dtype in ((1, torch.long), (2, torch.long), (3, torch.int32)):
        for T in (1, 2, 5, 32, 64, 200):
            tokens = torch.randint(0, V, (T,), generator=g).to(device)
            routed = [torch.randint(0, E, (T, top_k), generator=g).to(device, dtype) for _ in range(L)]
            want = tally._count_bincount(routed, tokens)
            assert tally._count_small(routed, tokens) == want, (L, T)
            paths.clear()
            assert tally.count(routed, tokens) == want
            assert paths == ["_count_small" if L * T * top_k <= RoutingTally.SMALL_ROWS else "_count_bincount"]
    assert RoutingTally.SMALL_ROWS >= 2 * 1 * 2   # a decode step of 1 sequence at L=2, k=2 is small

def test_no_routed_layers_count_nothing():
    assert RoutingTally(torch.zeros(4, dtype=torch.long), 4).count([], torch.tensor([1])) == ([], [[], []])


def test_the_summary_finds_the_expert_that_takes_a_class_far_above_its_share():
    E = 8
    words, digits = TOKEN_CLASSES.index("words"), TOKEN_CLASSES.index("digits")
    load = TokenClassLoad([1], E)
    cell = lambda k, e, n: ([k * E + e], [n])  # noqa: E731  (layer 0)
    for e in range(E):
        load.add(cell(words, e, 90))
    load.add(cell(digits, 0, 40))                       # expert 0: 40 of its 130 tokens are digits
    load.add(cell(digits, 3, 2))
    load.add(cell(digits, 2, MIN_EXPERT_TOKENS - 1))
    s = load.summary()
    assert s["tokens"][0][digits] == [40, 0, MIN_EXPERT_TOKENS - 1, 2, 0, 0, 0, 0]
    digit_share = (40 + 2 + MIN_EXPERT_TOKENS - 1) / (E * 90 + 40 + 2 + MIN_EXPERT_TOKENS - 1)
    assert s["ratio"][0][digits][0] == pytest.approx((40 / 130) / digit_share, abs=1e-3)
    assert [x["expert"] for x in s["specialised"][0]] == [0] and s["specialised"][0][0]["class"] == "digits"
    assert s["ratio"][0][TOKEN_CLASSES.index("image patches")] == [0.0] * E   # a class never seen: 0, not NaN


def test_an_expert_with_a_handful_of_tokens_is_not_called_specialised():
    E = 2
    load = TokenClassLoad([0], E)
    load.add(([0 * E + 0], [500]))                                           # words -> expert 0
    load.add(([TOKEN_CLASSES.index("special") * E + 1], [MIN_EXPERT_TOKENS - 1]))  # a few specials -> expert 1
    assert load.summary()["specialised"] == [[]]
