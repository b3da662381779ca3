"""The models this frontend serves, as workers come and go.

Workers register `dynamo-worker` in Consul and publish a model card in KV; the frontend learns both from
a watch, fetches `tokenizer.json` from a worker once per sha256 (cached across models and restarts of
workers), and keeps per model the card, the tokenizer and the live workers. A model whose workers are
all gone stays known (its card is cached) but has no workers: requests get UNAVAILABLE, not NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from dynamo_grpc.frontend.routing import WorkerEndpoint
from dynamo_grpc.models.card import TOKENIZER_FILE, ModelCard
from dynamo_grpc.tokens.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FetchFile = Callable[[str, str, str, str], Awaitable[bytes]]  # (address, model, name, sha256) -> bytes
LoadCards = Callable[[str], Awaitable[Any]]  # model -> {instance_id: card dict} (or a list of card dicts)


class InstanceLike(Protocol):
    instance_id: str
    address: str
    port: int
    tags: list[str]
    meta: dict[str, str]


@dataclass
class ServedModel:
    """A model: its card and tokenizer, and the workers serving it right now."""

    name: str
    card: ModelCard
    tokenizer: Tokenizer
    workers: list[WorkerEndpoint] = field(default_factory=list)
    loaded_at: float = field(default_factory=time.time)

    @property
    def ready(self) -> bool:
        return bool(self.workers)


def _worker_address(inst: InstanceLike) -> str:
    addr = inst.meta.get("grpc_address") if inst.meta else None
    return addr or f"{inst.address}:{inst.port}"


def _card_dicts(raw: Any) -> list[dict[str, Any]]:
    if isinstance(raw, Mapping):
        vals = list(raw.values())
        if "name" in raw and "tokenizer_sha256" in raw:
            vals = [dict(raw)]
    elif isinstance(raw, list):
        vals = raw
    else:
        vals = []
    return [v.to_dict() if isinstance(v, ModelCard) else dict(v) for v in vals if isinstance(v, (Mapping, ModelCard))]


class ModelRegistry:
    """Model name -> ServedModel, fed by worker snapshots."""

    def __init__(self, fetch_file: FetchFile, load_cards: LoadCards, namespace: str = "dynamo") -> None:
        self._fetch_file = fetch_file
        self._load_cards = load_cards
        self.namespace = namespace
        self._models: dict[str, ServedModel] = {}
        self._tokenizers: dict[str, Tokenizer] = {}  # by sha256
        self._lock = asyncio.Lock()
        self.changed = asyncio.Event()

    def get(self, name: str) -> ServedModel | None:
        return self._models.get(name)

    def models(self) -> list[ServedModel]:
        return [self._models[k] for k in sorted(self._models)]

    def add(self, model: ServedModel) -> None:
        """Serve a model directly (tests and single-process setups)."""
        self._models[model.name] = model
        self._tokenizers.setdefault(model.card.tokenizer_sha256, model.tokenizer)
        self.changed.set()

    def _in_namespace(self, inst: InstanceLike) -> bool:
        tags = list(inst.tags or [])
        ns_tags = [t for t in tags if t.startswith("namespace=")]
        return not ns_tags or f"namespace={self.namespace}" in ns_tags

    async def apply_workers(self, instances: Iterable[InstanceLike]) -> None:
        """Bring the model table in line with a snapshot of passing `dynamo-worker` instances."""
        async with self._lock:
            by_model: dict[str, list[WorkerEndpoint]] = {}
            for inst in instances:
                if not self._in_namespace(inst):
                    continue
                model = (inst.meta or {}).get("model")
                if not model:
                    model = next((t[6:] for t in inst.tags or [] if t.startswith("model=")), "")
                if not model:
                    continue
                by_model.setdefault(model, []).append(WorkerEndpoint(inst.instance_id, _worker_address(inst)))
            for name, workers in by_model.items():
                entry = self._models.get(name)
                if entry is None:
                    try:
                        entry = await self._load(name, workers)
                    except Exception as e:  # a worker whose card is not there yet: next snapshot retries
                        log.warning("model %s not loaded yet: %s", name, e)
                        continue
                    self._models[name] = entry
                    log.info("serving model %s (%d workers)", name, len(workers))
                known = {w.instance_id for w in workers}
                if known != {w.instance_id for w in entry.workers}:
                    known = await self._with_cards(name, known)
                carded = known
                entry.workers = sorted((w for w in workers if w.instance_id in carded), key=lambda w: w.instance_id)
            for name, entry in self._models.items():
                if name not in by_model and entry.workers:
                    log.info("model %s has no live workers", name)
                    entry.workers = []
            self.changed.set()

    async def _with_cards(self, model: str, instance_ids: set[str]) -> set[str]:
        """Workers whose card agrees with the served card (block size, tokenizer); others are skipped."""
        entry = self._models[model]
        try:
            raw = await self._load_cards(model)
        except Exception as e:
            log.warning("cannot read model cards of %s: %s", model, e)
            return instance_ids
        if isinstance(raw, Mapping) and not ("name" in raw and "tokenizer_sha256" in raw):
            ok: set[str] = set()
            for iid, d in raw.items():
                if iid not in instance_ids:
                    continue
                try:
                    card = ModelCard.from_dict(dict(d))
                except (ValueError, TypeError) as e:
                    log.warning("bad model card %s/%s: %s", model, iid, e)
                    continue
                if card.tokenizer_sha256 != entry.card.tokenizer_sha256 or card.block_size != entry.card.block_size:
                    log.warning("worker %s serves %s with a different tokenizer or block size; skipped", iid, model)
                    continue
                ok.add(iid)
            # Cards of brand-new workers may land after their service entry: keep those until proven wrong.
            return ok | (instance_ids - set(raw))
        return instance_ids

    async def _load(self, model: str, workers: list[WorkerEndpoint]) -> ServedModel:
        dicts = _card_dicts(await self._load_cards(model))
        if not dicts:
            raise LookupError(f"no model card for {model} in KV yet")
        card_dict = dicts[0]
        card = ModelCard.from_dict(card_dict)
        sha = str((card_dict.get("files") or {}).get(TOKENIZER_FILE) or card.tokenizer_sha256)
        tok = self._tokenizers.get(sha)
        if tok is None:
            addresses = [card_dict.get("grpc_address")] + [w.address for w in workers]
            last: Exception | None = None
            for addr in dict.fromkeys(a for a in addresses if a):
                try:
                    data = await self._fetch_file(str(addr), model, TOKENIZER_FILE, sha)
                    tok = Tokenizer.from_card(card, data)
                    break
                except Exception as e:
                    last = e
            if tok is None:
                raise LookupError(f"could not fetch {TOKENIZER_FILE} for {model}: {last}")
            self._tokenizers[sha] = tok
        return ServedModel(model, card, tok)

    async def watch(self, discovery: Any) -> None:
        """Follow `dynamo-worker` in Consul until cancelled.

        A worker's card may land in KV a moment after its service entry, so while a model is pending the
        latest snapshot is re-applied in the background; the watch itself never waits for it.
        """
        retry: asyncio.Task[None] | None = None
        try:
            async for snapshot in discovery.watch("dynamo-worker"):
                if retry is not None:
                    retry.cancel()
                await self.apply_workers(snapshot)
                if self._pending(snapshot):
                    retry = asyncio.get_running_loop().create_task(self._retry(snapshot))
        finally:
            if retry is not None:
                retry.cancel()

    def _pending(self, snapshot: list[Any]) -> bool:
        return any((i.meta or {}).get("model") not in self._models for i in snapshot if (i.meta or {}).get("model"))

    async def _retry(self, snapshot: list[Any]) -> None:
        delay = 0.1
        while self._pending(snapshot):
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            await self.apply_workers(snapshot)
