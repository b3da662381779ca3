"""Model cards against a real consul-dev: a worker's card is sealed and its registration names the
session holding it; a plain PUT that replaces the card (Consul's locks are advisory) is not trusted,
and the frontend's registry skips that worker while its sibling keeps serving."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.request
from collections.abc import Iterator

import pytest

from dynamo_grpc.discovery import ConsulSettings, Discovery, Instance
from dynamo_grpc.discovery.validate import CARD_SESSION_META, SESSION_KEY, card_problem
from dynamo_grpc.frontend.models import ModelRegistry, ServedModel
from dynamo_grpc.models.card import ModelCard
from tests.helpers.consul_dev import run_consul_dev


@pytest.fixture(scope="module")
def agent() -> Iterator[str]:
    with run_consul_dev() as a:
        yield a.address


def _discovery(address: str) -> Discovery:
    return Discovery(ConsulSettings.from_env({"CONSUL_HTTP_ADDR": address}), watch_wait=1.0)


def _plain_put(address: str, key: str, value: dict[str, object]) -> None:
    req = urllib.request.Request(f"{address}/v1/kv/{key}", data=json.dumps(value).encode(), method="PUT")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.read().strip() == b"true"


def _kv_session(address: str, key: str) -> str:
    with urllib.request.urlopen(f"{address}/v1/kv/{key}", timeout=5) as resp:
        entry = json.loads(resp.read())[0]
    json.loads(base64.b64decode(entry["Value"]))
    return str(entry.get("Session") or "")


CARD = {"name": "m-trust", "tokenizer_sha256": "0" * 64, "block_size": 16, "context_length": 2048}


async def test_a_replaced_card_is_not_trusted_and_its_worker_is_skipped(agent: str) -> None:
    async with _discovery(agent) as worker, _discovery(agent) as reader:
        for iid in ("w-a", "w-b"):
            await worker.register(Instance("dynamo-worker", iid, "127.0.0.1", 7000, meta={"model": "m-trust"}))
            await worker.put_model_card("m-trust", iid, dict(CARD))
        snap = await asyncio.wait_for(reader.watch("dynamo-worker").__anext__(), 10)
        metas = {i.instance_id: i.meta for i in snap}
        entries = await reader.get_model_card_entries("m-trust")
        assert set(entries) == {"w-a", "w-b"}
        for iid, card in entries.items():
            held_by = _kv_session(agent, f"dynamo/models/m-trust/{iid}")
            assert metas[iid][CARD_SESSION_META] == card[SESSION_KEY] == held_by
            assert card_problem(card, metas[iid]) is None
        assert (await reader.get_model_cards("m-trust"))["m-trust"]["w-a"] == CARD  # as published

        # A plain PUT (no acquire) replaces w-b's card; the lock stays, the content is forged.
        _plain_put(agent, "dynamo/models/m-trust/w-b", {**CARD, "context_length": 999999})
        assert "w-b" not in await reader.get_model_card_entries("m-trust")
        assert "w-b" not in (await reader.get_model_cards("m-trust"))["m-trust"]

        async def no_fetch(*_: str) -> bytes:
            raise AssertionError("the tokenizer is cached")

        async def load(model: str) -> object:
            return await reader.get_model_card_entries(model)

        registry = ModelRegistry(no_fetch, load)
        card = ModelCard.from_dict(dict(CARD))
        registry.add(ServedModel("m-trust", card, tokenizer=object()))  # type: ignore[arg-type]
        await registry.apply_workers(snap)
        served = registry.get("m-trust")
        assert served is not None and [w.instance_id for w in served.workers] == ["w-a"]
        assert served.card.context_length == 2048


async def test_a_queued_reapply_does_not_bring_back_an_older_registration(agent: str) -> None:
    """A worker registers, then re-registers naming its card session. A re-apply queued while the reader
    still had the first registration must apply the newest one when it runs, or the worker stays skipped."""
    async with _discovery(agent) as worker, _discovery(agent) as reader:
        await worker.register(Instance("dynamo-worker", "w-late", "127.0.0.1", 7001, meta={"model": "m-late"}))
        await worker.put_model_card("m-late", "w-late", {**CARD, "name": "m-late"})
        fresh = await asyncio.wait_for(reader.watch("dynamo-worker", tags=[]).__anext__(), 10)
        fresh = [i for i in fresh if i.instance_id == "w-late"]
        assert fresh and CARD_SESSION_META in fresh[0].meta
        stale = [Instance("dynamo-worker", "w-late", "127.0.0.1", 7001, tags=list(fresh[0].tags),
                          meta={k: v for k, v in fresh[0].meta.items() if k != CARD_SESSION_META})]  # fmt: skip

        async def no_fetch(*_: str) -> bytes:
            raise AssertionError("the tokenizer is cached")

        async def load(model: str) -> object:
            return await reader.get_model_card_entries(model)

        registry = ModelRegistry(no_fetch, load)
        registry.add(ServedModel("m-late", ModelCard.from_dict({**CARD, "name": "m-late"}), tokenizer=object()))  # type: ignore[arg-type]
        await registry.apply_workers(stale)  # the first registration: no card_session yet, skipped
        served = registry.get("m-late")
        assert served is not None and served.workers == []
        registry._view_changed()  # another component changed the shared view: a re-apply is queued...
        await registry.apply_workers(fresh)  # ...and the re-registration arrives before it runs
        registry._cards_changed = True  # as the card watch marks it: the re-apply re-checks every card
        assert registry._reapply is not None
        await registry._reapply
        assert [w.instance_id for w in served.workers] == ["w-late"]
