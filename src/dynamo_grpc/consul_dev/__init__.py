"""consul-dev: an embedded agent speaking the subset of Consul's HTTP API dynamo-grpc uses.

It exists for machines without a Consul binary (tests, run-local). The discovery client talks to it
exactly as it talks to a real agent; a restart loses all state, like ``consul agent -dev``.
"""

from dynamo_grpc.consul_dev.server import ConsulDevServer

__all__ = ["ConsulDevServer"]
