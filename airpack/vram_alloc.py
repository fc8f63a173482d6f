"""A model of PyTorch's CUDA caching allocator, to turn a stream of tensor births and deaths into memory.

The process footprint of a PyTorch program is not the sum of its live tensors:
the caching allocator (c10/cuda/CUDACachingAllocator.cpp) rounds every request,
carves requests out of segments it got from ``cudaMalloc``, splits and merges
blocks, and gives a segment back only when memory runs short. The trace
(``vram_trace``) records every storage's birth and death; this module replays
them with the allocator's default rules (no ``PYTORCH_CUDA_ALLOC_CONF``):

* a request is rounded up to a multiple of 512 bytes (at least 512);
* up to 1 MiB it is served from the small pool, whose segments are 2 MiB;
* larger requests use the large pool: a request under 10 MiB that finds no free
  block gets a 20 MiB segment, a larger one a segment of its own rounded up to
  2 MiB;
* the free block chosen is the smallest that is large enough (best fit, ties by
  address); it is split when the rest is at least 512 bytes (small pool) or more
  than 1 MiB (large pool), otherwise the whole block is handed out and counted
  as allocated;
* a freed block merges with free neighbours of its segment; segments are not
  released (``empty_cache`` is not called by ``generate``) unless a new one would
  pass the allocator's capacity: then wholly free segments go back first
  (``CachingAllocator``), which is why what must fit is the peak *in use*.

``allocated`` is what ``torch.cuda.memory_allocated()`` reports (the sizes of
the blocks handed out), ``reserved`` what ``memory_reserved()`` reports (the
segments). Pure Python, no torch: the pure estimator's stream (``vram_stream``) replays into it too.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

MiB = 1 << 20

#: Request rounding and pool limits (CUDACachingAllocator.cpp: kMinBlockSize, kSmallSize,
#: kSmallBuffer, kMinLargeAlloc, kLargeBuffer, kRoundLarge).
MIN_BLOCK = 512
SMALL_SIZE = 1 * MiB
SMALL_SEGMENT = 2 * MiB
MIN_LARGE_ALLOC = 10 * MiB
LARGE_SEGMENT = 20 * MiB
ROUND_LARGE = 2 * MiB


#: cuBLAS's workspace, which PyTorch takes through the caching allocator at the first matrix multiply on Hopper
#: (4096 KiB x 8, CUDABlas.cpp's default for compute capability 9.x): the trace and the stream both allocate it.
CUBLAS_WORKSPACE_BYTES = 32 * MiB


def round_size(nbytes: int) -> int:
    """The size a request of ``nbytes`` is served at: a multiple of 512, at least 512."""
    return max(MIN_BLOCK, -(-nbytes // MIN_BLOCK) * MIN_BLOCK)


def segment_size(size: int) -> int:
    """The ``cudaMalloc`` size of a new segment for a rounded request that found no free block."""
    if size <= SMALL_SIZE:
        return SMALL_SEGMENT
    if size < MIN_LARGE_ALLOC:
        return LARGE_SEGMENT
    return -(-size // ROUND_LARGE) * ROUND_LARGE


@dataclass(slots=True)
class _Block:
    addr: int
    size: int
    small: bool
    free: bool = True
    prev: _Block | None = field(default=None, repr=False)
    next: _Block | None = field(default=None, repr=False)


class OutOfMemory(Exception):
    """A request the allocator cannot serve within its capacity even after releasing every cached free segment."""


class CachingAllocator:
    """Replays ``malloc`` / ``free`` like PyTorch's CUDA caching allocator and keeps the peaks.

    ``capacity``: the device memory the allocator may hold (None: unlimited). When a new segment would pass it,
    PyTorch does not fail at once: it gives cached segments that are wholly free back to the driver (first the
    smallest one large enough for the request, else the largest ones until enough is released;
    ``release_available_cached_blocks``), then every wholly free segment (``release_cached_blocks``), and only then
    raises out of memory.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self._pools: dict[bool, list[tuple[int, int]]] = {True: [], False: []}  # (size, addr) of free blocks, sorted
        self._blocks: dict[int, _Block] = {}  # addr -> block (free or not)
        self._next_addr = 1 << 40
        self.capacity = capacity
        self.allocated = 0
        self.reserved = 0
        self.peak_allocated = 0
        self.peak_reserved = 0
        self.segments = 0
        self.idle = 0  # bytes in cached segments with nothing allocated (what a release could give back)
        self.peak_in_use = 0  # peak of reserved - idle: the segments holding live blocks

    def reset_peak(self) -> None:
        """Start the peaks from now (``torch.cuda.reset_peak_memory_stats``)."""
        self.peak_allocated = self.allocated
        self.peak_reserved = self.reserved
        self.peak_in_use = self.reserved - self.idle

    def malloc(self, nbytes: int) -> int:
        """Serve a request of ``nbytes``; returns a handle (the block's address) for ``free``."""
        size = -(-nbytes // MIN_BLOCK) * MIN_BLOCK if nbytes > MIN_BLOCK else MIN_BLOCK  # round_size, inlined (hot path)
        small = size <= SMALL_SIZE
        pool = self._pools[small]
        i = bisect.bisect_left(pool, (size, -1))
        if i < len(pool):
            _, addr = pool.pop(i)
            block = self._blocks[addr]
            if block.prev is None and block.next is None:
                self.idle -= block.size
        else:
            seg = segment_size(size)
            if self.capacity is not None and self.reserved + seg > self.capacity:
                self._make_room(seg, small)
            block = _Block(addr=self._next_addr, size=seg, small=small)
            self._next_addr += seg + ROUND_LARGE  # segments never touch: blocks of two never merge
            self._blocks[block.addr] = block
            self.reserved += seg
            self.segments += 1
            if self.reserved > self.peak_reserved:
                self.peak_reserved = self.reserved
        rest = block.size - size
        if (rest >= MIN_BLOCK) if small else (rest > SMALL_SIZE):
            tail = _Block(addr=block.addr + size, size=rest, small=small, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = tail
            block.next = tail
            block.size = size
            self._blocks[tail.addr] = tail
            bisect.insort(pool, (tail.size, tail.addr))
        block.free = False
        self.allocated += block.size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        if self.reserved - self.idle > self.peak_in_use:
            self.peak_in_use = self.reserved - self.idle
        return block.addr

    def _whole_free(self, small: bool | None) -> list[_Block]:
        """Cached segments with nothing allocated in them (one free block spanning the segment)."""
        pools = (small,) if small is not None else (True, False)
        return [self._blocks[a] for p in pools for _, a in self._pools[p]
                if self._blocks[a].prev is None and self._blocks[a].next is None]

    def _release(self, block: _Block) -> None:
        _take(self._pools[block.small], block)
        del self._blocks[block.addr]
        self.reserved -= block.size
        self.idle -= block.size
        self.segments -= 1

    def _make_room(self, seg: int, small: bool) -> None:
        """Give cached free segments back until a new segment of ``seg`` bytes fits the capacity, or fail."""
        assert self.capacity is not None
        need = self.reserved + seg - self.capacity
        cands = sorted(self._whole_free(small), key=lambda b: (b.size, b.addr))
        big = [b for b in cands if b.size >= need]
        if big:
            self._release(big[0])
        else:
            for b in reversed(cands):
                if self.reserved + seg <= self.capacity:
                    break
                self._release(b)
        if self.reserved + seg > self.capacity:
            for b in self._whole_free(None):
                self._release(b)
        if self.reserved + seg > self.capacity:
            raise OutOfMemory(f"{seg} bytes more would pass the capacity: {self.allocated} allocated, {self.reserved} reserved")

    def free(self, handle: int) -> None:
        """Give a block back to its pool, merged with free neighbours of the same segment."""
        block = self._blocks[handle]
        if block.free:
            raise ValueError(f"block {handle:#x} freed twice")
        self.allocated -= block.size
        block.free = True
        pool = self._pools[block.small]
        for other in (block.prev, block.next):
            if other is not None and other.free:
                _take(pool, other)
                del self._blocks[other.addr]
                if other is block.prev:
                    other.size += block.size
                    other.next = block.next
                    if block.next is not None:
                        block.next.prev = other
                    del self._blocks[block.addr]
                    block = other
                else:
                    block.size += other.size
                    block.next = other.next
                    if other.next is not None:
                        other.next.prev = block
        self._blocks[block.addr] = block
        bisect.insort(pool, (block.size, block.addr))
        if block.prev is None and block.next is None:
            self.idle += block.size


def _take(pool: list[tuple[int, int]], block: _Block) -> None:
    """Remove a free block from its sorted pool (found by bisection: pools hold thousands of blocks)."""
    i = bisect.bisect_left(pool, (block.size, block.addr))
    del pool[i]

