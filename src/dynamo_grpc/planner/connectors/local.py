"""The local connector: each pool is a set of ``dynamo-grpc worker`` processes on this machine.

A pool's command line is configurable (``--pool-command prefill='worker --engine mocker --role prefill'``); the
connector adds ``--consul``/``--namespace``, ``--port 0``, ``--metrics-port 0`` and a ``--ready-file`` it reads
to know the worker's instance id and metrics address.

Scale-down stops workers that are still starting first (they hold no work), then the least-loaded running ones
(fewest in-flight streams, from their ``/metrics``). A stopped worker gets SIGTERM, which is the worker's own
drain: it leaves Consul first, finishes its streams within ``--drain-grace`` and hands back the rest (the
frontend migrates them). The connector waits for drained workers in the background; ``close()`` reaps them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from dynamo_grpc.launch.children import with_parent_death
from dynamo_grpc.planner.connectors.base import ConnectorError

log = logging.getLogger("dynamo_grpc.planner.local")



@dataclass
class LocalWorker:
    name: str
    pool: str
    popen: subprocess.Popen[bytes]
    ready_file: Path
    log: Path
    started_at: float = field(default_factory=time.monotonic)
    draining: bool = False
    #: when the connector saw it exit (monotonic); None while it lives
    ended_at: float | None = None

    def info(self) -> dict[str, str] | None:
        """The worker's ready file (instance_id, grpc_address, metrics_address), or None while it starts."""
        try:
            data: dict[str, str] = json.loads(self.ready_file.read_text())
        except (OSError, ValueError):
            return None
        return data

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


def inflight_streams(metrics_address: str, timeout_s: float = 2.0) -> float | None:
    """``dynamo_worker_inflight_requests`` summed over models; None when it cannot be read."""
    try:
        with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=timeout_s) as r:
            text = r.read().decode()
    except OSError:
        return None
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "dynamo_worker_inflight_requests":
                total += float(s.value)
    return total


