"""A watch decodes only the health entries that changed (discovery/entries.py), and never sees a view
that differs from decoding the whole answer, whatever the entries' strings contain or the layout is."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_grpc.discovery.client import Instance, _instance_from_entry
from dynamo_grpc.discovery.entries import EntryDecoder, split_entries


def _entry(iid: str, meta: dict[str, str] | None = None, tags: list[str] | None = None) -> dict[str, Any]:
    """The shape of one /v1/health/service entry (Consul's field order: Node, Service, Checks)."""
    return {
        "Node": {"ID": "n-1", "Node": "node1", "Address": "127.0.0.1", "TaggedAddresses": {"lan": "127.0.0.1"},
                 "Meta": {"consul-network-segment": ""}, "CreateIndex": 5, "ModifyIndex": 5},
        "Service": {"ID": iid, "Service": "dynamo-worker", "Tags": tags or ["m"], "Address": "10.0.0.1",
                    "Meta": meta or {"grpc": "10.0.0.1:7001"}, "Port": 7001, "Weights": {"Passing": 1, "Warning": 1}},
        "Checks": [{"Node": "node1", "CheckID": "serfHealth", "Status": "passing", "ServiceID": ""},
                   {"Node": "node1", "CheckID": f"service:{iid}", "Status": "passing", "ServiceID": iid}],
    }  # fmt: skip


def _consul_body(entries: list[dict[str, Any]]) -> bytes:
    """Go's encoder: compact, no spaces."""
    return json.dumps(entries, separators=(",", ":")).encode()


def _pretty_body(entries: list[dict[str, Any]]) -> bytes:
    """`consul agent -dev` and ``?pretty``: Go's json.MarshalIndent(obj, "", "    ") and a newline."""
    return json.dumps(entries, indent=4).encode() + b"\n"


def _dev_body(entries: list[dict[str, Any]]) -> bytes:
    """consul-dev's: json.dumps defaults, entries joined with ', '."""
    return b"[" + b", ".join(json.dumps(e).encode() for e in entries) + b"]"


def test_entries_split_at_entry_boundaries_only_in_both_layouts() -> None:
    entries = [_entry(f"w{i}") for i in range(3)]
    for body in (_consul_body(entries), _pretty_body(entries), _dev_body(entries)):
        pieces = split_entries(body)
        assert pieces is not None and len(pieces) == 3
        assert [json.loads(p) for p in pieces] == entries  # the checks' "Node" strings are not boundaries
    assert split_entries(b"[]") == [] and split_entries(b" [ ] ") == []
    assert split_entries(b'{"not": "a list"}') is None


@pytest.mark.parametrize("encode", [_consul_body, _pretty_body, _dev_body])
def test_a_change_decodes_only_the_new_entry_and_gives_the_same_view(encode: Any) -> None:
    dec = EntryDecoder(_instance_from_entry)
    entries = [_entry(f"w{i:02d}") for i in range(60)]
    first = dec.decode(encode(entries))
    assert dec.decoded == 60
    joined = [*entries[:30], _entry("new"), *entries[30:]]
    second = dec.decode(encode(joined))
    assert dec.decoded == 61  # one entry decoded; 60 reused
    assert second == [_instance_from_entry(e) for e in joined]
    assert second[0] is first[0]  # reused as is
    # An instance whose Meta changed is a different entry: decoded again, the new Meta is seen.
    changed = [*joined[:5], _entry("w05", meta={"grpc": "10.0.0.9:1"}), *joined[6:]]
    third = dec.decode(encode(changed))
    assert dec.decoded == 62
    assert third[5].meta == {"grpc": "10.0.0.9:1"}
    # A leave decodes nothing.
    dec.decode(encode(changed[1:]))
    assert dec.decoded == 62


def test_a_layout_that_does_not_split_is_decoded_whole() -> None:
    """Another server putting Service first: nothing splits, so the answer is decoded in full, correctly."""
    entries = [{"Service": e["Service"], "Node": e["Node"], "Checks": e["Checks"]} for e in
               (_entry(f"w{i}") for i in range(4))]  # fmt: skip
    dec = EntryDecoder(_instance_from_entry)
    assert dec.decode(_consul_body(entries)) == [_instance_from_entry(e) for e in entries]
    assert dec.decode(_consul_body(entries[:3])) == [_instance_from_entry(e) for e in entries[:3]]
    assert dec.decoded == 7


# Strings that look like entry boundaries, braces, quotes and backslashes, in Meta values, keys and tags.
_PARTS = ["}", "{", ",", " ", '"', "\\", '"Node"', ":", "[", "]", "a"]
_tricky = st.lists(st.sampled_from(_PARTS), max_size=12).map("".join)


@settings(max_examples=150, deadline=None)
@given(
    metas=st.lists(st.dictionaries(_tricky, _tricky, max_size=3), min_size=1, max_size=6),
    tags=st.lists(_tricky, max_size=3),
    layout=st.sampled_from([_consul_body, _pretty_body, _dev_body]),
    drop=st.integers(min_value=0, max_value=5),
)
def test_any_strings_give_the_view_a_full_decode_gives(
    metas: list[dict[str, str]], tags: list[str], layout: Any, drop: int
) -> None:
    encode = layout
    entries = [_entry(f"w{i}", meta=m or None, tags=tags or None) for i, m in enumerate(metas)]
    dec = EntryDecoder(_instance_from_entry)
    assert dec.decode(encode(entries)) == [_instance_from_entry(e) for e in entries]
    later = [e for i, e in enumerate(entries) if i != drop] + [_entry("late", meta={"x": '}, {"Node": {'})]
    assert dec.decode(encode(later)) == [_instance_from_entry(e) for e in later]


def test_the_instances_come_from_the_entries() -> None:
    inst = EntryDecoder(_instance_from_entry).decode(_consul_body([_entry("w1", tags=["m", "dyn-shard=3"])]))[0]
    assert inst == Instance("dynamo-worker", "w1", "10.0.0.1", 7001, ["m"], {"grpc": "10.0.0.1:7001"})
