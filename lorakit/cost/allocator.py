"""What `torch.cuda.max_memory_reserved` would show for a sequence of allocations and frees.

A replay of the rules of PyTorch's CUDA caching allocator
(c10/cuda/CUDACachingAllocator.cpp, default settings: no expandable segments,
no max_split_size, no garbage-collection threshold, one stream):

* every request is rounded up to a multiple of 512 bytes (kMinBlockSize);
* requests up to 1 MiB (kSmallSize) come from the small pool, whose segments are 2 MiB (kSmallBuffer);
  larger ones from the large pool: 20 MiB segments (kLargeBuffer) under 10 MiB (kMinLargeAlloc),
  else the request rounded up to 2 MiB (kRoundLarge);
* a request takes the smallest free block of its pool that is large enough (best fit), split when the rest
  is at least 512 bytes (small pool) or more than 1 MiB (large pool);
* a freed block merges with free neighbours of its segment; segments are never given back (no empty_cache).

It tracks block sizes and offsets only; no memory is involved.
"""

from __future__ import annotations

import bisect

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20
SMALL_BUFFER = 2 << 20
LARGE_BUFFER = 20 << 20
MIN_LARGE_ALLOC = 10 << 20
ROUND_LARGE = 2 << 20


def round_size(nbytes: int) -> int:
    """Bytes the allocator charges to `memory_allocated` for one storage of `nbytes` (0 stays 0)."""
    if nbytes <= 0:
        return 0
    return -(-nbytes // MIN_BLOCK) * MIN_BLOCK


def segment_size(size: int) -> int:
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


class CachingAllocator:
    """Best-fit blocks in segments, two pools; `reserved` is the sum of segment sizes."""

    def __init__(self) -> None:
        self.reserved = 0
        self.allocated = 0
        self._free: dict[bool, list[tuple[int, int, int]]] = {True: [], False: []}  # (size, segment, offset)
        # segment -> {offset: [size, is_free]} for merging neighbours
        self._segments: dict[int, dict[int, list]] = {}
        self._small: dict[int, bool] = {}
        self._where: dict[int, tuple[int, int]] = {}  # allocation key -> (segment, offset)
        self._ends: dict[int, dict[int, int]] = {}  # segment -> {end offset of a free block: its offset}

    def malloc(self, key: int, nbytes: int) -> None:
        size = round_size(nbytes)
        if size == 0:
            return
        small = size <= SMALL_SIZE
        pool = self._free[small]
        i = bisect.bisect_left(pool, (size, -1, -1))
        if i < len(pool):
            block_size, segment, offset = pool.pop(i)
        else:
            block_size, segment, offset = segment_size(size), len(self._segments), 0
            self._segments[segment] = {0: [block_size, True]}
            self._ends[segment] = {block_size: 0}
            self._small[segment] = small
            self.reserved += block_size
        rest = block_size - size
        blocks = self._segments[segment]
        self._ends[segment].pop(offset + block_size, None)
        if (small and rest >= MIN_BLOCK) or (not small and rest > SMALL_SIZE):
            blocks[offset] = [size, False]
            self._set_free(segment, offset + size, rest)
            bisect.insort(pool, (rest, segment, offset + size))
        else:
            blocks[offset] = [block_size, False]
        self.allocated += blocks[offset][0]
        self._where[key] = (segment, offset)

    def free(self, key: int) -> None:
        where = self._where.pop(key, None)
        if where is None:
            return
        segment, offset = where
        blocks, pool = self._segments[segment], self._free[self._small[segment]]
        size = blocks.pop(offset)[0]
        self.allocated -= size
        nxt = offset + size
        if nxt in blocks and blocks[nxt][1]:  # merge with the next free block
            pool.remove((blocks[nxt][0], segment, nxt))
            size += blocks.pop(nxt)[0]
        prev = self._ends[segment].pop(offset, None)
        if prev is not None:  # merge with the previous free block
            pool.remove((blocks[prev][0], segment, prev))
            size += blocks[prev][0]
            offset = prev
        self._set_free(segment, offset, size)
        bisect.insort(pool, (size, segment, offset))

    def _set_free(self, segment: int, offset: int, size: int) -> None:
        blocks, ends = self._segments[segment], self._ends[segment]
        old = blocks.get(offset)
        if old is not None and old[1]:
            ends.pop(offset + old[0], None)
        blocks[offset] = [size, True]
        ends[offset + size] = offset
