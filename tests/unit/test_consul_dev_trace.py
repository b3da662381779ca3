"""consul-dev's --trace-file (consul_dev/trace.py) and its tag index (consul_dev/service_rows.py): a
blocking health query that returns for a change leaves one line with the write, wake-up and answer times
the discovery bench lines up with its watchers'; the tag index answers every tag/filter combination the
same as looking at every instance."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

from tests.helpers.consul_dev import ConsulHTTP, run_consul_dev


def _reg(name: str, iid: str, tags: list[str]) -> dict[str, object]:
    return {"Name": name, "ID": iid, "Tags": tags, "Check": {"TTL": "30s", "Status": "passing"}}


async def test_trace_file_records_each_blocking_answer_of_a_change(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    name = f"t-{uuid.uuid4().hex[:8]}"
    with run_consul_dev(extra_args=["--trace-file", str(trace)]) as agent:
        async with ConsulHTTP(agent.address) as c:
            await c.put("/v1/agent/service/register", body=_reg(name, "a1", ["s=a"]))
            _, headers, _ = await c.get(f"/v1/health/service/{name}", params={"passing": "1", "tag": "s=a"})
            idx = headers["X-Consul-Index"]
            params = {"passing": "1", "tag": "s=a", "index": idx, "wait": "20s"}
            readers = [asyncio.create_task(c.get(f"/v1/health/service/{name}", params=params)) for _ in range(3)]
            await asyncio.sleep(0.3)
            t_write = time.monotonic()
            await c.put("/v1/agent/service/register", body=_reg(name, "a2", ["s=a"]))
            answers = await asyncio.wait_for(asyncio.gather(*readers), 10)
    new_index = {int(h["X-Consul-Index"]) for _, h, _ in answers}
    assert len(new_index) == 1 and new_index.pop() > int(idx)
    records = [json.loads(x) for x in trace.read_text().splitlines()]
    lines = [x for x in records if "commit" in x]
    # one line per reader that blocked and was answered; the non-blocking read above left none
    assert len(lines) == 3
    for pause in (x for x in records if "commit" not in x):  # the collector's pauses of >= 1 ms, if any
        assert set(pause) == {"gc", "start", "end", "collected"} and pause["end"] - pause["start"] >= 0.001
    for line in lines:
        assert line["service"] == name and line["tags"] == ["s=a"]
        assert line["index"] == int(answers[0][1]["X-Consul-Index"])
        assert t_write <= line["commit"] <= line["woke"] <= line["ready"] <= time.monotonic()
        assert line["bytes"] == len(json.dumps(answers[0][2]).encode())  # the answer as encoded, before gzip


async def test_tag_index_answers_like_a_full_scan() -> None:
    """Every combination of tags and filter the shards use, checked against the instances registered."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    regs = {f"i{k}": [f"shard={k % 3}", "marked" if k % 2 else "plain", "Mixed-Case"] for k in range(9)}
    regs["other"] = ["shard=0"]  # no marker, no Mixed-Case: seen by the catch-all only
    with run_consul_dev() as agent:
        async with ConsulHTTP(agent.address) as c:
            for iid, tags in regs.items():
                await c.put("/v1/agent/service/register", body=_reg(name, iid, tags))

            async def ids(params: dict[str, str]) -> list[str]:
                _, _, body = await c.get(f"/v1/health/service/{name}", params={"passing": "1", **params})
                assert isinstance(body, list)
                return [e["Service"]["ID"] for e in body]

            def expect(pred: object) -> list[str]:
                return sorted(i for i, t in regs.items() if pred(t))  # type: ignore[operator]

            assert await ids({"tag": "shard=1"}) == expect(lambda t: "shard=1" in t)
            assert await ids({"tag": "mixed-case"}) == expect(lambda t: "Mixed-Case" in t)  # tags match case-blind
            both = await ids({"tag": "shard=0", "filter": 'Service.Tags contains "marked"'})
            assert both == expect(lambda t: "shard=0" in t and "marked" in t)
            assert await ids({"filter": 'Service.Tags not contains "Mixed-Case"'}) == ["other"]
            assert await ids({"filter": '"nowhere" not in Service.Tags'}) == sorted(regs)
            assert await ids({"tag": "nowhere"}) == []
            # Once every instance carries the tag, the catch-all is empty (the short cut), and not before.
            await c.put("/v1/agent/service/deregister/other")
            assert await ids({"filter": 'Service.Tags not contains "mixed-case"'}) == []
            await c.put("/v1/agent/service/register", body=_reg(name, "late", ["shard=2"]))
            assert await ids({"filter": 'Service.Tags not contains "mixed-case"'}) == ["late"]
