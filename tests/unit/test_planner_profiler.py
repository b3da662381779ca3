"""The profiler's decode sweep stops at what the worker's KV cache holds (Dynamo's profiler sweeps decode
concurrency from 1 to the requests the cache can hold): hand-computed cases of that limit, and reading the cache
size from the worker's Consul registration (the Meta a real worker publishes, worker/app.py)."""

from __future__ import annotations

from dynamo_grpc.planner.profiler import decode_concurrencies, kv_concurrency, worker_kv


def test_kv_concurrency_counts_whole_blocks_per_stream() -> None:
    # the bench's worker: 96 blocks of 64 tokens; a stream of 512 + 64 tokens takes 9 blocks -> 10 streams
    assert kv_concurrency(96, 64, 512, 64) == 10
    assert kv_concurrency(96, 64, 1024, 64) == 5  # 1088 tokens -> 17 blocks -> 5 streams (85 blocks)
    assert kv_concurrency(96, 64, 2048, 64) == 2  # 2112 tokens -> 33 blocks
    assert kv_concurrency(16, 64, 2048, 64) == 0  # one stream does not fit


def test_the_decode_sweep_keeps_what_fits_and_measures_the_limit_itself() -> None:
    wanted = [1, 2, 4, 6, 8]
    assert decode_concurrencies(wanted, 10) == [1, 2, 4, 6, 8]  # all fit: nothing added beyond the sweep
    assert decode_concurrencies(wanted, 5) == [1, 2, 4, 5]  # 6 and 8 would queue for blocks: 5 instead
    assert decode_concurrencies(wanted, 2) == [1, 2]
    assert decode_concurrencies([8, 1, 8], None) == [1, 8]  # cache unknown: the sweep as asked


def test_worker_kv_reads_the_registration() -> None:
    metas = [{"grpc_address": "127.0.0.1:1"}, {"kv_blocks": "96", "block_size": "64", "role": "both"}]
    assert worker_kv(metas) == (96, 64)
    assert worker_kv([{"kv_blocks": "x", "block_size": "64"}]) is None
    assert worker_kv([]) is None
