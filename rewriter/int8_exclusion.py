"""Which nodes to keep in float when static int8 breaks the task: candidate blocks from the graph.

Quantization error that reaches an output through nothing but cheap ops (a detector's decode:
sigmoid, concat of box pixels with scores sharing one int8 range) is the usual culprit, so
blocks grow backwards from the outputs:

- the *tail*: every non-compute node after the last compute op (Conv, Gemm, MatMul, ...) on
  its path to an output: cheap to keep in float, often most of the damage;
- then the *frontier*: each compute op all of whose compute descendants are already in float,
  with the cheap nodes between it and the float region (a head's final convs, then the convs
  before them).

Greedy selection by measured task error per MAC kept in float lives in the quantize pass; this
module only knows the graph.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import onnx

#: Ops whose int8 kernels are where the speed comes from; the rest is cheap plumbing.
COMPUTE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
TAIL_NAME = "tail after the last compute op"


@dataclass(frozen=True)
class Block:
    """Nodes to keep in float together, and the compute MACs that then run in float."""

    name: str
    nodes: tuple[str, ...]
    macs: int


class NodeGraph:
    """Node-level producer/consumer view of an ONNX graph, by node name."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        graph = proto.graph
        self.nodes = {n.name: n for n in graph.node}
        producer = {out: n.name for n in graph.node for out in n.output if out}
        self.children: dict[str, set[str]] = {n.name: set() for n in graph.node}
        self.parents: dict[str, set[str]] = {n.name: set() for n in graph.node}
        for node in graph.node:
            for value in node.input:
                if value in producer:
                    self.parents[node.name].add(producer[value])
                    self.children[producer[value]].add(node.name)
        outputs = {o.name for o in graph.output}
        self.sinks = {producer[o] for o in outputs if o in producer}
        self.order = [n.name for n in graph.node]  # onnx graphs are topologically sorted

    def is_compute(self, name: str) -> bool:
        return self.nodes[name].op_type in COMPUTE_OPS

    def descendants(self, name: str) -> set[str]:
        seen: set[str] = set()
        stack = list(self.children[name])
        while stack:
            current = stack.pop()
            if current not in seen:
                seen.add(current)
                stack.extend(self.children[current])
        return seen

    def feeds_outputs(self) -> set[str]:
        """Nodes with a path to a graph output."""
        seen: set[str] = set()
        stack = list(self.sinks)
        while stack:
            current = stack.pop()
            if current not in seen:
                seen.add(current)
                stack.extend(self.parents[current])
        return seen


def unnamed_nodes(proto: onnx.ModelProto) -> list[int]:
    """Indices of nodes without a name (nodes_to_exclude works by name)."""
    return [i for i, n in enumerate(proto.graph.node) if not n.name]


def tail_block(graph: NodeGraph, macs: Mapping[str, int]) -> Block | None:
    """Non-compute nodes with no compute op downstream, on a path to an output."""
    live = graph.feeds_outputs()
    nodes = [
        n for n in graph.order
        if n in live and not graph.is_compute(n)
        and not any(graph.is_compute(d) for d in graph.descendants(n))
    ]
    if not nodes:
        return None
    return Block(TAIL_NAME, tuple(nodes), sum(macs.get(n, 0) for n in nodes))


def frontier_blocks(
    graph: NodeGraph, in_float: Iterable[str], macs: Mapping[str, int]
) -> list[Block]:
    """Compute ops not in float whose compute descendants all are, each with the cheap nodes
    between it and the float region."""
    floating = set(in_float)
    live = graph.feeds_outputs()
    blocks = []
    for name in graph.order:
        if name in floating or name not in live or not graph.is_compute(name):
            continue
        below = graph.descendants(name)
        if any(graph.is_compute(d) and d not in floating for d in below):
            continue
        between = [d for d in graph.order if d in below and d not in floating]
        nodes = (name, *between)
        op = graph.nodes[name].op_type
        blocks.append(Block(f"{op} {name}", nodes, sum(macs.get(n, 0) for n in nodes)))
    return blocks


def merge_blocks(blocks: Iterable[Block], name: str) -> Block:
    """One block holding every node of `blocks` (each node counted once)."""
    nodes: dict[str, None] = {}
    macs: dict[str, int] = {}
    for block in blocks:
        for node in block.nodes:
            nodes.setdefault(node)
        macs[block.name] = block.macs
    return Block(name, tuple(nodes), sum(macs.values()))
