"""Which Ray node is which node of the fleet: pure matching of node labels to config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from policies.config import NodeSpec


@dataclass(frozen=True)
class PresentNode:
    """A live Ray node that is one of the fleet's nodes."""

    name: str
    node_id: str
    labels: dict[str, str]


def present_nodes(
    specs: Iterable[NodeSpec], ray_nodes: Iterable[dict[str, Any]], known: Mapping[str, str] | None = None
) -> dict[str, PresentNode]:
    """The fleet's nodes Ray has alive now, by name (`ray_nodes` as `ray.nodes()` lists them).

    Two live Ray nodes matching one fleet node (a Mac restarted under the same label before
    Ray declared its old self dead): the one in `known` ({name: node id}) is kept until it goes.
    """
    alive = [n for n in ray_nodes if n.get("Alive")]
    known = known or {}
    present = {}
    for spec in specs:
        matches = [
            n for n in alive if all(n.get("Labels", {}).get(k) == v for k, v in spec.selector.items())
        ]
        if matches:
            node = next((n for n in matches if n["NodeID"] == known.get(spec.name)), matches[0])
            present[spec.name] = PresentNode(spec.name, node["NodeID"], dict(node.get("Labels", {})))
    return present
