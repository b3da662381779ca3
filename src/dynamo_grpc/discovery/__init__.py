"""The discovery plane: Consul services with TTL checks, blocking-query watches, model cards in KV."""

from dynamo_grpc.discovery.acl import ConsulPermissionDenied
from dynamo_grpc.discovery.client import CARD_PREFIX, Discovery, Instance, card_key
from dynamo_grpc.discovery.config import ConsulSettings

__all__ = ["CARD_PREFIX", "ConsulPermissionDenied", "ConsulSettings", "Discovery", "Instance", "card_key"]
