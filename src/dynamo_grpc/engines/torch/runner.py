"""Turn a SchedulerOutput into model inputs (token ids, positions, slots) and run one step."""

from __future__ import annotations

import torch

from .kv_cache import KvCache
from .kv_manager import KvCacheManager
from .model import AttnBatch, LlamaModel, PrefillSegment
from .scheduler import ScheduledSeq, SchedulerOutput


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KvCache, manager: KvCacheManager) -> None:
        self.model = model
        self.kv = kv
        self.manager = manager

    def build(self, out: SchedulerOutput) -> tuple[torch.Tensor, AttnBatch, list[ScheduledSeq], torch.Tensor]:
        """Flatten the step: decodes first (one row each), then prefill chunks."""
        bs = self.kv.block_size
        decodes = [s for s in out.seqs if s.num_new_tokens == 1 and s.start > 0]
        prefills = [s for s in out.seqs if not (s.num_new_tokens == 1 and s.start > 0)]
        prefill_ids = {id(s) for s in prefills}
        ordered = decodes + prefills
        ids: list[int] = []
        pos: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        logit_rows: list[int] = []
        sampling: list[ScheduledSeq] = []
        segs: list[PrefillSegment] = []
        row = 0
        dec_slots: torch.Tensor | None = None
        dec_mask: torch.Tensor | None = None
        if decodes:
            lens = [s.start + 1 for s in decodes]
            L = max(lens)
            tables = torch.zeros(len(decodes), -(-L // bs), dtype=torch.long)
            for i, s in enumerate(decodes):
                bids = self.manager.block_ids(s.request.request_id)
                tables[i, : len(bids)] = torch.tensor(bids[: tables.shape[1]], dtype=torch.long)
            p = torch.arange(L)
            dec_slots = tables[:, p // bs] * bs + p % bs
            lens_t = torch.tensor(lens)
            dec_mask = (p.unsqueeze(0) < lens_t.unsqueeze(1)).view(len(decodes), 1, 1, L)
            dec_slots = dec_slots.masked_fill(~dec_mask.view(len(decodes), L), 0)
        for s in ordered:
            req = s.request
            end = s.start + s.num_new_tokens
            ids.extend(req.all_token_ids[s.start : end])
            bids = self.manager.block_ids(req.request_id)
            all_slots = self.kv.slots_for(bids, 0, end)
            pos.append(torch.arange(s.start, end))
            slots.append(all_slots[s.start :])
            if id(s) in prefill_ids:
                segs.append(PrefillSegment(row, s.num_new_tokens, s.start, all_slots if s.start else None))
            row += s.num_new_tokens
            if s.samples:
                logit_rows.append(row - 1)
                sampling.append(s)
        batch = AttnBatch(
            positions=torch.cat(pos),
            slot_mapping=torch.cat(slots),
            num_decodes=len(decodes),
            decode_slots=dec_slots,
            decode_mask=dec_mask,
            prefills=segs,
        )
        return (
            torch.tensor(ids, dtype=torch.long),
            batch,
            sampling,
            torch.tensor(logit_rows, dtype=torch.long),
        )

    def execute(self, out: SchedulerOutput) -> tuple[list[ScheduledSeq], torch.Tensor]:
        """Run the step; returns the sequences that sample and their logits (same order)."""
        ids, batch, sampling, rows = self.build(out)
        if not sampling:
            rows = torch.tensor([len(ids) - 1], dtype=torch.long)
            self.model.forward(ids, batch, self.kv, rows)
            return [], torch.empty(0)
        return sampling, self.model.forward(ids, batch, self.kv, rows)
