"""The virtual connector: replica counts held in memory, nothing started (``--connector virtual``).

For a dry run (what would the planner do with this profile and this traffic?) and for an external orchestrator
that reads the planner's ``dynamo_planner_target_replicas`` metric and acts on it itself.
"""

from __future__ import annotations

from dynamo_grpc.planner.connectors.base import ConnectorError


class VirtualConnector:
    def __init__(self, pools: list[str], initial: int = 0) -> None:
        self.counts = {pool: initial for pool in pools}
        #: (pool, before, after) of every change
        self.changes: list[tuple[str, int, int]] = []

    async def replicas(self) -> dict[str, int]:
        return dict(self.counts)

    async def scale(self, pool: str, replicas: int) -> None:
        if pool not in self.counts:
            raise ConnectorError(f"unknown pool {pool!r} (pools: {', '.join(self.counts)})")
        if replicas < 0:
            raise ConnectorError(f"pool {pool}: replicas must be >= 0, got {replicas}")
        self.changes.append((pool, self.counts[pool], replicas))
        self.counts[pool] = replicas

    async def close(self) -> None:
        return None
