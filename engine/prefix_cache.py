"""Which prompt prefixes have their KV kept, and where: an index from chains of block keys to blocks
of the KV pool's prefix store, least recently used first out.

A prompt is cut into blocks of ``block_size`` tokens; block i's key is a BLAKE2b digest of block
i's tokens and block i-1's key, so one key names a whole prefix (vLLM's automatic prefix caching
keys blocks the same way). A digest, not Python's ``hash``: a client could craft prompts that
collide under a fast hash and be handed another prompt's cache. Matches also compare the tokens. Slots here are contiguous, not paged:
a hit is copied from the store into the request's slot (``KVPool.load``) and only the rest of the
prompt is prefilled. Pure bookkeeping: no model, no numpy, tested on its own.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class _Entry:
    block: int  # its block in the pool's store
    parent: bytes | None  # the key of the block before it (None: the first block)
    tokens: tuple[int, ...]


class PrefixCache:
    def __init__(self, blocks: int, block_size: int):
        if blocks < 0 or block_size < 1:
            raise ValueError("a prefix cache needs blocks >= 0 and block_size >= 1")
        self.block_size, self.blocks = block_size, blocks
        self._free = list(range(blocks - 1, -1, -1))
        # key -> entry, least recently used first; a block is always used more recently than every
        # block after it in its chain (chains are touched from their end back to their start), so
        # eviction takes a chain's end before its beginning
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()

    @property
    def cached_tokens(self) -> int:
        return len(self._entries) * self.block_size

    def keys(self, tokens: Sequence[int]) -> list[bytes]:
        """One key per full block of ``tokens``."""
        keys, key, step = [], b"", self.block_size * 4
        data = array("I", tokens).tobytes()  # token ids are checked against the vocabulary before this
        for start in range(0, len(data) - step + 1, step):
            key = hashlib.blake2b(key + data[start:start + step], digest_size=16).digest()
            keys.append(key)
        return keys

    def match(self, tokens: Sequence[int], keys: list[bytes], limit: int | None = None) -> list[int]:
        """Store blocks of the longest cached run of ``tokens``' first blocks (at most ``limit``),
        in order; they count as used now."""
        found, parent, size = [], None, self.block_size
        for i, key in enumerate(keys[:limit]):
            entry = self._entries.get(key)
            if entry is None or entry.parent != parent or entry.tokens != tuple(tokens[i * size:(i + 1) * size]):
                break
            found.append(entry.block)
            parent = key
        self._touch(keys[:len(found)])
        return found

    def cached_run(self, keys: list[bytes]) -> int:
        """How many of the first ``keys`` are cached (by key alone; ``match`` checks tokens)."""
        n = 0
        while n < len(keys) and keys[n] in self._entries:
            n += 1
        return n

    def insert(self, tokens: Sequence[int], keys: list[bytes], upto: int) -> list[tuple[int, int]]:
        """Make blocks 0 .. upto-1 of ``tokens`` cached, evicting the least recently used blocks of
        other prefixes when the store is full. Returns (block index in the prompt, store block) for
        each block the caller must now copy from the sequence's slot into the store."""
        size, chain = self.block_size, keys[:upto]
        self._touch([k for k in chain if k in self._entries])  # the chain's own blocks are not evicted
        protected, added, parent, reached = set(chain), [], None, 0
        for i, key in enumerate(chain):
            if key not in self._entries:
                if not self._make_room(protected):
                    break
                block = self._free.pop()
                self._entries[key] = _Entry(block, parent, tuple(tokens[i * size:(i + 1) * size]))
                added.append((i, block))
            parent, reached = key, i + 1
        self._touch(chain[:reached])
        return added

    def _make_room(self, protected: set[bytes]) -> bool:
        if self._free:
            return True
        oldest = next(iter(self._entries), None)
        if oldest is None or oldest in protected:  # the store holds nothing but this prompt
            return False
        self._free.append(self._entries.pop(oldest).block)
        return True

    def _touch(self, chain: list[bytes]) -> None:
        for key in reversed(chain):  # the chain's start ends up most recent
            self._entries.move_to_end(key)
