"""Decode only the entries of a health answer that changed since the query's previous answer.

A blocking query's answer is the whole list again after every change; a change is usually one instance
joining or leaving, yet json-decoding the list was ~40 % of a watcher's CPU per change (a ~60-entry
shard, 83 KB, ~0.9 ms of the ~2.3 ms on an idle core; ``bench discovery --trace``). Consul's answer to
``/v1/health/service/<name>`` is a JSON array of ``{"Node": {...}, "Service": {...}, "Checks": [...]}``
objects, each encoded the same way every time it is sent while it does not change (Go's encoder keeps
struct field order and sorts map keys; consul-dev caches each entry's bytes). So the answer is split
into its entries' bytes at the one boundary that can only be between two entries, ``},{"Node":{``
(an unescaped quote after ``{`` opens a key, so this never matches inside a string; the checks' own
``"Node"`` is a string, not an object), and an entry whose bytes the previous answer already had keeps
its decoded ``Instance``. A piece that is not one whole JSON object (another server's layout) makes the
answer decode in full, so a wrong split costs time, never a wrong view.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

#: what separates two entries: Consul's answer (Go's json.Marshal), `consul agent -dev`'s (it indents
#: every answer, as ``?pretty`` does: json.MarshalIndent with 4 spaces) and consul-dev's (json.dumps)
_SEPARATORS = (b'},{"Node":{', b'},\n    {\n        "Node": {', b'}, {"Node": {')


def split_entries(body: bytes) -> list[bytes] | None:
    """The bytes of each top-level entry of a health answer, or None if it is not a JSON array. Split
    with ``bytes.split`` on a literal separator (a regular expression over 80 KB cost half a JSON decode);
    a layout with other spacing comes back as one piece, which then fails to decode as one object."""
    body = body.strip()
    if not (body.startswith(b"[") and body.endswith(b"]")):
        return None
    inner = body[1:-1].strip()
    if not inner:
        return []
    for sep in _SEPARATORS:
        parts = inner.split(sep)
        if len(parts) > 1:
            break
    else:
        return [inner]
    # Give each piece back the braces the separator took, so that it is the entry's own bytes.
    head, last = sep[sep.index(b"{") :], len(parts) - 1
    return [(head if i else b"") + part + (b"}" if i < last else b"") for i, part in enumerate(parts)]


class EntryDecoder(Generic[T]):
    """Decodes one query's successive answers, reusing what each unchanged entry decoded to last time.
    ``decoded`` counts entries actually decoded (the rest were reused)."""

    def __init__(self, convert: Callable[[dict[str, Any]], T]) -> None:
        self.convert = convert
        self._known: dict[bytes, T] = {}
        self.decoded = 0

    def decode(self, body: bytes) -> list[T]:
        pieces = split_entries(body)
        if pieces is not None:
            try:
                known, out = {}, []
                for piece in pieces:
                    item = self._known.get(piece)
                    if item is None:
                        entry = json.loads(piece)
                        if not isinstance(entry, dict):
                            raise ValueError("not an object")
                        item = self.convert(entry)
                        self.decoded += 1
                    known[piece] = item
                    out.append(item)
                self._known = known  # only the current answer's entries: memory stays one answer's worth
                return out
            except (ValueError, KeyError, TypeError):
                pass  # not split where we thought (or not Consul's layout): decode it whole below
        entries = json.loads(body) or []
        out = [self.convert(e) for e in entries]
        self.decoded += len(out)
        self._known = {}
        return out
