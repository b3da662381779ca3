"""Where the planner's decisions take effect: ``local`` (worker processes on this machine) or ``kubernetes``."""

from dynamo_grpc.planner.connectors.base import Connector, ConnectorError

__all__ = ["Connector", "ConnectorError"]
