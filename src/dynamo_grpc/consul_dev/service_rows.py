"""A service's instances as health queries read them, indexed by tag, rebuilt once per service index.

Every write re-checks every health query that has blocked readers (query_watch.py), and a sharded watch
is 17 queries per service (one per shard tag and a catch-all): scanning all 1,000 instances for each of
them was ~17,000 rows per write, 10-40 ms of agent CPU between a change and its first answer on the
2-vCPU VM (`bench discovery --trace`, stage ``woke``). With a tag -> rows index a tagged query visits
only the rows carrying its rarest tag (one shard's ~60), so the rows visited per write are about the
number of instances, once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dynamo_grpc.consul_dev.state import Check, Service, Store

Row = tuple[Service, list[Check], frozenset[str]]


@dataclass
class ServiceRows:
    """Rows (service, its checks with the node's, lower-cased tags) in ID order, and per tag the rows
    carrying it (same order), at the service index ``index``."""

    index: int
    rows: list[Row]
    by_tag: dict[str, list[Row]] = field(default_factory=dict)

    @classmethod
    def build(cls, store: Store, name: str, index: int) -> ServiceRows:
        rows = [(svc, checks, frozenset(t.lower() for t in svc.tags)) for svc, checks in store.service_entries(name)]
        by_tag: dict[str, list[Row]] = {}
        for row in rows:
            for tag in row[2]:
                by_tag.setdefault(tag, []).append(row)
        return cls(index, rows, by_tag)

    def candidates(self, tags: tuple[str, ...], tag_filter: tuple[str, bool] | None = None) -> list[Row]:
        """The rows that may answer a query for all of ``tags`` (lower-cased) and the ``filter`` (tag,
        wanted): those with the rarest wanted tag, none when an unwanted tag is on every row (the
        catch-all query of a fleet that is all sharded), else all rows. The caller still checks each row."""
        wanted = [*tags, tag_filter[0]] if tag_filter is not None and tag_filter[1] else list(tags)
        if wanted:
            return min((self.by_tag.get(t, []) for t in wanted), key=len)
        if tag_filter is not None and len(self.by_tag.get(tag_filter[0], ())) == len(self.rows):
            return []
        return self.rows
