"""The mocker engine: the engine core (scheduling, prefix caching, KV events) with a simulator as executor."""

from dynamo_grpc.engines.mocker.config import MockerConfig
from dynamo_grpc.engines.mocker.engine import MockerEngine

__all__ = ["MockerConfig", "MockerEngine"]
