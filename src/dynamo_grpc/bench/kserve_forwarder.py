"""A do-nothing KServe forwarder: what the protocol's shape costs, without anything a frontend does.

`bench frontend`'s `passthrough_kserve` row. A grpc.aio `ModelStreamInfer` (bidi, as the frontend's) that reads
each request (gRPC deserialises it), starts a task per request as the frontend does, sends the workers a fixed
Decode request (the bench prompt's ids, tokenised once at start: no parse, tokenise or routing per request) round
robin, and writes one fixed pre-serialised response per worker message, the last one marked
`triton_final_response`. The frontend's CPU over this one is what our own Python costs; over the Decode
`passthrough` it is that plus the protocol.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator
from typing import Any

import grpc

from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from dynamo_grpc.v1 import common_pb2, worker_pb2, worker_pb2_grpc

SERVICE = "inference.GRPCInferenceService"


def fixed_responses(model: str) -> tuple[bytes, bytes]:
    """The serialised non-final and final `ModelStreamInferResponse` (a one-element BYTES text_output)."""
    out = []
    for final in (False, True):
        r = pb.ModelInferResponse(model_name=model, id="r")
        r.outputs.add(name="text_output", datatype="BYTES", shape=[1])
        r.raw_output_contents.append(b"\x03\x00\x00\x00abc")
        r.parameters["triton_final_response"].bool_param = final
        out.append(pb.ModelStreamInferResponse(infer_response=r).SerializeToString())
    return out[0], out[1]


def serve(workers: list[str], model: str, ids: list[int], max_tokens: int) -> None:
    """Serve on 127.0.0.1 (ephemeral port), print the address, run until killed."""

    async def main() -> None:
        stubs = [worker_pb2_grpc.DecodeServiceStub(grpc.aio.insecure_channel(w)) for w in workers]
        turn, seq = itertools.count(), itertools.count()
        middle, last = fixed_responses(model)
        stop = common_pb2.StopConditions(max_tokens=max_tokens, ignore_eos=True)
        pid = os.getpid()

        async def one(context: Any) -> None:
            req = worker_pb2.DecodeRequest(request_id=f"k{next(seq)}-{pid}", model=model, token_ids=ids, stop=stop)
            async for r in stubs[next(turn) % len(stubs)].Decode(req):
                await context.write(last if r.finish_reason else middle)

        async def stream_infer(requests: AsyncIterator[Any], context: Any) -> None:
            tasks = [asyncio.ensure_future(one(context)) async for _ in requests]
            await asyncio.gather(*tasks)

        handler = grpc.method_handlers_generic_handler(SERVICE, {
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                stream_infer, request_deserializer=pb.ModelInferRequest.FromString,
                response_serializer=lambda b: b),
        })  # fmt: skip
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"127.0.0.1:{port}", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())
