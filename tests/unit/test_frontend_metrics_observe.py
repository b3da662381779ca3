"""The ITL histogram takes a (gap, tokens) pair in one call; it must read exactly as one observation per token."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram

from dynamo_grpc.frontend.metrics import ITL_BUCKETS, observe_n


def _series(reg: CollectorRegistry) -> dict[str, float]:
    return {
        f"{s.name}{sorted(s.labels.items())}": s.value
        for metric in reg.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    }


@pytest.mark.parametrize("pairs", [[(0.0004, 3)], [(0.001, 1), (0.001, 5)], [(0.02, 7), (3.0, 2), (0.0025, 16)]])
def test_observe_n_reads_as_one_observation_per_token(pairs: list[tuple[float, int]]) -> None:
    bulk, single = CollectorRegistry(), CollectorRegistry()
    hb = Histogram("itl", "itl", ["model"], buckets=ITL_BUCKETS, registry=bulk).labels("m")
    hs = Histogram("itl", "itl", ["model"], buckets=ITL_BUCKETS, registry=single).labels("m")
    for gap, n in pairs:
        observe_n(hb, gap, n)
        for _ in range(n):
            hs.observe(gap)
    got, want = _series(bulk), _series(single)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k]), k
    assert want["itl_count[('model', 'm')]"] == sum(n for _, n in pairs)
