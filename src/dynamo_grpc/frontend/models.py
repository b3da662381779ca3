"""The models this frontend serves, as workers come and go.

Workers register `dynamo-worker` in Consul and publish a model card in KV; the frontend learns both from
a watch, fetches `tokenizer.json` from a worker once per sha256 (cached across models and restarts of
workers), and keeps per model the card, the tokenizer and the live workers. A model whose workers are
all gone stays known (its card is cached) but has no workers: requests get UNAVAILABLE, not NOT_FOUND.

A worker serves only when its registration is within bounds and its card is sealed and held by the
session its registration names (discovery/validate.py); the verdicts go into the process's one
WorkerView (discovery/usable.py), which the embedded KV router shares, and workers the router skipped
(events unreachable) are left out here too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from dynamo_grpc.discovery.usable import WorkerView
from dynamo_grpc.discovery.validate import RegistrationFilter, card_problem
from dynamo_grpc.discovery.worker_roles import role_of
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

    def __init__(
        self,
        fetch_file: FetchFile,
        load_cards: LoadCards,
        namespace: str = "dynamo",
        view: WorkerView | None = None,
        forget_address: Callable[[str], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        """``forget_address``: release what the process holds for a worker address that left (its
        channel); awaited in the background so that streams still on it can finish."""
        self._fetch_file = fetch_file
        self._forget_address = forget_address
        self._addresses: set[str] = set()
        self._forgetting: set[asyncio.Task[None]] = set()
        self._load_cards = load_cards
        self.namespace = namespace
        self._models: dict[str, ServedModel] = {}
        self._tokenizers: dict[str, Tokenizer] = {}  # by sha256
        self._background: set[asyncio.Future[Any]] = set()  # tokenizer tables being built in a thread
        self._lock = asyncio.Lock()
        self.changed = asyncio.Event()
        self.view = view or WorkerView()
        self.registrations = RegistrationFilter()
        self._last: list[InstanceLike] | None = None
        self._awaiting_cards: set[str] = set()  # workers registered whose card is not in KV yet
        self._cards_changed = False  # KV changed under the cards: check them again on the next apply
        self._reapply: asyncio.Task[None] | None = None
        self.view.on_change(self._view_changed)

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

    def _view_changed(self) -> None:
        """Another component skipped or cleared a worker: re-apply the last snapshot (once at a time)."""
        if self._last is None or (self._reapply is not None and not self._reapply.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._reapply = loop.create_task(self.apply_workers(), name="registry-reapply")

    async def apply_workers(self, instances: Iterable[InstanceLike] | None = None) -> None:
        """Bring the model table in line with a snapshot of passing `dynamo-worker` instances (None: the
        newest one received again).

        Whatever snapshot a call brings, the newest one received is what gets applied: a re-apply queued
        behind the lock must not bring back an older registration (one without its card_session, say) after
        a newer one was applied, or that worker stays skipped until something else changes.
        """
        if instances is not None:
            self._last = list(instances)
        async with self._lock:
            if self._last is None:
                return
            snapshot = self._last
            valid = self.registrations.valid(snapshot)
            for iid, why in self.registrations.reasons.items():
                self.view.skip(iid, "registration", why)
            self.view.retain("registration", set(self.registrations.reasons))
            self.view.retain("card", {i.instance_id for i in valid})
            metas = {i.instance_id: dict(i.meta or {}) for i in valid}
            by_model: dict[str, list[WorkerEndpoint]] = {}
            for inst in valid:
                if not self._in_namespace(inst):
                    continue
                model = (inst.meta or {}).get("model")
                if not model:
                    model = next((t[6:] for t in inst.tags or [] if t.startswith("model=")), "")
                if not model:
                    continue
                role = role_of(inst.tags, inst.meta)
                by_model.setdefault(model, []).append(WorkerEndpoint(inst.instance_id, _worker_address(inst), role))
            for name, workers in by_model.items():
                entry = self._models.get(name)
                if entry is None:
                    try:
                        entry = await self._load(name, workers, metas)
                    except Exception as e:  # a worker whose card is not there yet: next snapshot retries
                        log.warning("model %s not loaded yet: %s", name, e)
                        continue
                    self._models[name] = entry
                    log.info("serving model %s (%d workers)", name, len(workers))
                known = {w.instance_id for w in workers}
                if self._cards_changed or known != {w.instance_id for w in entry.workers}:
                    known = await self._with_cards(name, known, metas)
                carded = {i for i in known if self.view.usable(i)}
                entry.workers = sorted((w for w in workers if w.instance_id in carded), key=lambda w: w.instance_id)
            for name, entry in self._models.items():
                if name not in by_model and entry.workers:
                    log.info("model %s has no live workers", name)
                    entry.workers = []
            self._forget_gone({w.address for ws in by_model.values() for w in ws})
            self._cards_changed = False
            self.changed.set()

    def _forget_gone(self, addresses: set[str]) -> None:
        gone, self._addresses = self._addresses - addresses, addresses
        if self._forget_address is None:
            return
        for address in gone:
            task = asyncio.ensure_future(self._forget_address(address))
            self._forgetting.add(task)
            task.add_done_callback(self._forgetting.discard)

    async def _with_cards(self, model: str, instance_ids: set[str], metas: Mapping[str, Mapping[str, str]]) -> set[str]:
        """Workers whose card is trusted (validate.card_problem) and agrees with the served card (block
        size, tokenizer); others are skipped. A worker whose card is not in KV yet waits for it."""
        entry = self._models[model]
        try:
            raw = await self._load_cards(model)
        except Exception as e:
            log.warning("cannot read model cards of %s: %s", model, e)
            return {i for i in instance_ids if i in {w.instance_id for w in entry.workers}}
        if isinstance(raw, Mapping) and not ("name" in raw and "tokenizer_sha256" in raw):
            ok: set[str] = set()
            self._awaiting_cards -= instance_ids
            self._awaiting_cards |= instance_ids - set(raw)
            for iid in instance_ids - set(raw):  # no trusted card (yet): nobody in this process routes to it
                self.view.skip(iid, "card", f"no trusted model card of {model} in KV", quiet=True)
            for iid, d in raw.items():
                if iid not in instance_ids:
                    continue
                problem = card_problem(d, metas.get(iid, {}))
                if problem is not None:
                    self.view.skip(iid, "card", f"model card of {model}: {problem}")
                    continue
                try:
                    card = ModelCard.from_dict(dict(d))
                except (ValueError, TypeError) as e:
                    log.warning("bad model card %s/%s: %s", model, iid, e)
                    continue
                if card.tokenizer_sha256 != entry.card.tokenizer_sha256 or card.block_size != entry.card.block_size:
                    self.view.skip(iid, "card", f"serves {model} with a different tokenizer or block size")
                    continue
                self.view.clear(iid, "card")
                ok.add(iid)
            return ok
        return instance_ids

    async def _load(
        self, model: str, workers: list[WorkerEndpoint], metas: Mapping[str, Mapping[str, str]]
    ) -> ServedModel:
        raw = await self._load_cards(model)
        live = {w.instance_id for w in workers}
        if isinstance(raw, Mapping) and not ("name" in raw and "tokenizer_sha256" in raw):
            # only a card held by a live worker's own session may define the model
            raw = {i: d for i, d in raw.items() if i in live and card_problem(d, metas.get(i, {})) is None}
        dicts = _card_dicts(raw)
        if not dicts:
            raise LookupError(f"no trusted model card for {model} in KV yet")
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
            # the detokeniser's ASCII table, in a thread: the model is served at once (decoder's way until built)
            built = asyncio.ensure_future(asyncio.to_thread(tok.ascii_pieces))
            self._background.add(built)
            built.add_done_callback(self._background.discard)
            self._tokenizers[sha] = tok
        return ServedModel(model, card, tok)

    async def watch(self, discovery: Any) -> None:
        """Follow `dynamo-worker` in Consul until cancelled.

        A worker's card may land in KV a moment after its service entry, so while a model is pending the
        latest snapshot is re-applied in the background; the watch itself never waits for it.
        """
        retry: asyncio.Task[None] | None = None
        cards = asyncio.get_running_loop().create_task(self._follow_cards(discovery), name="watch-cards")
        try:
            async for snapshot in discovery.watch("dynamo-worker"):
                if retry is not None:
                    retry.cancel()
                await self.apply_workers(snapshot)
                if self._pending(snapshot):
                    retry = asyncio.get_running_loop().create_task(self._retry(snapshot))
        finally:
            cards.cancel()
            if retry is not None:
                retry.cancel()

    async def _follow_cards(self, discovery: Any) -> None:
        """A card replaced or deleted under a live worker (its service entry unchanged) is checked again."""
        first = True
        async for _ in discovery.watch_model_cards():
            if not first and self._last is not None:
                self._cards_changed = True
                await self.apply_workers()
            first = False

    def _pending(self, snapshot: list[Any]) -> bool:
        if self._awaiting_cards & {i.instance_id for i in snapshot}:
            return True
        return any((i.meta or {}).get("model") not in self._models for i in snapshot if (i.meta or {}).get("model"))

    async def _retry(self, snapshot: list[Any]) -> None:
        delay = 0.1
        while self._pending(snapshot):
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            await self.apply_workers()  # the newest snapshot, not the one this retry started from
