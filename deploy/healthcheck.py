"""Container health check: ask a process's grpc.health.v1 service whether it is SERVING.

Docker's HEALTHCHECK and compose's `healthcheck:` run this inside the container (Kubernetes uses its native
`grpc:` probe instead). Usage: ``python healthcheck.py [HOST:PORT] [SERVICE]``; the address defaults to
``$DYN_HEALTH_ADDR`` or 127.0.0.1:8001 (the frontend's KServe port). Exit 0 = SERVING, 1 = anything else.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout_s: float = 3.0) -> bool:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            print(f"{address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return False
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address}: {status}")
    return reply.status == health_pb2.HealthCheckResponse.SERVING


if __name__ == "__main__":
    addr = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DYN_HEALTH_ADDR", "127.0.0.1:8001")
    svc = sys.argv[2] if len(sys.argv) > 2 else ""
    sys.exit(0 if check(addr, svc) else 1)
