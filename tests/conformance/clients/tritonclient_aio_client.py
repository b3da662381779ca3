"""tritonclient.grpc.aio against the frontend: infer and decoupled stream_infer, many requests on one stream.

Usage: tritonclient_aio_client.py ADDRESS MODEL. Prints one JSON object of observations.
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

ADDRESS, MODEL = sys.argv[1], sys.argv[2]


def llm_inputs(prompt: str, seed: int, stream: bool) -> list:
    t = aioclient.InferInput("text_input", [1], "BYTES")
    t.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    p = aioclient.InferInput("sampling_parameters", [1], "BYTES")
    p.set_data_from_numpy(np.array([json.dumps({"max_tokens": 10, "seed": seed}).encode()], dtype=np.object_))
    s = aioclient.InferInput("stream", [1], "BOOL")
    s.set_data_from_numpy(np.array([stream]))
    e = aioclient.InferInput("exclude_input_in_output", [1], "BOOL")
    e.set_data_from_numpy(np.array([True]))
    return [t, p, s, e]


async def main() -> None:
    obs: dict = {}
    async with aioclient.InferenceServerClient(ADDRESS) as c:
        obs["live"] = await c.is_server_live()
        obs["model_ready"] = await c.is_model_ready(MODEL)
        unary = {}
        for seed in (1, 2, 3):
            r = await c.infer(MODEL, llm_inputs("Once upon a time", seed, False))
            unary[seed] = r.as_numpy("text_output")[0].decode()
        obs["unary"] = unary

        async def requests():
            for seed in (1, 2, 3):
                yield {
                    "model_name": MODEL,
                    "inputs": llm_inputs("Once upon a time", seed, True),
                    "request_id": f"r{seed}",
                }

        streamed: dict[str, list[str]] = {}
        finals: dict[str, int] = {}
        errors: list[str] = []
        async for result, error in c.stream_infer(requests()):
            if error is not None:
                errors.append(str(error))
                continue
            resp = result.get_response()
            streamed.setdefault(resp.id, []).append(result.as_numpy("text_output")[0].decode())
            if resp.parameters["triton_final_response"].bool_param:
                finals[resp.id] = finals.get(resp.id, 0) + 1
                if len(finals) == 3:
                    break
        obs["streamed"] = {k: "".join(v) for k, v in streamed.items()}
        obs["chunks"] = {k: len(v) for k, v in streamed.items()}
        obs["finals"] = finals
        obs["stream_errors"] = errors
        try:
            await c.infer("nope", llm_inputs("x", 1, False))
            obs["unknown_model"] = None
        except InferenceServerException as e:
            obs["unknown_model"] = e.status()
    print(json.dumps(obs))


if __name__ == "__main__":
    asyncio.run(main())
