"""The torch executor's own rules (its scheduling is the engine core's, tested against both executors)."""

from __future__ import annotations

from dynamo_grpc.engines.torch.runner import split_by_length


def test_decode_groups_split_by_length() -> None:
    assert split_by_length([]) == []
    assert split_by_length([3, 3, 3]) == [3]  # one length: one group
    assert split_by_length([1, 1, 1, 1, 40, 40]) == [4, 6]  # short ones are not padded to 40
    lens = sorted((i * 37) % 300 + 1 for i in range(200))  # many distinct lengths: quantile groups
    cuts = split_by_length(lens)
    assert cuts[-1] == 200 and len(cuts) <= 4 and cuts == sorted(set(cuts))
