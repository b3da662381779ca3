"""One way to build gRPC servers and channels for every process of the mesh."""

from dynamo_grpc.transport.channel import ChannelOptions, open_channel
from dynamo_grpc.transport.server import GrpcServer, ServerOptions, run_until_signal

__all__ = ["ChannelOptions", "GrpcServer", "ServerOptions", "open_channel", "run_until_signal"]
