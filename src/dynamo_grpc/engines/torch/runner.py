"""Turn a SchedulerOutput into model inputs (token ids, positions, slots, block tables) and run one step."""

from __future__ import annotations

import torch

from .kv_cache import KvCache
from .kv_manager import KvCacheManager
from .model import AttnBatch, DecodeGroup, LlamaModel, PrefillSegment
from .scheduler import ScheduledSeq, SchedulerOutput

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


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KvCache, manager: KvCacheManager) -> None:
        self.model = model
        self.kv = kv
        self.manager = manager

    def build(self, out: SchedulerOutput) -> tuple[torch.Tensor, AttnBatch, list[ScheduledSeq], torch.Tensor]:
        """Flatten the step: decodes first (ascending length, in groups), then prefill chunks."""
        bs = self.kv.block_size
        decodes = [s for s in out.seqs if s.num_new_tokens == 1 and s.start > 0]
        prefills = [s for s in out.seqs if not (s.num_new_tokens == 1 and s.start > 0)]
        decodes.sort(key=lambda s: s.start)
        tables = {id(s): self.manager.block_ids(s.request.request_id) for s in out.seqs}
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        logit_rows: list[int] = []
        sampling: list[ScheduledSeq] = []
        row = 0
        for s in decodes + prefills:
            end = s.start + s.num_new_tokens
            ids.extend(s.request.all_token_ids[s.start : end])
            table = tables[id(s)]
            for p in range(s.start, end):
                pos.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            row += s.num_new_tokens
            if s.samples:
                logit_rows.append(row - 1)
                sampling.append(s)

        groups: list[DecodeGroup] = []
        nblk = [s.start // bs + 1 for s in decodes]
        lo = 0
        for hi in split_by_length(nblk):
            width = nblk[hi - 1]
            t = torch.zeros(hi - lo, width, dtype=torch.long)
            lens = torch.empty(hi - lo, dtype=torch.long)
            for i, s in enumerate(decodes[lo:hi]):
                table = tables[id(s)][:width]
                t[i, : len(table)] = torch.tensor(table, dtype=torch.long)
                lens[i] = s.start + 1
            mask = torch.arange(width * bs).unsqueeze(0) < lens.unsqueeze(1)
            groups.append(DecodeGroup(lo, hi - lo, t, mask.view(hi - lo, 1, 1, width * bs)))
            lo = hi

        segs: list[PrefillSegment] = []
        row = len(decodes)
        for s in prefills:
            blocks = None
            if s.start:
                need = -(-(s.start + s.num_new_tokens) // bs)
                blocks = torch.tensor(tables[id(s)][:need], dtype=torch.long)
            segs.append(PrefillSegment(row, s.num_new_tokens, s.start, blocks))
            row += s.num_new_tokens

        batch = AttnBatch(
            positions=torch.tensor(pos, dtype=torch.long),
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            decodes=groups,
            prefills=segs,
        )
        rows = torch.tensor(logit_rows, dtype=torch.long)
        return torch.tensor(ids, dtype=torch.long), batch, sampling, rows

    def execute(self, out: SchedulerOutput) -> tuple[list[ScheduledSeq], torch.Tensor]:
        """Run the step; returns the sequences that sample and their logits (same order)."""
        ids, batch, sampling, rows = self.build(out)
        if not sampling:
            rows = torch.tensor([len(ids) - 1], dtype=torch.long)
            self.model.forward(ids, batch, self.kv, rows)
            return [], torch.empty(0)
        return sampling, self.model.forward(ids, batch, self.kv, rows)