class LocalConnector:
    def __init__(
        self,
        commands: dict[str, list[str]],
        consul: str,
        namespace: str = "dynamo",
        log_dir: Path | None = None,
        env: dict[str, str] | None = None,
        stop_timeout_s: float = 60.0,
    ) -> None:
        if not commands:
            raise ValueError("the local connector needs at least one pool")
        self.commands = commands
        self.consul = consul
        self.namespace = namespace
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="dynamo-planner-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.stop_timeout_s = stop_timeout_s
        self.workers: list[LocalWorker] = []
        #: every worker ever started, live or gone (worker-seconds = sum of their lifetimes)
        self.history: list[LocalWorker] = []
        self._seq = 0
        self._reapers: set[asyncio.Task[None]] = set()
        #: (pool, instance_id or name, exit code) of every worker that has left
        self.stopped: list[tuple[str, str, int | None]] = []

    # -- reading ---------------------------------------------------------------------------
    def pool_workers(self, pool: str, include_draining: bool = False) -> list[LocalWorker]:
        return [w for w in self.workers if w.pool == pool and w.alive and (include_draining or not w.draining)]

    async def replicas(self) -> dict[str, int]:
        self._forget_dead()
        return {pool: len(self.pool_workers(pool)) for pool in self.commands}

    def _forget_dead(self) -> None:
        for w in list(self.workers):
            if not w.alive and not w.draining:
                why = f"exited with code {w.popen.returncode} (log: {w.log})"
                log.warning("worker %s of pool %s %s", w.name, w.pool, why)
                self.workers.remove(w)
                w.ended_at = time.monotonic()
                self.stopped.append((w.pool, (w.info() or {}).get("instance_id", w.name), w.popen.returncode))

    # -- acting ----------------------------------------------------------------------------
    async def scale(self, pool: str, replicas: int) -> None:
        if pool not in self.commands:
            raise ConnectorError(f"unknown pool {pool!r} (pools: {', '.join(self.commands)})")
        if replicas < 0:
            raise ConnectorError(f"pool {pool}: replicas must be >= 0, got {replicas}")
        self._forget_dead()
        have = self.pool_workers(pool)
        if replicas > len(have):
            for _ in range(replicas - len(have)):
                self._spawn(pool)
        elif replicas < len(have):
            for w in await self._pick_victims(have, len(have) - replicas):
                self._drain(w)

    async def _pick_victims(self, workers: list[LocalWorker], n: int) -> list[LocalWorker]:
        """Starting workers first (newest first), then the running ones with the fewest in-flight streams."""

        async def load(w: LocalWorker) -> tuple[int, float, float]:
            info = w.info()
            if info is None:
                return (0, 0.0, -w.started_at)
            addr = info.get("metrics_address") or ""
            inflight = await asyncio.to_thread(inflight_streams, addr) if addr else None
            return (1, inflight if inflight is not None else float("inf"), -w.started_at)

        keyed = [(await load(w), i, w) for i, w in enumerate(workers)]
        keyed.sort(key=lambda t: (t[0], t[1]))
        return [w for _, _, w in keyed[:n]]

    def _spawn(self, pool: str) -> LocalWorker:
        self._seq += 1
        name = f"{pool}-{self._seq}"
        ready = self.log_dir / f"{name}.ready.json"
        logf = self.log_dir / f"{name}.log"
        ready.unlink(missing_ok=True)
        # the planner runs gRPC threads (a benchmark's client, for one): spawned without a preexec_fn
        # (launch/children.py), dying with us all the same
        argv = with_parent_death([
            sys.executable, "-m", "dynamo_grpc.cli", *self.commands[pool],
            "--consul", self.consul, "--namespace", self.namespace,
            "--port", "0", "--metrics-port", "0", "--ready-file", str(ready),
        ])  # fmt: skip
        # the pool's settings are on its command line: DYN_<FLAG> variables of the planner's own
        # environment (DYN_METRICS_PORT, ...) must not reach the workers
        base = self.env if self.env is not None else os.environ
        env = {k: v for k, v in base.items() if not k.startswith("DYN_") or k == "DYN_LOG"}
        env["PYTHONUNBUFFERED"] = "1"
        with open(logf, "wb") as fh:
            popen = subprocess.Popen(
                argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )  # fmt: skip
        w = LocalWorker(name, pool, popen, ready, logf)
        self.workers.append(w)
        self.history.append(w)
        log.info("pool %s: started %s (pid %d)", pool, name, popen.pid)
        return w

    def _drain(self, w: LocalWorker) -> None:
        w.draining = True
        info = w.info() or {}
        log.info("pool %s: draining %s (%s)", w.pool, w.name, info.get("instance_id", "not registered yet"))
        with contextlib.suppress(ProcessLookupError):
            w.popen.send_signal(signal.SIGTERM)
        task = asyncio.create_task(self._reap(w), name=f"reap-{w.name}")
        self._reapers.add(task)
        task.add_done_callback(self._reapers.discard)

    async def _reap(self, w: LocalWorker) -> None:
        deadline = time.monotonic() + self.stop_timeout_s
        while w.popen.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if w.popen.poll() is None:
            log.error("worker %s did not drain in %.0fs; killing it", w.name, self.stop_timeout_s)
            w.popen.kill()
            await asyncio.to_thread(w.popen.wait)
        w.ended_at = time.monotonic()
        self.stopped.append((w.pool, (w.info() or {}).get("instance_id", w.name), w.popen.returncode))
        with contextlib.suppress(ValueError):
            self.workers.remove(w)

    def worker_seconds(self, start: float, end: float) -> float:
        """Seconds of worker life (starting, serving or draining) inside the monotonic window [start, end]."""
        total = 0.0
        for w in self.history:
            stop = w.ended_at if w.ended_at is not None else end
            total += max(0.0, min(stop, end) - max(w.started_at, start))
        return total

    def alive_at(self, t: float) -> int:
        """Workers alive (starting, serving or draining) at monotonic time ``t``."""
        return sum(1 for w in self.history if w.started_at <= t and (w.ended_at is None or w.ended_at > t))

    async def wait_drained(self) -> None:
        """Until every worker told to drain has exited."""
        while self._reapers:
            await asyncio.gather(*list(self._reapers), return_exceptions=True)

    async def close(self) -> None:
        """Drain every worker and wait for them."""
        for w in list(self.workers):
            if w.alive and not w.draining:
                self._drain(w)
        await self.wait_drained()
