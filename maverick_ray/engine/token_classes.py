"""Expert load by token class: which kinds of tokens each routed expert takes, as served.

Shape legend: V vocab, T tokens of a step, k experts per token, L MoE layers, K token classes,
E routed experts.

Every token is put in one class by its id alone (so a rank can count it without the text):
image patch tokens (`<|patch|>`: their embeddings are the image's features), the tokenizer's
special tokens (chat headers, begin/end markers), tokens whose text is digits, tokens with a
letter in them ("words"), and the rest (punctuation and white space, e.g. code indentation).
A checkpoint without tokenizer.json counts everything but image patches as words.

Each rank counts its step's routed ids per (layer, class, expert) (`RoutingTally`) and sends
the counts: per-expert totals for the routing window, and the non-zero (layer, class, expert)
cells for `TokenClassLoad`, which the engine keeps since start. Its summary is what
`GET /v1/expert-load` returns as `by_token_class` and what the live page draws: per expert, the
share of its tokens in each class over that class's share of all tokens. An expert is
"specialised" when that ratio is at least SPECIALISED for some class.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

TOKEN_CLASSES = ("words", "digits", "punctuation", "special", "image patches")
SPECIALISED = 3.0      # share ratio at which an expert counts as specialised for a class
MIN_EXPERT_TOKENS = 10  # experts with fewer tokens are left out of the count (one odd token is no skew)


def token_class_table(checkpoint: str | Path, vocab_size: int, image_token_id: int | None) -> torch.Tensor:
    """(V,) int64: the class index of every token id of the checkpoint's tokenizer."""
    classes = [0] * vocab_size            # a list, one tensor at the end: Maverick has 202k tokens
    path = Path(checkpoint) / "tokenizer.json"
    if path.exists():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
        n = min(vocab_size, tok.get_vocab_size(with_added_tokens=True))
        texts = tok.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
        for i, text in enumerate(texts):
            if text.strip().isdigit():
                classes[i] = TOKEN_CLASSES.index("digits")
            elif not any(c.isalpha() for c in text):
                classes[i] = TOKEN_CLASSES.index("punctuation")
        for i, added in tok.get_added_tokens_decoder().items():
            if added.special and i < vocab_size:
                classes[i] = TOKEN_CLASSES.index("special")
    if image_token_id is not None and 0 <= image_token_id < vocab_size:
        classes[image_token_id] = TOKEN_CLASSES.index("image patches")
    return torch.tensor(classes, dtype=torch.long)


class RoutingTally:
    """Counts one step's routed expert ids on a rank, per expert and per token class.

    A step's cost is mostly host time per dispatched torch op (~5-10 us each), so small steps
    (decode) are counted in plain Python after one stack and two tolist, instead of the ~17 ops
    of one bincount over all (layer, class, expert) cells. Measured on the 2-core development CPU
    at L=2, E=128, k=1: T=1 9 us against 67 us for the bincount, T=32 35 us against 69 us; the
    Python count grows ~0.5 us a routed row, the bincount barely, so larger steps take the bincount."""

    SMALL_ROWS = 128  # routed rows, all layers (L*T*k), up to which the Python count is no slower

    def __init__(self, class_table: torch.Tensor, num_experts: int):
        self.table, self.num_experts = class_table, num_experts
        self.classes: list[int] = class_table.tolist()  # the table as a list, for the Python count
        self._offsets: dict[int, torch.Tensor] = {}   # L -> (L, 1) first cell of each layer

    def count(self, routed_ids: list[torch.Tensor], token_ids: torch.Tensor) -> tuple[list[list[int]], list[list[int]]]:
        """routed_ids: each MoE layer's (T, k) ids; token_ids (T,), valid ids of the vocab ->
        (per layer the (E,) token counts, [flat (layer, class, expert) indices, ascending, and
        counts] of the non-zero cells)."""
        if not routed_ids:
            return [], [[], []]
        if len(routed_ids) * routed_ids[0].numel() <= self.SMALL_ROWS:
            return self._count_small(routed_ids, token_ids)
        return self._count_bincount(routed_ids, token_ids)

    def _count_small(self, routed_ids: list[torch.Tensor], token_ids: torch.Tensor) -> tuple[list[list[int]], list[list[int]]]:
        """count() in Python, on the ids copied to the host (on a GPU, the first tolist syncs)."""
        E, KE = self.num_experts, len(TOKEN_CLASSES) * self.num_experts
        ids, classes = torch.stack(routed_ids), self.classes                 # (L, T, k)
        cls = [classes[t] * E for t in token_ids.tolist()]
        per_expert, cells = [], {}
        for layer, rows in enumerate(ids.tolist()):
            counts, base = [0] * E, layer * KE
            for c, row in zip(cls, rows):
                for e in row:
                    counts[e] += 1
                    cell = base + c + e
                    cells[cell] = cells.get(cell, 0) + 1
            per_expert.append(counts)
        flat = sorted(cells)
        return per_expert, [flat, [cells[i] for i in flat]]

    def _count_bincount(self, routed_ids: list[torch.Tensor], token_ids: torch.Tensor) -> tuple[list[list[int]], list[list[int]]]:
        """count() with one bincount over all (layer, class, expert) cells."""
        L, E, K = len(routed_ids), self.num_experts, len(TOKEN_CLASSES)
        if self.table.device != token_ids.device:
            self.table = self.table.to(token_ids.device)
        k = routed_ids[0].shape[1]
        offsets = self._offsets.get(L)
        if offsets is None or offsets.device != token_ids.device:
            offsets = self._offsets[L] = torch.arange(L, device=token_ids.device)[:, None] * (K * E)
        cls = self.table[token_ids] * E                                           # (T,)
        if k > 1:
            cls = cls.repeat_interleave(k)
        ids = torch.stack([r.reshape(-1) for r in routed_ids])                   # (L, T*k)
        cells = torch.bincount((ids + cls + offsets).reshape(-1), minlength=L * K * E)  # (L*K*E,)
        per_expert = cells.view(L, K, E).sum(1).tolist()
        nonzero = cells.nonzero().squeeze(1)
        return per_expert, [nonzero.tolist(), cells[nonzero].tolist()]


