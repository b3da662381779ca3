"""A real server process built through transport/, for the shutdown and reflection tests.

It serves KvEventsService.Replay as a slow stream (``--batches`` batches, ``--interval``
seconds apart) and stops on SIGTERM/SIGINT with the transport's graceful drain. It takes the
TLS flags (or DYN_TLS_* variables) the way a role's main does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator

import grpc

from dynamo_grpc.transport import GrpcServer, ServerOptions, TlsConfig, add_tls_flags, run_until_signal
from dynamo_grpc.v1 import events_pb2, events_pb2_grpc


class SlowReplay(events_pb2_grpc.KvEventsServiceServicer):
    def __init__(self, batches: int, interval: float) -> None:
        self.batches, self.interval = batches, interval

    async def Replay(
        self, request: events_pb2.ReplayRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[events_pb2.ReplayResponse]:
        for i in range(request.from_seq + 1, request.from_seq + 1 + self.batches):
            await asyncio.sleep(self.interval)
            yield events_pb2.ReplayResponse(batch=events_pb2.KvEventBatch(instance_id="test", seq=i))


async def amain(args: argparse.Namespace) -> None:
    tls = TlsConfig.from_args(args)
    server = GrpcServer(ServerOptions(port=0, grace_s=args.grace, tls=tls, health_port=args.health_port))
    server.add(
        events_pb2_grpc.add_KvEventsServiceServicer_to_server,
        SlowReplay(args.batches, args.interval),
        "dynamo_grpc.v1.KvEventsService",
    )
    address = await server.start()
    print(json.dumps({"address": address, "health_port": server.health_port}), flush=True)
    await run_until_signal(server.stop)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--interval", type=float, default=0.1)
    p.add_argument("--grace", type=float, default=10.0)
    add_tls_flags(p, public=False)
    asyncio.run(amain(p.parse_args()))


if __name__ == "__main__":
    main()
