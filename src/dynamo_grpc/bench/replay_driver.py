"""Drive a frontend with a trace: KServe v2 ``ModelStreamInfer`` calls at the trace's (scaled) arrival times.

Prompts go as token ids in an ``input_ids`` INT32 [N] tensor, so prefix sharing in the trace reaches the
router's block hashes intact (docs/frontend.md, "input_ids"). Each request is one stream call:
write, half-close, read until the final response. The reader takes token counts and cache facts from
output tensors (``num_output_tokens``, ``cached_tokens``, ``num_input_tokens``) or, equally, from
response parameters (``cached_tokens``, ``prompt_tokens``, ``worker_id``).

Uses our generated stubs with grpc.aio (tritonclient cannot share a process with them).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from dynamo_grpc.bench.replay_metrics import RequestRecord
from dynamo_grpc.bench.replay_trace import TraceRequest
from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc

#: the outputs the replay asks for: no text (the synthetic ids decode to junk anyway); prompt and cached token
#: counts and the worker id come as parameters of the final response, so each streamed response stays small
REQUESTED_OUTPUTS = ("num_output_tokens",)
_MAX_MESSAGE = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class DriverConfig:
    address: str
    model: str
    #: trace seconds per wall second: arrivals are sent at ``arrival_s / time_scale``
    time_scale: float = 1.0
    request_timeout_s: float = 600.0
    channels: int = 4
    temperature: float = 0.0
    request_outputs: bool = True
    #: build all requests up front when the trace slice has at most this many prompt tokens
    prebuild_tokens: int = 64_000_000


def _bytes_tensor(req: pb.ModelInferRequest, name: str, value: bytes) -> None:
    t = req.inputs.add()
    t.name, t.datatype = name, "BYTES"
    t.shape.append(1)
    req.raw_input_contents.append(struct.pack("<I", len(value)) + value)


def build_request(
    request_id: str,
    model: str,
    token_ids: np.ndarray,
    max_tokens: int,
    temperature: float = 0.0,
    request_outputs: bool = True,
) -> pb.ModelInferRequest:
    """A streaming generate request for pre-tokenised ``token_ids`` that makes exactly ``max_tokens`` tokens."""
    req = pb.ModelInferRequest(model_name=model, id=request_id)
    ids = req.inputs.add()
    ids.name, ids.datatype = "input_ids", "INT32"
    ids.shape.append(int(token_ids.size))
    req.raw_input_contents.append(np.ascontiguousarray(token_ids, dtype="<i4").tobytes())
    sampling = {"max_tokens": int(max_tokens), "ignore_eos": True, "temperature": temperature}
    _bytes_tensor(req, "sampling_parameters", json.dumps(sampling).encode())
    stream = req.inputs.add()
    stream.name, stream.datatype = "stream", "BOOL"
    stream.shape.append(1)
    req.raw_input_contents.append(b"\x01")
    if request_outputs:
        for name in REQUESTED_OUTPUTS:
            req.outputs.add().name = name
    return req


def _param(p: pb.InferParameter) -> bool | int | float | str | None:
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def _int_output(resp: pb.ModelInferResponse, name: str) -> int | None:
    for i, out in enumerate(resp.outputs):
        if out.name != name:
            continue
        if i < len(resp.raw_output_contents) and resp.raw_output_contents[i]:
            raw = resp.raw_output_contents[i]
            dt = {"INT32": "<i4", "INT64": "<i8", "UINT32": "<u4", "UINT64": "<u8"}.get(out.datatype, "<i4")
            arr = np.frombuffer(raw, dtype=dt)
            return int(arr[0]) if arr.size else None
        c = out.contents
        for seq in (c.int_contents, c.int64_contents, c.uint_contents, c.uint64_contents):
            if len(seq):
                return int(seq[0])
        return None
    return None


def _has_text(resp: pb.ModelInferResponse) -> bool:
    for i, out in enumerate(resp.outputs):
        if out.name == "text_output":
            if i < len(resp.raw_output_contents):
                return len(resp.raw_output_contents[i]) > 4
            return any(len(b) for b in out.contents.bytes_contents)
    return False


def absorb_response(rec: RequestRecord, resp: pb.ModelInferResponse, now: float) -> bool:
    """Fold one streamed response into ``rec``; True when it is the final one.

    Hot path (one call per streamed response): only the token count is read until the final response.
    """
    n = _int_output(resp, "num_output_tokens")
    if n is None:
        n = 1 if _has_text(resp) else 0
    if n > 0:
        if not rec.chunks:
            rec.first_token_s = now
        rec.chunks.append((now, n))
    params = resp.parameters
    final = "triton_final_response" in params and bool(params["triton_final_response"].bool_param)
    if not final:
        return False
    values = {k: _param(v) for k, v in params.items()}
    cached = _int_output(resp, "cached_tokens")
    if cached is None and isinstance(values.get("cached_tokens"), int):
        cached = int(values["cached_tokens"])  # type: ignore[arg-type]
    if cached is not None:
        rec.cached_tokens = cached
    prompt = _int_output(resp, "num_input_tokens")
    if prompt is None and isinstance(values.get("prompt_tokens"), int):
        prompt = int(values["prompt_tokens"])  # type: ignore[arg-type]
    if prompt:
        rec.prompt_tokens = prompt
    wid = values.get("worker_id")
    if isinstance(wid, str) and wid:
        rec.worker_id = wid
    return True


def finish_tokens(rec: RequestRecord) -> None:
    """Total generated tokens; accepts per-response (delta) or cumulative ``num_output_tokens``."""
    counts = [n for _, n in rec.chunks]
    total = sum(counts)
    cumulative = len(counts) > 1 and all(b >= a for a, b in itertools.pairwise(counts))
    if cumulative and total > rec.expected_output_tokens >= counts[-1]:
        total = counts[-1]
    rec.output_tokens = total


class Driver:
    """Sends requests on schedule over a few channels and records what came back."""

    def __init__(self, cfg: DriverConfig) -> None:
        self.cfg = cfg
        opts = [("grpc.max_send_message_length", _MAX_MESSAGE), ("grpc.max_receive_message_length", _MAX_MESSAGE)]
        # Separate channels (distinct subchannels) so one HTTP/2 connection's stream limit never queues us.
        self._channels = [
            grpc.aio.insecure_channel(cfg.address, options=[*opts, ("grpc.channel_id", i)])  # type: ignore[list-item]
            for i in range(max(1, cfg.channels))
        ]
        self._stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in self._channels]

    async def close(self) -> None:
        for c in self._channels:
            await c.close()

    async def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until the frontend says the model is ready (a worker is live and its card is loaded)."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                r = await self._stubs[0].ModelReady(pb.ModelReadyRequest(name=self.cfg.model), timeout=5.0)
                if r.ready:
                    return
                last = "model not ready"
            except grpc.aio.AioRpcError as e:
                last = f"{e.code().name}: {e.details()}"
            await asyncio.sleep(0.5)
        raise TimeoutError(f"frontend {self.cfg.address} not ready for {self.cfg.model!r}: {last}")

    async def served_model(self, timeout_s: float = 120.0) -> str:
        """The first READY model the frontend lists, waiting for one to appear."""
        deadline = time.monotonic() + timeout_s
        last = "none listed"
        while time.monotonic() < deadline:
            try:
                idx = await self._stubs[0].RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=5.0)
                ready = [m.name for m in idx.models if m.state.upper() == "READY"]
                if ready:
                    return ready[0]
            except grpc.aio.AioRpcError as e:  # the frontend may still be starting
                last = f"{e.code().name}: {e.details()}"
            await asyncio.sleep(0.5)
        raise TimeoutError(f"frontend {self.cfg.address} lists no ready model ({last})")

    async def one(self, rec: RequestRecord, req: pb.ModelInferRequest) -> None:
        stub = self._stubs[rec.index % len(self._stubs)]
        call = stub.ModelStreamInfer(timeout=self.cfg.request_timeout_s)
        try:
            rec.sent_s = time.perf_counter()
            await call.write(req)
            await call.done_writing()
            async for sresp in call:
                now = time.perf_counter()
                if sresp.error_message:
                    rec.error = f"stream_error: {sresp.error_message}"
                    rec.end_s = now
                    break
                if absorb_response(rec, sresp.infer_response, now):
                    rec.end_s = now
                    break
            if rec.error is None and math.isnan(rec.end_s):  # the stream ended without a final flag
                if rec.chunks:
                    rec.end_s = rec.chunks[-1][0]
                else:
                    rec.error = "no_response: stream closed without output"
        except grpc.aio.AioRpcError as e:
            rec.error = f"{e.code().name}: {e.details()}"
            rec.end_s = time.perf_counter()
        finally:
            call.cancel()
        finish_tokens(rec)

    async def run(
        self,
        requests: Sequence[TraceRequest],
        tokens_for: Callable[[TraceRequest], np.ndarray],
        on_progress: Callable[[int, int], None] | None = None,
    ) -> list[RequestRecord]:
        """Replay ``requests`` on their schedule; returns one record per request, in trace order."""
        records = [
            RequestRecord(r.index, r.arrival_s / self.cfg.time_scale, expected_output_tokens=r.output_length)
            for r in requests
        ]
        tasks: list[asyncio.Task[None]] = []
        done = 0

        def _done(_: asyncio.Task[None]) -> None:
            nonlocal done
            done += 1
            if on_progress is not None:
                on_progress(done, len(records))

        def build(r: TraceRequest, rec: RequestRecord) -> pb.ModelInferRequest:
            toks = tokens_for(r)
            rec.prompt_tokens = int(toks.size)
            return build_request(
                f"replay-{r.index}",
                self.cfg.model,
                toks,
                max(1, r.output_length),
                self.cfg.temperature,
                self.cfg.request_outputs,
            )

        # Build every request before the clock starts when they fit in memory, so a burst of arrivals
        # (Mooncake quantises timestamps into ~3 s buckets) is not delayed by prompt synthesis.
        prebuilt: list[pb.ModelInferRequest] | None = None
        if sum(r.input_length for r in requests) <= self.cfg.prebuild_tokens:
            prebuilt = [build(r, rec) for r, rec in zip(requests, records, strict=True)]
        t0 = time.perf_counter()
        for i, (r, rec) in enumerate(zip(requests, records, strict=True)):
            req = prebuilt[i] if prebuilt is not None else build(r, rec)
            delay = t0 + rec.scheduled_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            rec.scheduled_s += t0
            task = asyncio.create_task(self.one(rec, req))
            task.add_done_callback(_done)
            tasks.append(task)
        await asyncio.gather(*tasks)
        return records
