"""The caching-allocator model the trace replays into: PyTorch's default rules, one by one."""

from __future__ import annotations

from airpack.vram_alloc import LARGE_SEGMENT, SMALL_SEGMENT, CachingAllocator, round_size, segment_size

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

