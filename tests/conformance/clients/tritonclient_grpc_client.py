"""tritonclient.grpc against the frontend: metadata, sync infer, async_infer, decoupled streaming, errors.

Usage: tritonclient_grpc_client.py ADDRESS MODEL. Prints one JSON object of observations.
"""

from __future__ import annotations

import json
import queue
import sys
import threading

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

ADDRESS, MODEL = sys.argv[1], sys.argv[2]
PROMPT = "The quick brown fox"
SAMPLING = {"max_tokens": 12, "seed": 7, "temperature": 0.0}


def llm_inputs(prompt: str = PROMPT, stream: bool | None = None, sampling: dict | str | None = None) -> list:
    t = grpcclient.InferInput("text_input", [1], "BYTES")
    t.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    out = [t]
    p = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    raw = sampling if isinstance(sampling, str) else json.dumps(sampling or SAMPLING)
    p.set_data_from_numpy(np.array([raw.encode()], dtype=np.object_))
    out.append(p)
    e = grpcclient.InferInput("exclude_input_in_output", [1], "BOOL")
    e.set_data_from_numpy(np.array([True]))
    out.append(e)
    if stream is not None:
        s = grpcclient.InferInput("stream", [1], "BOOL")
        s.set_data_from_numpy(np.array([stream]))
        out.append(s)
    return out


def text(result: grpcclient.InferResult) -> str:
    return b"".join(result.as_numpy("text_output").reshape(-1)).decode()


def main() -> None:
    c = grpcclient.InferenceServerClient(ADDRESS)
    obs: dict = {
        "live": c.is_server_live(),
        "ready": c.is_server_ready(),
        "model_ready": c.is_model_ready(MODEL),
        "server_metadata": c.get_server_metadata(as_json=True),
        "model_metadata": c.get_model_metadata(MODEL, as_json=True),
        "model_config": c.get_model_config(MODEL, as_json=True),
        "index": c.get_model_repository_index(as_json=True),
    }

    # Unary infer, whole text.
    r = c.infer(MODEL, llm_inputs(), request_id="u1")
    obs["infer"] = {
        "id": r.get_response().id,
        "text": text(r),
        "finish_reason": r.as_numpy("finish_reason")[0].decode(),
        "num_input_tokens": int(r.as_numpy("num_input_tokens")[0]),
        "num_output_tokens": int(r.as_numpy("num_output_tokens")[0]),
    }
    # Only the requested outputs come back.
    r = c.infer(MODEL, llm_inputs(), outputs=[grpcclient.InferRequestedOutput("finish_reason")])
    obs["requested_outputs"] = [o.name for o in r.get_response().outputs]

    # Chat form: text_input holds JSON messages, request parameter chat_template=true.
    msgs = json.dumps([{"role": "user", "content": PROMPT}])
    r = c.infer(MODEL, llm_inputs(msgs), parameters={"chat_template": True})
    obs["chat"] = {
        "text": text(r),
        "num_input_tokens": int(r.as_numpy("num_input_tokens")[0]),
        "num_output_tokens": int(r.as_numpy("num_output_tokens")[0]),
    }

    # async_infer (callback in another thread).
    done: queue.Queue = queue.Queue()
    c.async_infer(MODEL, llm_inputs(), callback=lambda result, error: done.put((result, error)), request_id="a1")
    result, error = done.get(timeout=30)
    obs["async_infer"] = {"error": str(error) if error else None, "text": text(result) if result else None}

    # Decoupled streaming: one response per chunk, the last flagged final.
    responses: queue.Queue = queue.Queue()
    c.start_stream(callback=lambda result, error: responses.put((result, error)))
    c.async_stream_infer(MODEL, llm_inputs(stream=True), request_id="s1")
    chunks, finals, ids = [], [], set()
    while True:
        result, error = responses.get(timeout=30)
        assert error is None, error
        resp = result.get_response()
        ids.add(resp.id)
        chunks.append(text(result))
        final = resp.parameters["triton_final_response"].bool_param
        finals.append(final)
        if final:
            obs["stream_finish_reason"] = result.as_numpy("finish_reason")[0].decode()
            break
    # stream=false on the stream: a single response flagged final.
    c.async_stream_infer(MODEL, llm_inputs(stream=False), request_id="s2")
    result, error = responses.get(timeout=30)
    obs["stream_false"] = {
        "error": str(error) if error else None,
        "final": result.get_response().parameters["triton_final_response"].bool_param if result else None,
        "text": text(result) if result else None,
    }
    # A bad request on the stream yields an error response; the stream stays open for the next request.
    c.async_stream_infer(MODEL, llm_inputs(sampling={"max_tokens": "lots"}), request_id="bad")
    result, error = responses.get(timeout=30)
    obs["stream_error"] = str(error) if error else None
    c.async_stream_infer(MODEL, llm_inputs(stream=False), request_id="s3")
    result, error = responses.get(timeout=30)
    obs["stream_after_error"] = text(result) if result else f"error: {error}"
    c.stop_stream()
    obs["stream"] = {"chunks": chunks, "finals": finals, "ids": sorted(ids)}

    # Errors through tritonclient's exception type.
    errors = {}
    for name, call in {
        "unknown_model": lambda: c.infer("no-such-model", llm_inputs()),
        "bad_json": lambda: c.infer(MODEL, llm_inputs(sampling="{oops")),
    }.items():
        try:
            call()
            errors[name] = None
        except InferenceServerException as e:
            errors[name] = {"status": e.status(), "message": e.message()}
    obs["errors"] = errors
    stats = c.get_inference_statistics(MODEL, as_json=True)
    obs["statistics"] = stats
    c.close()
    # Concurrency from threads on one client.
    c2 = grpcclient.InferenceServerClient(ADDRESS)
    outs: list = []

    def worker() -> None:
        outs.append(text(c2.infer(MODEL, llm_inputs())))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    obs["concurrent"] = outs
    print(json.dumps(obs))


if __name__ == "__main__":
    main()
