"""The KV-aware router inside the frontend (`--router-mode kv`, Dynamo's default).

One RouterNode per model: it watches the model's workers in Consul, subscribes to their KV events and
keeps the index and the active sequences in this process, so a request costs no Route/Update gRPC
hop (see docs/router.md for when a separate `dynamo-router` is the better choice).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client.core import Metric

from dynamo_grpc import errors
from dynamo_grpc.discovery import Discovery
from dynamo_grpc.discovery.usable import WorkerView
from dynamo_grpc.events.curve import CurveConfig
from dynamo_grpc.events.sockets import BoundPub
from dynamo_grpc.frontend.routing import Pick, WorkerEndpoint
from dynamo_grpc.router.config import RouterConfig
from dynamo_grpc.router.metrics import RouterMetrics
from dynamo_grpc.router.node import RouterNode
from dynamo_grpc.router.router import AllBusy, NotReady, NoWorkers, RouteInput

log = logging.getLogger(__name__)


class EmbeddedKvRouter:
    """Routes with in-process RouterNodes, created per model (ahead of time via `sync_models`)."""

    def __init__(
        self,
        discovery: Discovery,
        config: RouterConfig,
        router_id: str,
        bind_host: str = "127.0.0.1",
        ready_timeout_s: float = 10.0,
        curve: CurveConfig | None = None,
        view: WorkerView | None = None,
        replica_sync: BoundPub | None = None,
    ) -> None:
        config.validate()
        #: with replica sync: the PUB (advertised in this frontend's Consul Meta) on which every model's
        #: node publishes its active sequences; the nodes follow the other `dynamo-frontend`s'
        self.replica_sync = replica_sync
        self._view = view
        self._curve = curve
        self._discovery = discovery
        self._config = config
        self._router_id = router_id
        self._bind_host = bind_host
        self._ready_timeout = ready_timeout_s
        self.nodes: dict[str, RouterNode] = {}
        self._owner: dict[str, RouterNode] = {}  # request id -> the node that routed it
        self.metrics = RouterMetrics()

    @property
    def mode(self) -> str:
        """The routing mode (kv, round-robin, random), for the frontend.request span."""
        return self._config.mode

    def node(self, model: str) -> RouterNode:
        n = self.nodes.get(model)
        if n is None:
            cfg = dataclasses.replace(self._config, model=model)
            n = RouterNode(
                cfg,
                self._discovery,
                f"{self._router_id}/{model}",
                self._bind_host,
                self.metrics,
                share_active=self.replica_sync is not None,
                curve=self._curve,
                view=self._view,
                peer_service="dynamo-frontend",
                shared_pub=self.replica_sync,
            )
            n.start()
            self.nodes[model] = n
            log.info("embedded KV router started for model %s", model)
        return n

    def sync_models(self, models: Iterable[str]) -> None:
        """Start a node for every served model, so its index is rebuilt before the first request."""
        for m in models:
            self.node(m)

    async def route(
        self,
        request_id: str,
        model: str,
        token_ids: Sequence[int],
        workers: Sequence[WorkerEndpoint],
        exclude: set[str],
        expected_output_tokens: int,
        lora: str,
        phase: str = "aggregated",
    ) -> Pick:
        node = self.node(model)
        router = node.router
        if not router.ready and not await node.wait_ready(self._ready_timeout):
            raise errors.Unavailable(
                f"KV router for model '{model}' is still rebuilding its index from the workers' Replay",
            )
        inp = RouteInput(
            request_id=request_id,
            model=model,
            token_ids=token_ids,
            lora=lora,
            exclude=sorted(exclude),
            expected_output_tokens=expected_output_tokens,
            phase=phase,
        )
        try:
            res = await router.route_wait(inp)
        except (NotReady, NoWorkers) as e:
            raise errors.Unavailable(f"router: {e}") from None
        except AllBusy as e:
            raise errors.Overloaded(f"router: {e}") from None
        except ValueError as e:
            raise errors.InvalidArgument(f"router: {e}") from None
        self._owner[request_id] = node
        address = res.address or next((w.address for w in workers if w.instance_id == res.instance_id), "")
        if not address:
            router.free(request_id)
            self._owner.pop(request_id, None)
            raise errors.Unavailable(f"router chose {res.instance_id!r} with no address")
        return Pick(res.instance_id, address, res.overlap_blocks, res.total_cost)

    def prefill_done(self, request_id: str, output_tokens: int) -> None:
        node = self._owner.get(request_id)
        if node is not None:
            node.router.prefill_done(request_id, output_tokens)

    def free(self, request_id: str, output_tokens: int) -> None:
        node = self._owner.pop(request_id, None)
        if node is not None:
            node.router.free(request_id)

    def metric_families(self) -> Iterator[Metric]:
        """The in-process routers' `dynamo_router_*` metrics (per model) for the frontend's /metrics."""
        yield from self.metrics.collect()

    async def close(self) -> None:
        await asyncio.gather(*(n.close() for n in self.nodes.values()), return_exceptions=True)
        self.nodes.clear()
        self._owner.clear()
        if self.replica_sync is not None:
            self.replica_sync.close()
