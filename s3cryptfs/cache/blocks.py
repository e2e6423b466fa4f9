"""Plaintext chunk cache: a byte budget, least recently used out first.

Holds decrypted chunks in memory only (never on disk). Keys are (version id, chunk index); a
version id names one immutable object version (key + ETag, or a local journal entry), so a
changed object can never be served from chunks of its previous version.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class BlockCache:
    def __init__(self, budget: int) -> None:
        self.budget = max(budget, 1)
        self._blocks: OrderedDict[tuple[Hashable, int], bytes] = OrderedDict()
        # The chunk indexes held of each version: drop() is asked at every rename, delete
        # and replaced version, and a look at every cached chunk each time added up.
        self._held: dict[Hashable, set[int]] = {}
        self.used = 0
        self.hits = 0
        self.misses = 0

    def get(self, vid: Hashable, index: int) -> bytes | None:
        key = (vid, index)
        block = self._blocks.get(key)
        if block is None:
            self.misses += 1
            return None
        self.hits += 1
        self._blocks.move_to_end(key)
        return block

    def contains(self, vid: Hashable, index: int) -> bool:
        return (vid, index) in self._blocks

    def put(self, vid: Hashable, index: int, block: bytes) -> None:
        key = (vid, index)
        old = self._blocks.pop(key, None)
        if old is not None:
            self.used -= len(old)
        self._blocks[key] = block
        self._held.setdefault(vid, set()).add(index)
        self.used += len(block)
        while self.used > self.budget and self._blocks:
            (gone, at), evicted = self._blocks.popitem(last=False)
            self._forget(gone, at)
            self.used -= len(evicted)

    def _forget(self, vid: Hashable, index: int) -> None:
        held = self._held[vid]
        held.discard(index)
        if not held:
            del self._held[vid]

    def discard(self, vid: Hashable, index: int) -> None:
        old = self._blocks.pop((vid, index), None)
        if old is not None:
            self._forget(vid, index)
            self.used -= len(old)

    def drop(self, vid: Hashable) -> None:
        for index in self._held.pop(vid, ()):
            self.used -= len(self._blocks.pop((vid, index)))

    def __len__(self) -> int:
        return len(self._blocks)
