"""The torch executor: a plan (SchedulerOutput) into model inputs (ids, positions, slots, block tables), one step."""

from __future__ import annotations

import torch

from dynamo_grpc.engines.core.output import ExecutorOutput, ScheduledChunk, SchedulerOutput

from .block_io import TorchBlockIO, weights_fingerprint
from .kv_cache import KvCache
from .model import AttnBatch, DecodeGroup, LlamaModel, PrefillSegment
from .sampler import SampleRow, make_generator, needs_sampling, sample

#: most decode groups per step; each costs a gather + attention call per layer
MAX_DECODE_GROUPS = 4
#: a group's fixed cost, in padded blocks of one sequence, when choosing the split
GROUP_COST_BLOCKS = 8


def split_by_length(nblocks: list[int], max_groups: int = MAX_DECODE_GROUPS) -> list[int]:
    """Cut points over ascending ``nblocks`` that minimise padded blocks plus a per-group cost.

    Padding every decode to the longest one wastes the gap; a few groups of similar length
    recover most of it. Returns group end indices (exclusive). The DP runs over distinct
    lengths (cuts inside a run of equal lengths never help), O(groups * distinct^2).
    """
    n = len(nblocks)
    if n == 0:
        return []
    ends: list[int] = []  # end index of each run of equal lengths
    for i in range(1, n + 1):
        if i == n or nblocks[i] != nblocks[i - 1]:
            ends.append(i)
    m = len(ends)
    if m > 64:  # many distinct lengths: equal-count groups are close enough and O(n)
        return sorted({min(n, -(-n * (k + 1) // max_groups)) for k in range(max_groups)})
    inf = float("inf")
    # best[k][r]: cost of the first r runs in k groups; runs j..r-1 in one group cost items * width
    best = [[inf] * (m + 1) for _ in range(max_groups + 1)]
    back = [[0] * (m + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0.0
    for k in range(1, max_groups + 1):
        for r in range(1, m + 1):
            width = nblocks[ends[r - 1] - 1]
            for j in range(k - 1, r):
                start = ends[j - 1] if j else 0
                c = best[k - 1][j] + (ends[r - 1] - start) * width + GROUP_COST_BLOCKS
                if c < best[k][r]:
                    best[k][r], back[k][r] = c, j
    k = min(range(1, max_groups + 1), key=lambda kk: best[kk][m])
    cuts = []
    r = m
    while k > 0:
        cuts.append(ends[r - 1])
        r = back[k][r]
        k -= 1
    return sorted(cuts)


class _Seq:
    """The runner's own view of a request: its block table and what sampling needs."""

    __slots__ = ("block_ids", "row")

    def __init__(self, row: SampleRow) -> None:
        self.block_ids: list[int] = []
        self.row = row


class ModelRunner:
    """The torch executor: turns a plan into model inputs, runs the model, samples.

    It keeps per-request block tables and sampling state (prompt, outputs so far, generator),
    updated from each plan's diffs; it never sees the scheduler, the KV manager or a live request.
    """

    unsupported_options: frozenset[str] = frozenset()
    supports_lora = False
    refusal = "is not supported by the torch engine"

    def __init__(self, model: LlamaModel, kv: KvCache) -> None:
        self.model = model
        self.kv = kv
        self.seqs: dict[str, _Seq] = {}

    def block_io(self) -> TorchBlockIO:
        """The KV tiers' access to this runner's paged cache (real tensors)."""
        return TorchBlockIO(self.kv, self.model.cfg, self.kv.k[0].dtype, weights_fingerprint(self.model.embed))

    def prepare(self, plan: SchedulerOutput) -> None:
        """Apply the plan's diffs: forget ended requests, learn new ones, extend block tables."""
        seqs = self.seqs
        for rid in plan.finished_ids:
            seqs.pop(rid, None)
        for nr in plan.new_requests:
            gen = make_generator(nr.sampling.seed)
            if nr.output_token_ids and needs_sampling(nr.sampling):
                # the tokens sampled elsewhere (the prefill worker's first) each took one draw: skip them, so a
                # seeded request gives the same tokens disaggregated as aggregated
                dummy = torch.ones(self.model.cfg.vocab_size)
                for _ in nr.output_token_ids:
                    torch.multinomial(dummy, 1, generator=gen)
            seqs[nr.request_id] = _Seq(
                SampleRow(nr.sampling, nr.prompt_token_ids, list(nr.output_token_ids), nr.eos_token_ids, gen)
            )
        for c in plan.chunks:
            seq = seqs[c.request_id]
            if c.reset_blocks:
                seq.block_ids = list(c.new_block_ids)
            elif c.new_block_ids:
                seq.block_ids.extend(c.new_block_ids)

    def build(self, plan: SchedulerOutput) -> tuple[torch.Tensor, AttnBatch, list[ScheduledChunk], torch.Tensor]:
        """Flatten the step: decodes first (ascending length, in groups), then prefill chunks."""
        bs = self.kv.block_size
        decodes = [c for c in plan.chunks if c.is_decode]
        prefills = [c for c in plan.chunks if not c.is_decode]
        decodes.sort(key=lambda c: c.start)
        tables = {c.request_id: self.seqs[c.request_id].block_ids for c in plan.chunks}
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        logit_rows: list[int] = []
        sampling: list[ScheduledChunk] = []
        row = 0
        for c in decodes + prefills:
            end = c.start + len(c.token_ids)
            ids.extend(c.token_ids)
            table = tables[c.request_id]
            for p in range(c.start, end):
                pos.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            row += len(c.token_ids)
            if c.samples:
                logit_rows.append(row - 1)
                sampling.append(c)

        groups: list[DecodeGroup] = []
        nblk = [c.start // bs + 1 for c in decodes]
        lo = 0
        for hi in split_by_length(nblk):
            width = nblk[hi - 1]
            t = torch.zeros(hi - lo, width, dtype=torch.long)
            lens = torch.empty(hi - lo, dtype=torch.long)
            for i, c in enumerate(decodes[lo:hi]):
                table = tables[c.request_id][:width]
                t[i, : len(table)] = torch.tensor(table, dtype=torch.long)
                lens[i] = c.start + 1
            mask = torch.arange(width * bs).unsqueeze(0) < lens.unsqueeze(1)
            groups.append(DecodeGroup(lo, hi - lo, t, mask.view(hi - lo, 1, 1, width * bs), lens))
            lo = hi

        segs: list[PrefillSegment] = []
        row = len(decodes)
        for c in prefills:
            blocks = None
            if c.start:
                need = -(-(c.start + len(c.token_ids)) // bs)
                blocks = torch.tensor(tables[c.request_id][:need], dtype=torch.long)
            segs.append(PrefillSegment(row, len(c.token_ids), c.start, blocks))
            row += len(c.token_ids)

        batch = AttnBatch(
            positions=torch.tensor(pos, dtype=torch.long),
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            decodes=groups,
            prefills=segs,
        )
        rows = torch.tensor(logit_rows, dtype=torch.long)
        return torch.tensor(ids, dtype=torch.long), batch, sampling, rows

    def forward(self, plan: SchedulerOutput) -> tuple[list[ScheduledChunk], torch.Tensor]:
        """Run the step's forward pass; returns the chunks that sample and their logits (same order)."""
        if not plan.chunks:
            return [], torch.empty(0)
        ids, batch, sampling, rows = self.build(plan)
        if not sampling:
            rows = torch.tensor([len(ids) - 1], dtype=torch.long)
            self.model.forward(ids, batch, self.kv, rows)
            return [], torch.empty(0)
        return sampling, self.model.forward(ids, batch, self.kv, rows)

    def export_blocks(self, block_ids: list[int]) -> bytes:
        return self.kv.export_blocks(block_ids)

    def export_views(self, block_ids: list[int]) -> list[memoryview]:
        return self.kv.export_views(block_ids)

    def import_views(self, block_ids: list[int]) -> list[memoryview]:
        return self.kv.import_views(block_ids)

    def execute(self, plan: SchedulerOutput) -> ExecutorOutput:
        self.prepare(plan)
        sampling, logits = self.forward(plan)
        if not sampling:
            return ExecutorOutput()
        rows = [self.seqs[c.request_id].row for c in sampling]
        tokens, lps = sample(logits, rows)
        out = ExecutorOutput()
        for c, row, tok, lp in zip(sampling, rows, tokens, lps, strict=True):
            row.output_token_ids.append(tok)
            out.sampled[c.request_id] = tok
            if lp is not None:
                out.logprobs[c.request_id] = lp
        return out
