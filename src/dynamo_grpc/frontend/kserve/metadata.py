"""ModelMetadata, ModelConfig and ModelStatistics answers, read from `schema.py` (what parsing accepts)."""

from __future__ import annotations

from dynamo_grpc.frontend.kserve import schema, simple_model
from dynamo_grpc.frontend.models import ServedModel
from dynamo_grpc.frontend.stats import Duration, ModelStats
from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from dynamo_grpc.kserve.v2 import model_config_pb2 as mc

PLATFORM = "dynamo"
_MC_TYPE = {
    "BOOL": mc.TYPE_BOOL,
    "UINT8": mc.TYPE_UINT8,
    "UINT16": mc.TYPE_UINT16,
    "UINT32": mc.TYPE_UINT32,
    "UINT64": mc.TYPE_UINT64,
    "INT8": mc.TYPE_INT8,
    "INT16": mc.TYPE_INT16,
    "INT32": mc.TYPE_INT32,
    "INT64": mc.TYPE_INT64,
    "FP16": mc.TYPE_FP16,
    "FP32": mc.TYPE_FP32,
    "FP64": mc.TYPE_FP64,
    "BYTES": mc.TYPE_STRING,
    "BF16": mc.TYPE_BF16,
}
_T = pb.ModelMetadataResponse.TensorMetadata


def llm_metadata(name: str) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name=name,
        versions=["1"],
        platform=PLATFORM,
        inputs=[_T(name=s.name, datatype=s.datatype, shape=s.dims) for s in schema.INPUTS.values()],
        outputs=[_T(name=n, datatype=d, shape=dims) for n, (d, dims) in schema.OUTPUTS.items()],
    )


def simple_metadata(name: str) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name=name,
        versions=["1"],
        platform="python",
        inputs=[_T(name=n, datatype=d, shape=s) for n, d, s in simple_model.INPUTS],
        outputs=[_T(name=n, datatype=d, shape=s) for n, d, s in simple_model.OUTPUTS],
    )


def llm_config(m: ServedModel) -> pb.ModelConfigResponse:
    cfg = mc.ModelConfig(
        name=m.name,
        platform=PLATFORM,
        backend=PLATFORM,
        runtime=m.card.architecture,
        max_batch_size=0,
        input=[
            mc.ModelInput(name=s.name, data_type=_MC_TYPE[s.datatype], dims=s.dims, optional=True)
            for s in schema.INPUTS.values()
        ],
        output=[mc.ModelOutput(name=n, data_type=_MC_TYPE[d], dims=dims) for n, (d, dims) in schema.OUTPUTS.items()],
        model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True),
        instance_group=[
            mc.ModelInstanceGroup(name=m.name, count=len(m.workers), kind=mc.ModelInstanceGroup.KIND_MODEL)
        ],
    )
    params = {
        "context_length": m.card.context_length,
        "block_size": m.card.block_size,
        "kv_blocks": m.card.kv_blocks,
        "vocab_size": m.card.vocab_size,
        "tokenizer_sha256": m.card.tokenizer_sha256,
        "has_chat_template": bool(m.card.chat_template),
        "workers": len(m.workers),
        "source_format": m.card.source_format,
    }
    for k, v in params.items():
        cfg.parameters[k].string_value = str(v).lower() if isinstance(v, bool) else str(v)
    return pb.ModelConfigResponse(config=cfg)


def simple_config(name: str) -> pb.ModelConfigResponse:
    cfg = mc.ModelConfig(
        name=name,
        platform="python",
        backend="python",
        max_batch_size=simple_model.MAX_BATCH,
        input=[mc.ModelInput(name=n, data_type=_MC_TYPE[d], dims=[16]) for n, d, _ in simple_model.INPUTS],
        output=[mc.ModelOutput(name=n, data_type=_MC_TYPE[d], dims=[16]) for n, d, _ in simple_model.OUTPUTS],
    )
    return pb.ModelConfigResponse(config=cfg)


def _d(x: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=x.count, ns=x.ns)


def add_statistics(out: pb.ModelStatisticsResponse, name: str, s: ModelStats) -> None:
    ms = out.model_stats.add(
        name=name,
        version="1",
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_d(s.success),
            fail=_d(s.fail),
            queue=_d(s.queue),
            compute_input=_d(s.compute_input),
            compute_infer=_d(s.compute_infer),
            compute_output=_d(s.compute_output),
        ),
    )
    if s.responses or s.cancelled.count:
        ms.response_stats["0"].CopyFrom(
            pb.InferResponseStatistics(success=pb.StatisticDuration(count=s.responses), cancel=_d(s.cancelled))
        )
