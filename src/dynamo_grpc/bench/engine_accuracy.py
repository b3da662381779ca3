"""What a faster weight mode costs in accuracy: greedy agreement with fp32, and perplexity on a small text.

Agreement: over the benchmark's prompts, the share of requests whose greedy output equals fp32's, and
the share of fp32's tokens reproduced before the first divergence. Perplexity: one prefill of
``TEXT`` (a fixed English passage), teacher-forced, through the engine's own model; decode perplexity:
the same text fed one token per step as decodes, since some modes (w4a8) change only the few-row
decode matmuls and prefill runs the fp32 GEMM.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dynamo_grpc.engines.torch import TorchEngine
from dynamo_grpc.engines.torch.model import AttnBatch, DecodeGroup, PrefillSegment

TEXT = (
    "The water cycle describes how water moves between the oceans, the air and the land. Heat from the sun "
    "evaporates water from seas, lakes and rivers, and plants release vapour through their leaves. As the "
    "warm, moist air rises it cools, and the vapour condenses into tiny droplets that form clouds. When the "
    "droplets grow heavy enough they fall as rain, snow or hail. Some of this water soaks into the ground and "
    "refills underground stores called aquifers; some runs off over the surface into streams that carry it "
    "back to the sea. Glaciers and ice caps hold a large share of the planet's fresh water for thousands of "
    "years before it melts. Scientists study the cycle closely because small changes in temperature can shift "
    "where and when rain falls, which matters for farming, for cities and for the plants and animals that "
    "depend on a steady supply of fresh water. Measuring rainfall, river flow and soil moisture over many "
    "years lets researchers build models that predict droughts and floods, and those forecasts help people "
    "plan how to store and share water when it is scarce."
)


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict[str, Any]:
    """Identical outputs, and tokens matching fp32's up to the first divergence, over the same prompts."""
    same = sum(a == b for a, b in zip(reference, other, strict=True))
    matched = 0
    for a, b in zip(reference, other, strict=True):
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            matched += 1
    total = sum(len(a) for a in reference)
    return {
        "identical_requests": f"{same}/{len(reference)}",
        "identical_rate": same / len(reference) if reference else 1.0,
        "token_agreement": matched / total if total else 1.0,
    }


@torch.inference_mode()
def perplexity(eng: TorchEngine, ids: list[int]) -> float:
    """exp(mean NLL of each next token), one prefill into slots 0.. (call only with the engine stopped)."""
    n = min(len(ids), eng.kv.num_blocks * eng.kv.block_size)
    ids = ids[:n]
    batch = AttnBatch(torch.arange(n), torch.arange(n), [], [PrefillSegment(0, n, 0, None)])
    logits = eng.model.forward(torch.tensor(ids), batch, eng.kv, torch.arange(n - 1))
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    return math.exp(float(nll))


@torch.inference_mode()
def hf_perplexity(hf: Any, ids: list[int]) -> float:
    out = hf(torch.tensor([ids]), labels=torch.tensor([ids]))
    return math.exp(float(out.loss))


@torch.inference_mode()
def decode_perplexity(eng: TorchEngine, ids: list[int]) -> float:
    """Like :func:`perplexity`, one token per forward pass through the decode path (slots 0..)."""
    bs = eng.kv.block_size
    n = min(len(ids), eng.kv.num_blocks * bs)
    table = torch.arange(-(-n // bs)).unsqueeze(0)
    nll = 0.0
    for pos in range(n - 1):
        width = pos // bs + 1
        mask = (torch.arange(width * bs) <= pos).view(1, 1, 1, -1)
        group = DecodeGroup(0, 1, table[:, :width].contiguous(), mask, torch.tensor([pos + 1]))
        batch = AttnBatch(torch.tensor([pos]), torch.tensor([pos]), [group], [])
        logits = eng.model.forward(torch.tensor([ids[pos]]), batch, eng.kv, torch.tensor([0]))
        nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor([ids[pos + 1]])))
    return math.exp(nll / (n - 1))
