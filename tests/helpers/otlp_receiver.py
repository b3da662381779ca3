"""A real OTLP/gRPC trace endpoint for tests: the collector's TraceService (opentelemetry-proto), keeping spans.

Processes export to it exactly as to an OpenTelemetry Collector (OTEL_EXPORTER_OTLP_ENDPOINT); the test reads
back the spans (ids in hex, attributes as Python values).

It runs in a process of its own (`OtlpReceiverProcess`): a live sync gRPC server in the pytest process would make
every later fork of that process (Popen with preexec_fn, as the mesh launcher does) restart gRPC's poller in the
child, whose epoll fd close_fds then closes: the child aborts before exec (grpc/grpc#43055).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2


def _value(v: common_pb2.AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind in ("string_value", "bool_value", "int_value", "double_value") else str(v)


@dataclass
class ReceivedSpan:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    events: list[str] = field(default_factory=list)


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: Any = None) -> None:
        self.sink = sink  # a text file every received span is appended to, as a JSON line
        self.spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(0)

    def Export(self, request: Any, context: Any) -> trace_service_pb2.ExportTraceServiceResponse:
        got = []
        for rs in request.resource_spans:
            res = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        ReceivedSpan(
                            service=str(res.get("service.name", "")),
                            name=s.name,
                            kind=s.kind,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            events=[e.name for e in s.events],
                        )
                    )
        with self._lock:
            self.spans.extend(got)
            if self.sink is not None:
                self.sink.write("".join(json.dumps(dataclasses.asdict(s)) + "\n" for s in got))
                self.sink.flush()
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for(self, trace_id: str, names: set[str], timeout_s: float = 20.0) -> list[ReceivedSpan]:
        """The trace's spans once every name in `names` arrived (exporters batch: up to a second late)."""
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.trace(trace_id)
            missing = names - {s.name for s in spans}
            if not missing or time.monotonic() > deadline:
                assert not missing, f"spans {sorted(missing)} never arrived; got {sorted(s.name for s in spans)}"
                return spans
            time.sleep(0.1)


class OtlpReceiverProcess:
    """`OtlpReceiver` in a child process (see the module doc); the same reading API, over its span file."""

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / "otlp-spans.jsonl"
        self.path.touch()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.otlp_receiver", str(self.path)], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def spans(self) -> list[ReceivedSpan]:
        text = self.path.read_text()
        lines = text.splitlines()[: text.count("\n")]  # whole lines only
        return [ReceivedSpan(**json.loads(ln)) for ln in lines]

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    wait_for = OtlpReceiver.wait_for

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def main() -> None:
    with open(sys.argv[1], "a", encoding="utf-8") as sink:
        r = OtlpReceiver(sink).start()
        print(r.port, flush=True)
        r.server.wait_for_termination()


if __name__ == "__main__":
    main()
