"""bench frontend's do-nothing KServe forwarder row: its fixed responses end a stream as a client reads it, and
the floor ratios put every frontend row over both forwarders' CPU of the same round."""

from dynamo_grpc.bench.frontend import floor_ratios
from dynamo_grpc.bench.kserve_forwarder import fixed_responses
from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb


def test_fixed_responses_mark_only_the_last_final() -> None:
    middle, last = (pb.ModelStreamInferResponse.FromString(b) for b in fixed_responses("m"))
    for msg, final in ((middle, False), (last, True)):
        assert not msg.error_message
        assert msg.infer_response.model_name == "m"
        assert msg.infer_response.parameters["triton_final_response"].bool_param is final
        assert [o.name for o in msg.infer_response.outputs] == ["text_output"]


def _row(cpus: list[dict[str, float]]) -> dict:
    return {
        "rounds_cpu_ms_per_request": cpus,
        "messages_per_request": 8,
        "rounds_messages_per_request": [8] * len(cpus),
    }


def test_floor_ratios_include_the_kserve_forwarder() -> None:
    rounds = [
        {"passthrough": 1.0, "passthrough-kserve": 1.2, "frontend": 1.8},
        {"passthrough": 2.0, "passthrough-kserve": 2.0, "frontend": 3.0},
    ]
    rows = {"passthrough": _row(rounds), "passthrough_kserve": _row(rounds), "frontend_kv": _row(rounds)}
    res = floor_ratios({"latency": rows, "throughput": rows})["throughput"]
    assert res["passthrough_kserve"]["ratio_rounds"] == [1.0, 1.2]
    fe = res["frontend_kv"]
    assert fe["ratio_rounds"] == [1.5, 1.8]
    assert fe["ratio_to_kserve_rounds"] == [1.5, 1.5]
    assert fe["ratio_to_kserve_median"] == 1.5


def test_floor_ratios_without_the_kserve_row() -> None:
    rounds = [{"passthrough": 1.0, "frontend": 1.6}]
    rows = {"passthrough": _row(rounds), "frontend_kv": _row(rounds)}
    fe = floor_ratios({"latency": rows, "throughput": rows})["throughput"]["frontend_kv"]
    assert fe["ratio_median"] == 1.6 and "ratio_to_kserve_median" not in fe
