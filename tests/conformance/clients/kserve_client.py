"""The kserve SDK's InferenceGRPCClient (kserve 0.21) against the frontend.

Runs in its own venv (.venv-kserve): kserve pins dependencies our environment does not share.
Usage: kserve_client.py ADDRESS MODEL. Prints one JSON object of observations.
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest

ADDRESS, MODEL = sys.argv[1], sys.argv[2]


def request(prompt: str, binary: bool, request_id: str, sampling: str | None = None) -> InferRequest:
    text = InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_), binary_data=binary)
    sp = InferInput("sampling_parameters", [1], "BYTES")
    raw = sampling if sampling is not None else json.dumps({"max_tokens": 9, "seed": 11})
    sp.set_data_from_numpy(np.array([raw.encode()], dtype=np.object_), binary_data=binary)
    ex = InferInput("exclude_input_in_output", [1], "BOOL")
    ex.set_data_from_numpy(np.array([True]), binary_data=binary)
    return InferRequest(model_name=MODEL, infer_inputs=[text, sp, ex], request_id=request_id)


def outputs(resp) -> dict:
    out = {}
    for o in resp.outputs:
        arr = o.as_numpy()
        v = arr.reshape(-1)[0]
        out[o.name] = v.decode() if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v
    return out


async def main() -> None:
    obs: dict = {}
    client = InferenceGRPCClient(url=ADDRESS, timeout=60)
    try:
        obs["live"] = await client.is_server_live()
        obs["ready"] = await client.is_server_ready()
        obs["model_ready"] = await client.is_model_ready(MODEL)
        raw_resp = await client.infer(request("Tell me a story", True, "k-raw"))
        obs["raw"] = {"id": raw_resp.id, **outputs(raw_resp)}
        typed_resp = await client.infer(request("Tell me a story", False, "k-typed"))
        obs["typed"] = {"id": typed_resp.id, **outputs(typed_resp)}
        try:
            await client.infer(request("x", True, "k-bad", sampling="{nope"))
            obs["bad"] = None
        except Exception as e:  # kserve raises grpc errors as they are
            obs["bad"] = {"type": type(e).__name__, "text": str(e)}
    finally:
        await client.close()
    print(json.dumps(obs, default=str))


if __name__ == "__main__":
    asyncio.run(main())
