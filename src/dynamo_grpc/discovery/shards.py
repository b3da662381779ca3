"""Sharded watches: what each watcher parses per change is one shard's answer, not the whole service's.

A health answer for 1,000 instances is ~1.4 MB of JSON (~25 ms to parse in Python on an idle core); 50
watchers woken by one change parse it 50 times over on a small machine, which is where seconds of
propagation went. Every instance registered through ``Discovery.register`` carries one tag
``dyn-shard=<k>`` (``k`` = crc32 of its instance ID mod ``SHARDS``), and ``Discovery.watch`` runs one
blocking query per shard (``tag=dyn-shard=<k>`` plus the caller's tags) and merges the views. Each shard's
raw answer is hashed before parsing, so an answer whose bytes did not change is never parsed:

- consul-dev answers a blocking query when *that query's* answer changes, so one change wakes one shard
  query per watcher (~60 entries to parse instead of 1,000);
- a real Consul agent wakes every query of the service on any change to it (its index is per service);
  the unchanged shards then cost a hash of their bytes (~1 ms per MB), and only the changed one is parsed.

Every registration also carries ``dyn-sharded``, and the watch runs one more query for the instances
*without* it (``filter=Service.Tags not contains "dyn-sharded"``, a Consul filter expression): instances
registered by other tools (or by hand) are still seen, while that answer stays empty, and unchanged, in a
fleet of our own. ``Discovery(sharded_watch=False)`` watches the whole service in one query instead.
"""

from __future__ import annotations

import zlib

SHARDS = 16
SHARD_TAG = "dyn-shard="
#: on every registration that carries a shard tag; the catch-all query asks for instances without it
SHARDED = "dyn-sharded"
UNSHARDED_FILTER = f'Service.Tags not contains "{SHARDED}"'


def shard_of(instance_id: str, shards: int = SHARDS) -> int:
    """The shard an instance ID falls in: stable across processes, versions and restarts."""
    return zlib.crc32(instance_id.encode()) % shards


def shard_tag(instance_id: str, shards: int = SHARDS) -> str:
    return f"{SHARD_TAG}{shard_of(instance_id, shards)}"


def shard_tags(shards: int = SHARDS) -> list[str]:
    """One tag per shard, the tags a sharded watch queries."""
    return [f"{SHARD_TAG}{k}" for k in range(shards)]


def with_shard_tag(tags: list[str], instance_id: str, shards: int = SHARDS) -> list[str]:
    """``tags`` plus this instance's shard tag (replacing any other) and the ``dyn-sharded`` marker."""
    return [*without_shard_tags(tags), shard_tag(instance_id, shards), SHARDED]


def without_shard_tags(tags: list[str]) -> list[str]:
    """The tags a caller registered: the shard tag is the discovery client's own business."""
    return [t for t in tags if not t.startswith(SHARD_TAG) and t != SHARDED]
