"""In-flight load per worker rank, from the router's own decisions and its replicas'.

Route adds a sequence (pending prefill blocks + the blocks it will occupy while decoding);
Update(PREFILL_DONE) clears its prefill part; Update(FREE) removes it. Sequences nobody
frees expire after a TTL, so a lost FREE cannot pin load on a worker forever.
Every change to a worker's sums is also reported to ``on_delta`` (the router's dense
:class:`~dynamo_grpc.router.ranks.RankTable`), so a decision never walks this dict.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

WorkerKey = Hashable


@dataclass
class ActiveSequence:
    worker: WorkerKey
    prefill_blocks: int
    decode_blocks: int
    prompt_tokens: int
    router_id: str
    updated: float
    #: prompt blocks already cached there when routed: shared, so not counted in decode_blocks
    shared_blocks: int = 0


@dataclass
class WorkerActive:
    prefill_blocks: int = 0
    decode_blocks: int = 0
    sequences: int = 0


class ActiveSequences:
    """Sums of active prefill/decode blocks per worker rank."""

    def __init__(self, block_size: int, ttl_s: float = 900.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.block_size = block_size
        self.ttl_s = ttl_s
        self.clock = clock
        self._seqs: dict[str, ActiveSequence] = {}
        self._per_worker: dict[WorkerKey, WorkerActive] = {}
        #: called with (worker, d_prefill_blocks, d_decode_blocks) on every change of a worker's sums
        self.on_delta: Callable[[WorkerKey, int, int], None] | None = None

    def load(self, worker: WorkerKey) -> WorkerActive:
        return self._per_worker.get(worker) or WorkerActive()

    def __len__(self) -> int:
        return len(self._seqs)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._seqs

    def get(self, request_id: str) -> ActiveSequence | None:
        return self._seqs.get(request_id)

    def add(
        self,
        request_id: str,
        worker: WorkerKey,
        prefill_blocks: int,
        decode_blocks: int,
        prompt_tokens: int = 0,
        router_id: str = "",
        shared_blocks: int = 0,
    ) -> None:
        """A sequence was routed (replaces an earlier entry with the same id: a migration moves its load)."""
        self.free(request_id)
        seq = ActiveSequence(
            worker, prefill_blocks, decode_blocks, prompt_tokens, router_id, self.clock(), shared_blocks
        )
        self._seqs[request_id] = seq
        w = self._per_worker.setdefault(worker, WorkerActive())
        w.prefill_blocks += prefill_blocks
        w.decode_blocks += decode_blocks
        w.sequences += 1
        if self.on_delta is not None:
            self.on_delta(worker, prefill_blocks, decode_blocks)

    def prefill_done(self, request_id: str) -> bool:
        seq = self._seqs.get(request_id)
        if seq is None:
            return False
        w = self._per_worker[seq.worker]
        w.prefill_blocks -= seq.prefill_blocks
        if self.on_delta is not None and seq.prefill_blocks:
            self.on_delta(seq.worker, -seq.prefill_blocks, 0)
        seq.prefill_blocks = 0
        seq.updated = self.clock()
        return True

    def grow(self, request_id: str, output_tokens: int) -> bool:
        """Output grew to ``output_tokens``: the sequence occupies more blocks."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return False
        blocks = -(-(seq.prompt_tokens + output_tokens) // self.block_size) if self.block_size else 0
        blocks -= seq.shared_blocks
        if blocks > seq.decode_blocks:
            self._per_worker[seq.worker].decode_blocks += blocks - seq.decode_blocks
            if self.on_delta is not None:
                self.on_delta(seq.worker, 0, blocks - seq.decode_blocks)
            seq.decode_blocks = blocks
        seq.updated = self.clock()
        return True

    def free(self, request_id: str) -> bool:
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        w = self._per_worker[seq.worker]
        w.prefill_blocks -= seq.prefill_blocks
        w.decode_blocks -= seq.decode_blocks
        w.sequences -= 1
        if w.sequences == 0:
            del self._per_worker[seq.worker]
        if self.on_delta is not None:
            self.on_delta(seq.worker, -seq.prefill_blocks, -seq.decode_blocks)
        return True

    def remove_worker(self, worker: WorkerKey) -> int:
        """The worker died: its sequences are gone (the frontend migrates them)."""
        ids = [rid for rid, s in self._seqs.items() if s.worker == worker]
        for rid in ids:
            self.free(rid)
        return len(ids)

    def of_router(self, router_id: str) -> list[tuple[str, ActiveSequence]]:
        """The sequences routed by ``router_id`` (a replica's whole share, for snapshots)."""
        return [(rid, s) for rid, s in self._seqs.items() if s.router_id == router_id]

    def drop_router(self, router_id: str) -> int:
        """A replica died: what it routed no longer counts here (its own frees will never come)."""
        ids = [rid for rid, s in self._seqs.items() if s.router_id == router_id]
        for rid in ids:
            self.free(rid)
        return len(ids)

    def expire(self) -> int:
        """Drop sequences not updated within the TTL (insertion order is roughly age order)."""
        cutoff = self.clock() - self.ttl_s
        ids = [rid for rid, s in self._seqs.items() if s.updated < cutoff]
        for rid in ids:
            self.free(rid)
        return len(ids)
