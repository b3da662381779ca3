"""The mocker engine: vLLM-like scheduling, prefix caching and KV events with a timing model, no model."""

from dynamo_grpc.engines.mocker.config import MockerConfig
from dynamo_grpc.engines.mocker.engine import MockerEngine

__all__ = ["MockerConfig", "MockerEngine"]
