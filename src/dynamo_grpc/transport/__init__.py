"""One way to build gRPC servers and channels for every process of the mesh."""

from dynamo_grpc.transport.channel import ChannelOptions, open_channel, use_tls
from dynamo_grpc.transport.server import GrpcServer, ServerOptions, run_until_signal
from dynamo_grpc.transport.tls import ClientAuth, TlsConfig, TlsFileError, add_tls_flags

__all__ = [
    "ChannelOptions",
    "ClientAuth",
    "GrpcServer",
    "ServerOptions",
    "TlsConfig",
    "TlsFileError",
    "add_tls_flags",
    "open_channel",
    "run_until_signal",
    "use_tls",
]