class TokenClassLoad:
    """Tokens per (MoE layer, class, expert) since start, summed over ranks (thread-safe: the
    engine loop adds, the HTTP handlers read)."""

    def __init__(self, moe_layers: list[int], num_experts: int):
        self.moe_layers, self.num_experts = list(moe_layers), num_experts
        self.cells = torch.zeros(len(self.moe_layers) * len(TOKEN_CLASSES) * num_experts, dtype=torch.long)
        self._pending: tuple[list[int], list[int]] = ([], [])   # added, not yet folded into cells
        self._lock = threading.Lock()

    # Adds are folded into `cells` when read or once this many are pending: two list extends per
    # step instead of three tensor ops (issue 21: host time per decode step).
    FOLD_AT = 1 << 16

    def add(self, sparse: list[list[int]]) -> None:
        """sparse: [flat indices, counts] from RoutingTally.count."""
        if sparse and sparse[0]:
            with self._lock:
                self._pending[0].extend(sparse[0])
                self._pending[1].extend(sparse[1])
                if len(self._pending[0]) >= self.FOLD_AT:
                    self._fold()

    def _fold(self) -> None:
        """Caller holds the lock."""
        idx, counts = self._pending
        if idx:
            self.cells.index_add_(0, torch.tensor(idx), torch.tensor(counts))
            self._pending = ([], [])

    def summary(self) -> dict:
        """{classes, moe_layers, tokens: (L, K, E) counts, ratio: (L, K, E) share of the expert's
        tokens in the class over the class's share of the layer's tokens (0 when either is 0),
        specialised: per layer, [{expert, class, ratio}] for experts at SPECIALISED or more}."""
        with self._lock:
            self._fold()
            cells = self.cells.view(len(self.moe_layers), len(TOKEN_CLASSES), self.num_experts).clone()
        per_expert = cells.sum(1, keepdim=True).double()                          # (L, 1, E)
        class_share = cells.sum(2, keepdim=True).double() / cells.sum((1, 2), keepdim=True).double().clamp(min=1)
        expert_share = cells.double() / per_expert.clamp(min=1)                   # (L, K, E)
        ratio = torch.where(class_share > 0, expert_share / class_share.clamp(min=1e-12), torch.zeros(()))
        specialised = []
        for layer in range(cells.shape[0]):
            found = []
            for e in range(self.num_experts):
                if per_expert[layer, 0, e] >= MIN_EXPERT_TOKENS:
                    best = int(ratio[layer, :, e].argmax())
                    if ratio[layer, best, e] >= SPECIALISED:
                        found.append({"expert": e, "class": TOKEN_CLASSES[best],
                                      "ratio": round(float(ratio[layer, best, e]), 2)})
            specialised.append(found)
        return {"classes": list(TOKEN_CLASSES), "moe_layers": self.moe_layers, "threshold": SPECIALISED,
                "tokens": cells.tolist(), "ratio": [[[round(v, 3) for v in row] for row in layer]
                                                    for layer in ratio.tolist()],
                "specialised": specialised}
