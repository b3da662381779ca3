"""KV block manager: tiers below the engine's device cache (G2 host memory, G3 local disk).

Blocks the engine evicts from its device cache (G1) are offloaded to host memory (G2), and from
there to local disk (G3); a prefix lookup that misses G1 asks G2 then G3 and onboards the hits
instead of recomputing them. Pure Python over an executor-supplied :class:`BlockIO` (the torch
executor moves real tensors, the mocker only models the bandwidth); no grpc, no asyncio.

- ``config.py``: the capacities and modelled bandwidths (``--kv-host-mib``, ``--kv-disk-dir``, ...);
- ``tier.py``: the tier interface, its block metadata, and the G2 host pool (LRU over slots);
- ``disk.py``: the G3 store (one file per block, header with layout and checksum, writer thread);
- ``manager.py``: the offload/onboard plan of one engine step, events and counters.

G4 (a shared object store) is not built; a new :class:`~.tier.Tier` slots in below G3.
"""

from dynamo_grpc.kvbm.config import KvbmConfig
from dynamo_grpc.kvbm.manager import BlockIO, TierManager
from dynamo_grpc.kvbm.tier import BlockMeta, Medium

__all__ = ["BlockIO", "BlockMeta", "KvbmConfig", "Medium", "TierManager"]
