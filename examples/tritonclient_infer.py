"""Call a dynamo-grpc frontend with NVIDIA's tritonclient, unchanged: streaming and unary.

    .venv/bin/python examples/tritonclient_infer.py --url 127.0.0.1:8001 "What is the capital of France?"
"""

from __future__ import annotations

import argparse
import json
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient


def _inputs(prompt: str, max_tokens: int, stream: bool) -> list[grpcclient.InferInput]:
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    flag = grpcclient.InferInput("stream", [1], "BOOL")
    flag.set_data_from_numpy(np.array([stream], dtype=bool))
    params = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(np.array([json.dumps({"max_tokens": max_tokens, "temperature": 0}).encode()],
                                        dtype=np.object_))
    return [text, flag, params]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("prompt")
    p.add_argument("--url", default="127.0.0.1:8001")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--unary", action="store_true", help="one ModelInfer call instead of a stream")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the model's chat template")
    args = p.parse_args()
    client = grpcclient.InferenceServerClient(args.url)
    params = {} if args.raw else {"chat_template": True}
    if args.unary:
        result = client.infer(args.model, _inputs(args.prompt, args.max_tokens, False), parameters=params)
        print(result.as_numpy("text_output")[0].decode())
        return 0
    responses: queue.Queue[object] = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put(error or result))
    client.async_stream_infer(
        args.model, _inputs(args.prompt, args.max_tokens, True), parameters=params, enable_empty_final_response=True
    )
    while True:
        item = responses.get(timeout=120)
        if isinstance(item, Exception):
            print(f"\nerror: {item}", file=sys.stderr)
            return 1
        result = item
        final = result.get_response().parameters["triton_final_response"].bool_param  # type: ignore[attr-defined]
        out = result.as_numpy("text_output")  # type: ignore[attr-defined]
        if out is not None:
            print(out[0].decode(), end="", flush=True)
        if final:
            break
    client.stop_stream()
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
