"""tritonclient against a mesh serving the real model (torch engine): greedy chat answers.

Prints one JSON object: the unary answer, the streamed chunks, and the cache facts of a repeat.
"""

from __future__ import annotations

import json
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient

ADDRESS, MODEL = sys.argv[1], sys.argv[2]
QUESTION = (
    "France is a country in Western Europe. Its regions include Brittany, Normandy, Provence and Alsace, and "
    "its rivers include the Seine, the Loire, the Rhone and the Garonne. What is the capital of France?"
)


def inputs(stream: bool) -> list[grpcclient.InferInput]:
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([QUESTION.encode()], dtype=np.object_))
    flag = grpcclient.InferInput("stream", [1], "BOOL")
    flag.set_data_from_numpy(np.array([stream], dtype=bool))
    params = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(np.array([json.dumps({"max_tokens": 24, "temperature": 0}).encode()], dtype=np.object_))
    return [text, flag, params]


def main() -> None:
    client = grpcclient.InferenceServerClient(ADDRESS)
    first = client.infer(MODEL, inputs(False), parameters={"chat_template": True})
    repeat = client.infer(MODEL, inputs(False), parameters={"chat_template": True})
    got: queue.Queue[object] = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put(error or result))
    client.async_stream_infer(MODEL, inputs(True), parameters={"chat_template": True}, enable_empty_final_response=True)
    chunks: list[str] = []
    while True:
        item = got.get(timeout=300)
        if isinstance(item, Exception):
            raise item
        out = item.as_numpy("text_output")  # type: ignore[attr-defined]
        if out is not None and len(out):
            chunks.append(out[0].decode())
        if item.get_response().parameters["triton_final_response"].bool_param:  # type: ignore[attr-defined]
            break
    client.stop_stream()

    def params(result: grpcclient.InferResult) -> dict[str, int]:
        p = result.get_response().parameters
        return {k: int(p[k].int64_param) for k in ("prompt_tokens", "cached_tokens", "completion_tokens") if k in p}

    print(json.dumps({
        "text": first.as_numpy("text_output")[0].decode(),
        "finish_reason": first.as_numpy("finish_reason")[0].decode(),
        "first": params(first),
        "repeat_text": repeat.as_numpy("text_output")[0].decode(),
        "repeat": params(repeat),
        "chunks": chunks,
    }))


if __name__ == "__main__":
    main()
