"""The event plane: workers publish KV events over ZeroMQ PUB; routers subscribe and replay gaps.

Frames are ``[topic, seq (u64 big-endian), protobuf payload]`` with topics ``kv.<model>``
(KvEventBatch), ``load.<model>`` (LoadMetrics) and ``active.<model>`` (ActiveSequences, router
replicas). See DESIGN.md, "Planes".
"""

from dynamo_grpc.events.publisher import KvEventPublisher
from dynamo_grpc.events.topics import active_topic, kv_topic, load_topic

__all__ = ["KvEventPublisher", "active_topic", "kv_topic", "load_topic"]
