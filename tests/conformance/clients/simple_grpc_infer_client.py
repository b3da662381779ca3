"""Re-implementation of triton-inference-server/client `src/python/examples/simple_grpc_infer_client.py`.

The original example is not shipped in the tritonclient wheel and tests cannot download it, so this script
makes the same calls in the same order against the `simple` model (INT32 INPUT0/INPUT1 [1,16] → OUTPUT0
sum, OUTPUT1 difference): infer with requested outputs, a header and the compression flag; inference
statistics must list exactly one model; infer with no requested outputs; element-wise checks; "PASS: infer".
Its command line matches the original's (-u URL, -v, -t timeout, -C compression).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import tritonclient.grpc as grpcclient


def check(a: np.ndarray, b: np.ndarray, results: grpcclient.InferResult) -> None:
    out0, out1 = results.as_numpy("OUTPUT0"), results.as_numpy("OUTPUT1")
    for i in range(16):
        print(f"{a[0][i]} + {b[0][i]} = {out0[0][i]}")
        print(f"{a[0][i]} - {b[0][i]} = {out1[0][i]}")
        if a[0][i] + b[0][i] != out0[0][i]:
            print("sync infer error: incorrect sum")
            sys.exit(1)
        if a[0][i] - b[0][i] != out1[0][i]:
            print("sync infer error: incorrect difference")
            sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-v", "--verbose", action="store_true", default=False)
    parser.add_argument("-u", "--url", default="localhost:8001")
    parser.add_argument("-t", "--client-timeout", type=float, default=None)
    parser.add_argument("-C", "--grpc-compression-algorithm", default=None)
    flags = parser.parse_args()
    client = grpcclient.InferenceServerClient(url=flags.url, verbose=flags.verbose)
    model_name = "simple"
    inputs = [grpcclient.InferInput("INPUT0", [1, 16], "INT32"), grpcclient.InferInput("INPUT1", [1, 16], "INT32")]
    input0 = np.expand_dims(np.arange(start=0, stop=16, dtype=np.int32), axis=0)
    input1 = np.ones(shape=(1, 16), dtype=np.int32)
    inputs[0].set_data_from_numpy(input0)
    inputs[1].set_data_from_numpy(input1)
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")]
    results = client.infer(
        model_name=model_name,
        inputs=inputs,
        outputs=outputs,
        client_timeout=flags.client_timeout,
        headers={"test": "1"},
        compression_algorithm=flags.grpc_compression_algorithm,
    )
    statistics = client.get_inference_statistics(model_name=model_name)
    print(statistics)
    if len(statistics.model_stats) != 1:
        print("FAILED: Inference Statistics")
        sys.exit(1)
    check(input0, input1, results)
    results = client.infer(
        model_name=model_name, inputs=inputs, outputs=None, compression_algorithm=flags.grpc_compression_algorithm
    )
    check(input0, input1, results)
    print("PASS: infer")


if __name__ == "__main__":
    main()
