"""The caching-allocator model the trace replays into: PyTorch's default rules, one by one."""

from __future__ import annotations

import pytest

from airpack.vram_alloc import LARGE_SEGMENT, SMALL_SEGMENT, CachingAllocator, OutOfMemory, round_size, segment_size

MiB = 1 << 20


def test_requests_round_to_512_bytes() -> None:
    assert (round_size(1), round_size(512), round_size(513), round_size(0)) == (512, 512, 1024, 512)


def test_segment_sizes_by_pool() -> None:
    assert segment_size(1 * MiB) == SMALL_SEGMENT
    assert segment_size(1 * MiB + 512) == LARGE_SEGMENT
    assert segment_size(10 * MiB - 512) == LARGE_SEGMENT
    assert segment_size(10 * MiB + 1) == 12 * MiB  # its own segment, rounded to 2 MiB


def test_small_requests_share_a_2_mib_segment() -> None:
    a = CachingAllocator()
    for _ in range(4):
        a.malloc(256 * 1024)
    assert (a.allocated, a.reserved, a.segments) == (1 * MiB, SMALL_SEGMENT, 1)


def test_mid_requests_are_carved_from_20_mib_segments() -> None:
    a = CachingAllocator()
    a.malloc(8 * MiB)
    a.malloc(8 * MiB)
    assert a.reserved == LARGE_SEGMENT  # 8 + 8 of one segment; the 4 MiB left is a free block
    a.malloc(8 * MiB)
    assert a.reserved == 2 * LARGE_SEGMENT


def test_a_block_is_not_split_when_the_rest_is_1_mib_or_less() -> None:
    a = CachingAllocator()
    h = a.malloc(12 * MiB)  # its own 12 MiB segment
    a.free(h)
    a.malloc(11 * MiB)  # 1 MiB would be left: the whole 12 MiB block is handed out
    assert (a.allocated, a.reserved) == (12 * MiB, 12 * MiB)


def test_freed_neighbours_merge_and_segments_are_kept() -> None:
    a = CachingAllocator()
    x = a.malloc(6 * MiB)
    y = a.malloc(6 * MiB)
    a.free(x)
    a.free(y)
    assert a.allocated == 0 and a.reserved == LARGE_SEGMENT  # never released
    a.malloc(18 * MiB)  # fits the merged 20 MiB block
    assert a.reserved == LARGE_SEGMENT and a.peak_allocated == 18 * MiB


def test_peaks_and_reset() -> None:
    a = CachingAllocator()
    h = a.malloc(40 * MiB)
    a.free(h)
    a.reset_peak()
    assert a.peak_allocated == 0 and a.peak_reserved == 40 * MiB
    a.malloc(1 * MiB)
    assert a.peak_allocated == 1 * MiB


def test_best_fit_takes_the_smallest_free_block() -> None:
    a = CachingAllocator()
    big = a.malloc(30 * MiB)
    small = a.malloc(12 * MiB)
    a.free(big)
    a.free(small)
    a.malloc(12 * MiB)
    a.malloc(30 * MiB)
    assert a.reserved == 42 * MiB  # each request reused the block of its size



def test_a_mid_request_is_split_from_a_segments_remainder() -> None:
    """12 MiB after 2 MiB: best fit over the large pool carves it from the 18 MiB the 20 MiB segment has left."""
    a = CachingAllocator()
    a.malloc(2 * MiB)
    a.malloc(12 * MiB)
    assert (a.reserved, a.segments) == (LARGE_SEGMENT, 1)


def test_at_capacity_idle_segments_are_given_back() -> None:
    """PyTorch frees cached segments nothing lives in (release_cached_blocks) before it fails; the peak in use does
    not count them, the peak reserved does."""
    a = CachingAllocator(capacity=64 * MiB)
    x = a.malloc(40 * MiB)
    a.free(x)  # a 40 MiB segment, cached, idle
    a.malloc(30 * MiB)  # reuses it (best fit): no new segment
    assert a.reserved == 40 * MiB
    b = CachingAllocator(capacity=64 * MiB)
    y = b.malloc(40 * MiB)
    b.free(y)
    b.malloc(50 * MiB)  # 40 + 50 > 64: the idle 40 MiB goes back first
    assert (b.reserved, b.peak_reserved, b.peak_in_use) == (50 * MiB, 50 * MiB, 50 * MiB)


def test_out_of_memory_when_live_blocks_leave_no_room() -> None:
    a = CachingAllocator(capacity=64 * MiB)
    a.malloc(40 * MiB)
    with pytest.raises(OutOfMemory):
        a.malloc(30 * MiB)
    assert a.allocated == 40 * MiB  # the refusal changed nothing


def test_peak_in_use_leaves_idle_segments_out() -> None:
    a = CachingAllocator()
    x = a.malloc(40 * MiB)
    a.free(x)
    a.malloc(50 * MiB)  # too big for the idle 40 MiB: a new segment, the old one stays cached
    assert (a.peak_reserved, a.peak_in_use) == (90 * MiB, 50 * MiB)
