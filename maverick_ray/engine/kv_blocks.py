"""One rank's KV pages as the scheduler sees them: free, cached and used pages, and each
sequence's block tables.

The scheduler owns the tables (the ranks hold only the page buffers, model/kv_cache.py): each
step's plan carries, per sequence and layer group, the pages of the blocks that step reads and
writes, so a rank keeps no table state of its own and a replaced rank needs none back. Chunked
(local) groups give back the blocks of attention chunks a sequence has left (`trim`).
"""

from __future__ import annotations

from collections import OrderedDict

from ..model.kv_cache import KVLayout


class OutOfPages(RuntimeError):
    """A rank has fewer free pages than a sequence's next step needs."""


def block_hashes(tokens: list[int], block_size: int, prev: list[int], image_token: int | None = None,
                 image_key: int | None = None) -> list[int]:
    """Chained hashes of the full blocks of `tokens`, extending `prev` (the hashes already made
    for its first blocks): block j's hash covers every token up to the end of block j. A block
    holding image patch tokens also covers `image_key` (the images' content), so the same
    prompt with another image does not match. Python's hash of int tuples: deterministic, 64 bits."""
    out = list(prev)
    for j in range(len(out), len(tokens) // block_size):
        block = tuple(tokens[j * block_size:(j + 1) * block_size])
        extra = image_key if image_token is not None and image_token in block else None
        out.append(hash((out[-1] if out else 0, block, extra)))
    return out


class BlockTables:
    """Pages are free, used by sequences (counted: a cached prefix block may be shared), or cached
    and unused (evictable, least recently released first). With prefix caching on, full blocks
    are registered under (group, chained hash) and a new request adopts the pages of its longest
    cached prefix."""

    def __init__(self, layout: KVLayout, num_pages: int, caching: bool = False):
        self.layout, self.num_pages, self.caching = layout, num_pages, caching
        self.free: list[int] = list(range(num_pages - 1, -1, -1))
        self.evictable: OrderedDict[int, None] = OrderedDict()   # cached pages no sequence uses, LRU first
        self.refs: dict[int, int] = {}                              # page -> sequences using it
        self.key_of: dict[int, tuple[int, int]] = {}                # registered page -> (group, block hash)
        self.page_of: dict[tuple[int, int], int] = {}               # (group, block hash) -> page
        self.tables: dict[str, list[dict[int, int]]] = {}   # seq id -> per group: logical block -> page
        # seq id -> per group (first block, end block, pages) of its last allocate: a decode step
        # extends it by at most one block instead of walking the whole context (O(context) before)
        self._last: dict[str, list[tuple[int, int, list[int]]]] = {}
        # seq id -> (attention chunk index of its last allocate's start, its end block): a step in
        # the same chunk ending in the same block needs exactly the pages of the last one (most
        # decode steps: 15 of 16 at 16-token blocks), answered without a walk per group (issue 21)
        self._last_key: dict[str, tuple[int, int]] = {}
        # seq id -> the first kept block its last trim applied to the local groups
        self._kept: dict[str, int] = {}
        # seq id -> full blocks register has offered; (group, block)s whose key another page held
        # then (offered again each call). Each call looks only at blocks that filled since the last
        # one: every block of every group per step was 74 us a sequence at 16k tokens (issue 21).
        self._registered: dict[str, int] = {}
        self._collided: dict[str, list[tuple[int, int]]] = {}

    @property
    def used(self) -> int:
        """Pages some sequence uses."""
        return len(self.refs)

    @property
    def available(self) -> int:
        """Pages a sequence can get: free ones and cached ones nobody uses (evicted on demand)."""
        return len(self.free) + len(self.evictable)

    def _table(self, seq_id: str) -> list[dict[int, int]]:
        if seq_id not in self.tables:
            self.tables[seq_id] = [{} for _ in range(self.layout.num_groups)]
        return self.tables[seq_id]

    def _take(self) -> int:
        if self.free:
            page = self.free.pop()
        else:  # evict the least recently released cached block
            page, _ = self.evictable.popitem(last=False)
            del self.page_of[self.key_of.pop(page)]
        self.refs[page] = 1
        return page

    def _drop(self, page: int) -> None:
        self.refs[page] -= 1
        if self.refs[page] == 0:
            del self.refs[page]
            if page in self.key_of:
                self.evictable[page] = None
            else:
                self.free.append(page)

    def _unseen(self, seq_id: str, g: int, blocks: range) -> tuple[list[int], range]:
        """(pages of the leading blocks the sequence's last allocate already listed, the blocks
        after them) for a step needing `blocks` in group g: a step continuing the last one (same
        first block) only has to look at blocks past its end; otherwise ([], blocks)."""
        last = self._last.get(seq_id)
        if last is not None and last[g][0] == blocks.start and last[g][1] <= blocks.stop:
            return last[g][2], range(last[g][1], blocks.stop)
        return [], blocks

    def _step_key(self, start: int, end: int) -> tuple[int, int]:
        """What decides a step's blocks in every group: the chunk its start is in, its end block."""
        chunk = self.layout.chunk
        return (start // chunk if chunk else 0), -(-end // self.layout.block_size)

    def _repeats_last(self, seq_id: str, start: int, end: int) -> bool:
        key = self._last_key.get(seq_id)
        return key is not None and key == self._step_key(start, end)

    def pages_needed(self, seq_id: str, start: int, end: int) -> int:
        """New pages a step over positions start..end-1 needs for this sequence."""
        if self._repeats_last(seq_id, start, end):
            return 0
        table = self.tables.get(seq_id)
        need = 0
        for g in range(self.layout.num_groups):
            _, blocks = self._unseen(seq_id, g, self.layout.blocks_for(g, start, end))
            need += sum(1 for j in blocks if table is None or j not in table[g])
        return need

    def allocate(self, seq_id: str, start: int, end: int) -> tuple[list[int], list[list[int]]]:
        """Gives the sequence pages for every block a step over start..end-1 uses; returns, per
        group, the first logical block the step reads and the pages from there (the plan's
        view). OutOfPages (and nothing allocated) when too few are available."""
        if self._repeats_last(seq_id, start, end):   # the same blocks as the last step: its lists
            last = self._last[seq_id]
            return [f for f, _, _ in last], [pages for _, _, pages in last]
        need = self.pages_needed(seq_id, start, end)
        if need > self.available:
            raise OutOfPages(f"{need} pages needed, {self.available} available")
        table = self._table(seq_id)
        first, pages, now = [], [], []
        for g in range(self.layout.num_groups):
            blocks = self.layout.blocks_for(g, start, end)
            held, unseen = self._unseen(seq_id, g, blocks)
            for j in unseen:
                if j not in table[g]:
                    table[g][j] = self._take()
            group_pages = held + [table[g][j] for j in unseen]   # a new list: plans keep theirs
            first.append(blocks.start)
            pages.append(group_pages)
            now.append((blocks.start, blocks.stop, group_pages))
        self._last[seq_id] = now
        self._last_key[seq_id] = self._step_key(start, end)
        return first, pages

    def trim(self, seq_id: str, length: int) -> None:
        """The sequence now has `length` tokens cached: local groups let go of the blocks of
        chunks it has left."""
        table = self.tables.get(seq_id)
        if table is None:
            return
        chunk = self.layout.chunk
        keep = (length // chunk) * chunk // self.layout.block_size if chunk else 0  # local groups' first kept block
        if keep <= self._kept.get(seq_id, 0):   # nothing below it since the last trim (global groups keep all)
            return
        self._kept[seq_id] = keep
        for g in range(self.layout.num_groups):
            if self.layout.local[g]:
                for j in [j for j in table[g] if j < keep]:
                    self._drop(table[g].pop(j))

    def release(self, seq_id: str) -> int:
        """Lets go of every page of the sequence; returns how many."""
        self._forget_steps(seq_id)
        table = self.tables.pop(seq_id, None)
        if table is None:
            return 0
        pages = [p for group in table for p in group.values()]
        for p in pages:
            self._drop(p)
        return len(pages)

    def _forget_steps(self, seq_id: str) -> None:
        for memo in (self._last, self._last_key, self._kept, self._registered, self._collided):
            memo.pop(seq_id, None)

    def held(self, seq_id: str) -> int:
        table = self.tables.get(seq_id)
        return sum(len(group) for group in table) if table else 0

    # ---- prefix caching ------------------------------------------------------------------------
    def register(self, seq_id: str, hashes: list[int], length: int) -> None:
        """Makes the sequence's full blocks (of its first `length` cached tokens, hashes[j] for
        block j) findable by later requests."""
        table = self.tables.get(seq_id)
        if not self.caching or table is None:
            return
        full = min(len(hashes), length // self.layout.block_size)
        done = self._registered.get(seq_id, 0)
        if full <= done and seq_id not in self._collided:
            return
        offers = self._collided.pop(seq_id, []) + [(g, j) for g in range(self.layout.num_groups)
                                                   for j in range(done, full)]
        left = [(g, j) for g, j in offers if not self._offer(table, g, j, hashes)]
        if left:
            self._collided[seq_id] = left
        self._registered[seq_id] = max(done, full)

    def _offer(self, table: list[dict[int, int]], g: int, j: int, hashes: list[int]) -> bool:
        """Makes block j of group g findable; False when another page holds its key (try again)."""
        page = table[g].get(j)
        if page is None or page in self.key_of:   # trimmed, or already findable (e.g. adopted)
            return True
        key = (g, hashes[j])
        if key in self.page_of:
            return False
        self.key_of[page] = key
        self.page_of[key] = page
        return True

    def forget_cached(self) -> None:
        """Drops every cached block (their keys and values no longer match what the model
        computes, e.g. after a test hook changed the routing)."""
        self.free.extend(self.evictable)
        self.evictable.clear()
        self.key_of.clear()
        self.page_of.clear()
        self._collided.clear()   # stale too; blocks already offered are not offered again

    def _window(self, g: int, blocks: int) -> range:
        """Logical blocks a sequence with `blocks` full blocks cached needs in group g to go on."""
        return range(min(self.layout.first_kept_block(g, blocks * self.layout.block_size), blocks), blocks)

    def longest_prefix(self, hashes: list[int], most_blocks: int) -> int:
        """Blocks (at most most_blocks) of the longest prefix whose blocks are cached in every
        group, as far as a sequence continuing after it needs them (global groups: all of them;
        chunked groups: the current chunk's)."""
        if not self.caching:
            return 0
        top = min(len(hashes), most_blocks)
        for g in range(self.layout.num_groups):  # global groups need the whole prefix
            if not self.layout.local[g]:
                top = next((j for j in range(top) if (g, hashes[j]) not in self.page_of), top)
        for m in range(top, 0, -1):
            if all((g, hashes[j]) in self.page_of for g in range(self.layout.num_groups) if self.layout.local[g]
                   for j in self._window(g, m)):
                return m
        return 0

    def adopt(self, seq_id: str, hashes: list[int], blocks: int) -> None:
        """The sequence starts from the cached pages of its first `blocks` blocks."""
        self._forget_steps(seq_id)
        table = self._table(seq_id)
        for g in range(self.layout.num_groups):
            for j in (range(blocks) if not self.layout.local[g] else self._window(g, blocks)):
                page = self.page_of[(g, hashes[j])]
                self.evictable.pop(page, None)
                self.refs[page] = self.refs.get(page, 0) + 1
                table[g][j] = page
