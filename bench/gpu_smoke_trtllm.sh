#!/usr/bin/env bash
# GPU smoke test of the TensorRT-LLM worker (docs/trtllm.md): consul-dev + one `--engine trtllm` worker + a
# frontend on this host, then the KServe v2 conformance requests (ServerLive/Ready, ModelReady, ModelMetadata,
# ModelInfer, ModelStreamInfer) and TTFT / ITL of N streamed requests, printed as one JSON line at the end.
#
#   bench/gpu_smoke_trtllm.sh MODEL_DIR [N_REQUESTS] [MAX_TOKENS]
#
# MODEL_DIR: a HF checkpoint dir (e.g. TinyLlama/TinyLlama-1.1B-Chat-v1.0 downloaded) or a built engine dir
# (then set TOKENIZER_DIR to the HF dir with tokenizer.json). Needs `pip install 'dynamo-grpc[trtllm]'`.
# Env: PYTHON (default python3), BLOCK_SIZE (64), GRPC_PORT (0: any free port), WORKER_ARGS (extra worker flags),
# READY_TIMEOUT (seconds for the engine build, 1800), KEEP_LOGS=1 keeps the log dir.
set -euo pipefail

MODEL=${1:?usage: $0 MODEL_DIR [N_REQUESTS] [MAX_TOKENS]}
N=${2:-8}
MAX_TOKENS=${3:-64}
PY=${PYTHON:-python3}
BLOCK_SIZE=${BLOCK_SIZE:-64}
GRPC_PORT=${GRPC_PORT:-0}
READY_TIMEOUT=${READY_TIMEOUT:-1800}
LOGS=$(mktemp -d -t trtllm-smoke.XXXXXX)
PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ "${KEEP_LOGS:-0}" == 1 ]]; then echo "logs: $LOGS" >&2; else rm -rf "$LOGS"; fi
}
trap cleanup EXIT

wait_for() {  # wait_for FILE SECONDS WHAT LOG
  local deadline=$((SECONDS + $2))
  until [[ -s "$1" ]]; do
    if ((SECONDS > deadline)); then echo "$3 not ready after $2 s; log:" >&2; tail -50 "$4" >&2; exit 1; fi
    sleep 0.5
  done
}

"$PY" -c "import tensorrt_llm; print('tensorrt_llm', tensorrt_llm.__version__)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

"$PY" -m dynamo_grpc.cli consul-dev --port 0 --addr-file "$LOGS/consul.addr" >"$LOGS/consul.log" 2>&1 &
PIDS+=($!)
wait_for "$LOGS/consul.addr" 30 consul-dev "$LOGS/consul.log"
CONSUL=$(cat "$LOGS/consul.addr")

tok_args=()
[[ -n "${TOKENIZER_DIR:-}" ]] && tok_args=(--tokenizer "$TOKENIZER_DIR")
# shellcheck disable=SC2086
"$PY" -m dynamo_grpc.cli worker --engine trtllm --model "$MODEL" "${tok_args[@]}" --block-size "$BLOCK_SIZE" \
  --consul "$CONSUL" --ready-file "$LOGS/worker.json" ${WORKER_ARGS:-} >"$LOGS/worker.log" 2>&1 &
PIDS+=($!)
echo "building/loading the TensorRT-LLM engine (up to ${READY_TIMEOUT}s)..." >&2
wait_for "$LOGS/worker.json" "$READY_TIMEOUT" worker "$LOGS/worker.log"

"$PY" -m dynamo_grpc.cli frontend --consul "$CONSUL" --grpc-port "$GRPC_PORT" \
  --ready-file "$LOGS/frontend.json" >"$LOGS/frontend.log" 2>&1 &
PIDS+=($!)
wait_for "$LOGS/frontend.json" 60 frontend "$LOGS/frontend.log"

ADDR=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["grpc_address"])' "$LOGS/frontend.json")
"$PY" - "$ADDR" "$N" "$MAX_TOKENS" <<'PY'
"""KServe v2 conformance requests against the frontend, then TTFT/ITL of N streamed requests."""
import json, statistics, struct, sys, time

import grpc
from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pbg

addr, n, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
stub = pbg.GRPCInferenceServiceStub(grpc.insecure_channel(addr))
deadline = time.monotonic() + 120
while True:  # the frontend lists the model once it has the worker's card
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    if index.models or time.monotonic() > deadline:
        break
    time.sleep(0.5)
assert index.models, "the frontend lists no ready model"
model = index.models[0].name
assert stub.ServerLive(pb.ServerLiveRequest()).live
assert stub.ServerReady(pb.ServerReadyRequest()).ready
assert stub.ModelReady(pb.ModelReadyRequest(name=model)).ready
meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=model))
print("model", model, "inputs", [i.name for i in meta.inputs], "outputs", [o.name for o in meta.outputs])


def infer(text, stream, rid):
    r = pb.ModelInferRequest(model_name=model, id=rid)
    values = [
        ("text_input", "BYTES", struct.pack("<I", len(text.encode())) + text.encode()),
        ("stream", "BOOL", struct.pack("<?", stream)),
        ("max_tokens", "INT32", struct.pack("<i", max_tokens)),
        ("temperature", "FP32", struct.pack("<f", 0.0)),
    ]
    for name, dtype, raw in values:
        r.inputs.add(name=name, datatype=dtype, shape=[1])
        r.raw_input_contents.append(raw)
    return r


def text_of(resp):
    for out, raw in zip(resp.outputs, resp.raw_output_contents):
        if out.name == "text_output" and len(raw) >= 4:
            return raw[4 : 4 + struct.unpack("<I", raw[:4])[0]].decode(errors="replace")
    return ""


one = stub.ModelInfer(infer("The capital of France is", False, "unary"), timeout=300)
print("ModelInfer:", repr(text_of(one)[:80]))
ttfts, itls, tokens = [], [], 0
for i in range(n):
    prompt = f"Request {i}: write a short story about a lighthouse keeper."
    start = time.perf_counter()
    stamps = []
    for msg in stub.ModelStreamInfer(iter([infer(prompt, True, f"s{i}")]), timeout=300):
        assert not msg.error_message, msg.error_message
        if text_of(msg.infer_response):
            stamps.append(time.perf_counter())
    assert stamps, f"stream {i} returned no text"
    ttfts.append(stamps[0] - start)
    itls += [b - a for a, b in zip(stamps, stamps[1:])]
    tokens += len(stamps)
ms = lambda xs, q: round(1000 * statistics.quantiles(xs, n=100)[q - 1], 2) if len(xs) > 1 else round(1000 * xs[0], 2)
print(json.dumps({
    "model": model, "requests": n, "max_tokens": max_tokens, "streamed_chunks": tokens,
    "ttft_ms_p50": ms(ttfts, 50), "ttft_ms_p90": ms(ttfts, 90),
    "itl_ms_p50": ms(itls, 50) if itls else None, "itl_ms_p90": ms(itls, 90) if itls else None,
}))
PY
