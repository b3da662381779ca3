"""A small, faithful renderer for the kustomize features deploy/kubernetes uses, so tests need no binary.

Supported: ``resources`` (files, or directories holding a kustomization.yaml; files must lie in or below the
kustomization's directory, as kustomize enforces), ``namespace`` (set on every namespaced object),
``nameSuffix`` (appended to every object's name but Namespaces) and ``patches`` with a ``target`` (kind, name)
and an inline RFC 6902 JSON patch (add, replace, remove). Any other field is refused, never ignored, so a
kustomization using more than this fails the tests until the renderer learns it (or kubectl renders it).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "nameSuffix", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PriorityClass"}


class KustomizeError(ValueError):
    pass


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize directory`` would print (order aside)."""
    directory = directory.resolve()
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{directory}/kustomization.yaml: unsupported fields {sorted(unknown)}")
    objects: list[dict[str, Any]] = []
    for ref in spec.get("resources", []):
        path = (directory / ref).resolve()
        if path.is_dir():
            objects += render(path)
        elif path.is_relative_to(directory):
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
        else:
            raise KustomizeError(f"{directory}: file {ref} is not in or below the kustomization directory")
    for p in spec.get("patches", []):
        target, ops = p["target"], yaml.safe_load(p["patch"])
        hits = [o for o in objects if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]]
        if not hits:
            raise KustomizeError(f"{directory}: patch target {target} matches nothing")
        for obj in hits:
            for op in ops:
                _apply(obj, op)
    suffix = spec.get("nameSuffix", "")
    for obj in objects:
        if suffix and obj["kind"] != "Namespace":
            obj["metadata"]["name"] += suffix
        if "namespace" in spec and obj["kind"] not in CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = spec["namespace"]
    return objects


def _pointer(path: str) -> list[str]:
    return [t.replace("~1", "/").replace("~0", "~") for t in path.lstrip("/").split("/")]


def _apply(obj: dict[str, Any], op: dict[str, Any]) -> None:
    *parents, last = _pointer(op["path"])
    node: Any = obj
    for token in parents:
        node = node[int(token)] if isinstance(node, list) else node[token]
    value = copy.deepcopy(op.get("value"))
    kind = op["op"]
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if kind == "add":
            node.insert(index, value)
        elif kind == "replace":
            node[index] = value
        elif kind == "remove":
            del node[index]
        else:
            raise KustomizeError(f"unsupported patch op {kind!r}")
    elif kind in ("add", "replace"):
        if kind == "replace" and last not in node:
            raise KustomizeError(f"replace {op['path']}: no such field")
        node[last] = value
    elif kind == "remove":
        del node[last]
    else:
        raise KustomizeError(f"unsupported patch op {kind!r}")
