"""The one error model: docs/errors.md equals the code, and every error crosses a real gRPC hop and HTTP intact."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from dynamo_grpc import errors
from dynamo_grpc.errors import ERRORS, DynamoError

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "test.Errors"


def test_docs_table_is_the_code() -> None:
    text = (ROOT / "docs" / "errors.md").read_text()
    table = text.split("<!-- table:begin -->\n", 1)[1].split("<!-- table:end -->", 1)[0]
    assert table.strip().splitlines() == errors.table_rows(), "regenerate: python -m dynamo_grpc.errors"


def test_every_error_is_in_the_table_once() -> None:
    names = [cls.spec.name for cls in ERRORS]
    assert len(names) == len(set(names))
    defined = {c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, DynamoError)}
    assert defined - {DynamoError} == set(ERRORS)


def test_prompt_too_long_and_overload_stay_apart_over_http() -> None:
    status, headers, body = errors.to_http(errors.PromptTooLong("prompt of 9000 tokens > context 8192"))
    assert status == 400 and "Retry-After" not in headers
    assert body["error"]["code"] == "prompt_too_long"
    status, headers, body = errors.to_http(errors.Overloaded("queue full"))
    assert status == 429 and headers["Retry-After"] == str(errors.RETRY_AFTER_S)
    assert body["error"]["type"] == "rate_limit_error"


def test_unsupported_option_names_the_option() -> None:
    err = errors.UnsupportedOption("logit_bias", "is not supported by the mocker engine")
    _, _, body = errors.to_http(err)
    assert body["error"]["param"] == "logit_bias" and "logit_bias" in body["error"]["message"]


def _make(cls: type[DynamoError]) -> DynamoError:
    if cls is errors.UnsupportedOption:
        return errors.UnsupportedOption("bad_words")
    return cls(f"{cls.spec.name} happened")


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    by_name = {cls.spec.name: cls for cls in ERRORS}

    async def fail(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        name = request.decode()
        await errors.abort(context, _make(by_name[name]))

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Fail": grpc.unary_unary_rpc_method_handler(fail)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield ch
    finally:
        await ch.close()
        await server.stop(None)


@pytest.mark.parametrize("cls", ERRORS, ids=[c.spec.name for c in ERRORS])
async def test_error_crosses_a_grpc_hop(channel: grpc.aio.Channel, cls: type[DynamoError]) -> None:
    call = channel.unary_unary(f"/{SERVICE}/Fail")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(cls.spec.name.encode())
    assert info.value.code().name == cls.spec.grpc_code
    back = errors.from_grpc(info.value, "peer")
    expected = errors.InvalidArgument if cls is errors.UnsupportedOption else cls
    assert type(back) is expected
    assert back.message.startswith("peer: ")
    # what the frontend does with it travels with it
    assert back.spec.migrate == cls.spec.migrate and back.spec.reroute == cls.spec.reroute


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.UNKNOWN, errors.WorkerLost),
        (grpc.StatusCode.INTERNAL, errors.WorkerLost),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.Overloaded),
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
    ],
)
def test_status_without_our_metadata(code: grpc.StatusCode, cls: type[DynamoError]) -> None:
    e = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="x")
    assert type(errors.from_grpc(e)) is cls
