"""The lean decode step of a CPU engine: the loaded graph with its runs of kernel calls made by step programs.

A bound decode step (`bind.py`) of SmolLM-135M still makes ~280 kernel calls from Python, each paying for the
interpreter, argument checks, ctypes' conversions and a fresh output tensor: ~4 ms of an 8 ms int4 step on a
2-core EPYC. `lean_graph(ir)` derives a second GraphModule from the loaded one (as `prefill.py` does) for the
engine's decode steps:

  1. a node is *recordable* when its op declares `OpFacts.record` (linear, int4_linear, rms_norm, add_rms_norm,
     glu, qkv_attention), or it is a view (getitem, split, unsqueeze, ...);
  2. nodes that depend on no recordable node (the embedding lookup, the rotary tables' gathers and casts) move
     ahead of the first recordable one;
  3. each maximal run of recordable nodes becomes one call of a `Segment`: its sub-graph, plus one step program
     (`codegen/cpu_program.py`) per layout of its inputs it has met.

A Segment's first call with a layout (the inputs' dtypes, shapes and strides, and the thread count; the KV
cache's and the mask's length excepted, which is the program's kv_len) walks the sub-graph with Refs, each op's
recorder appending the kernel call its CPU implementation would make; later calls with that layout are one C
call. Where an op declines (a layout its kernel does not take, as a batch past the GEMV's rows), that layout
gets no program and the sub-graph runs node by node, as before. Outputs are copied out of the program's
scratch buffer, so nothing aliases between steps. Results are those of the bound graph, bit for bit: the same
kernels in the same order. `LMFORGE_LEAN_STEP=0` turns it off.
"""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass, field

import torch
from torch import fx

from lmforge.codegen import cpu_program
from lmforge.ir.graph import GraphIR, op_name
from lmforge.ir.ops import bound_op, op_facts

aten = torch.ops.aten
VIEWS = frozenset({operator.getitem, aten.split_with_sizes.default, aten.split.Tensor, aten.unsqueeze.default,
                   aten.squeeze.dim, aten.view.default, aten.slice.Tensor, aten.select.int, aten.transpose.int,
                   aten.permute.default, aten.t.default, aten.alias.default})
MASK_INPUT = 2  # the calling convention (ir/graph.py): attention_mask (batch, kv_len), then the caches
MAX_LAYOUTS = 8  # a segment meeting more input layouts than this stops recording (the shapes change every step)


@dataclass
class LeanStats:
    segments: int = 0
    recorded: int = 0  # nodes inside segments
    left: dict[str, int] = field(default_factory=dict)  # op -> nodes left between segments (they split them)


def enabled(device: torch.device) -> bool:
    return device.type == "cpu" and os.environ.get("LMFORGE_LEAN_STEP", "1") != "0" and cpu_program.available()


def _recordable(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target in VIEWS:
        return isinstance(node.args[0], fx.Node)
    facts = op_facts(node.target)
    return facts is not None and facts.record is not None


def _kernel_call(node: fx.Node) -> bool:
    return node.target not in VIEWS


def _name(target) -> str:
    return op_name(bound_op(target) or target).removesuffix(".default")


def lean_graph(ir: GraphIR) -> tuple[fx.GraphModule, LeanStats] | None:
    """The decode-step GraphModule with its recordable runs as Segments, and what it did; None if there is no run."""
    nodes = list(ir.graph.nodes)
    inside: set[fx.Node] = set()
    depends: set[fx.Node] = set()
    for node in nodes:  # depends: recordable kernel calls and everything downstream of one
        if _recordable(node) and _kernel_call(node) or any(a in depends for a in node.all_input_nodes):
            depends.add(node)
        if node in depends and _recordable(node):
            inside.add(node)  # (a view of a value nothing recordable made moves to the front instead)
    if not any(_kernel_call(n) for n in inside):
        return None
    first = next(i for i, n in enumerate(nodes) if n in inside)
    head = [n for n in nodes[first:] if n not in depends and n.op != "output"]
    order = nodes[:first] + head + [n for n in nodes[first:] if n in depends or n.op == "output"]

    graph, env, stats = fx.Graph(), {}, LeanStats()
    placeholders = [n for n in nodes if n.op == "placeholder"]
    dynamic = {n: (1 if i == MASK_INPUT else 2) for i, n in enumerate(placeholders) if i >= MASK_INPUT}
    run: list[fx.Node] = []

    def flush():
        if any(_kernel_call(n) for n in run):
            _segment(ir, graph, env, run, dynamic, stats)
        else:  # views alone: nothing to record
            for node in run:
                env[node] = graph.node_copy(node, lambda n: env[n])
        run.clear()

    for node in order:
        if node in inside:
            run.append(node)
            continue
        flush()
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node in depends and node.op == "call_function":
            name = _name(node.target)
            stats.left[name] = stats.left.get(name, 0) + 1
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:  # weights only segments read
            graph.erase_node(node)
    graph.lint()
    return fx.GraphModule(ir.gm, graph), stats


def _segment(ir: GraphIR, graph: fx.Graph, env: dict, run: list[fx.Node], dynamic: dict, stats: LeanStats) -> None:
    """Replace `run` (consecutive recordable nodes) by one Segment call in `graph`."""
    members = set(run)
    sub, sub_env, inputs = fx.Graph(), {}, []
    for node in run:
        for arg in node.all_input_nodes:
            if arg in members or arg in sub_env:
                continue
            if arg.op == "get_attr":
                sub_env[arg] = sub.get_attr(arg.target)
            else:
                sub_env[arg] = sub.placeholder(f"in_{len(inputs)}")
                inputs.append(arg)
        sub_env[node] = sub.node_copy(node, lambda n: sub_env[n])
    users_outside = [n for n in run if any(u not in members for u in n.users)]
    sub.output(tuple(sub_env[n] for n in users_outside))
    segment = Segment(fx.GraphModule(ir.gm, sub), [dynamic.get(n) for n in inputs], stats.segments)
    call = graph.call_function(segment, tuple(env[n] for n in inputs))
    for i, node in enumerate(users_outside):
        env[node] = graph.call_function(operator.getitem, (call, i))
        env[node].meta = dict(node.meta)
    stats.segments += 1
    stats.recorded += len(run)


class Segment:
    """One run of recordable nodes: `segment(*inputs)` -> its outputs (a tuple), by a step program where the inputs'
    layout has one, else by its sub-graph."""

    def __init__(self, gm: fx.GraphModule, dynamic: list[int | None], index: int):
        self.gm, self.dynamic = gm, dynamic  # per input: the dim whose size is kv_len, or None
        self.__name__ = f"lean_segment_{index}"
        self.programs: dict[tuple, cpu_program.Program | None] = {}
        self.declined: dict[tuple, str] = {}  # layout -> the op that declined it

    def _layout(self, args) -> tuple[tuple, int]:
        key, kv_len = [torch.get_num_threads()], -1
        for t, d in zip(args, self.dynamic):
            if not isinstance(t, torch.Tensor):
                key.append(t)
            elif d is None:
                key.append((t.dtype, t.shape, t.stride()))
            else:
                shape = t.shape
                if kv_len < 0:
                    kv_len = shape[d]
                elif shape[d] != kv_len:
                    raise ValueError(f"{self.__name__}: KV cache and mask lengths differ ({shape[d]} != {kv_len})")
                key.append((t.dtype, shape[:d], shape[d + 1:], t.stride()))
        return tuple(key), kv_len

    def __call__(self, *args):
        key, kv_len = self._layout(args)
        program = self.programs.get(key, False)
        if program is False:
            if len(self.programs) >= MAX_LAYOUTS:  # layouts that keep changing: stop recording them
                return tuple(self.gm(*args))
            program = self.programs[key] = self._record(key, args)
        if program is None:
            return tuple(self.gm(*args))
        return tuple(program([a for a in args if isinstance(a, torch.Tensor)], kv_len))

    def _record(self, key: tuple, args) -> cpu_program.Program | None:
        b = cpu_program.Builder()
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        env: dict[fx.Node, object] = {n: b.input(t, d) if isinstance(t, torch.Tensor) else t
                                      for n, t, d in zip(placeholders, args, self.dynamic)}
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "get_attr":
                env[node] = _attr(self.gm, node.target)
                continue
            if node.op == "output":
                return b.finish([env[n] for n in node.args[0]])
            args_ = fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
            args_, kwargs = _constants(b, args_), _constants(b, kwargs)
            if node.target not in VIEWS:
                out = op_facts(node.target).record(b, *args_, **kwargs)
            elif isinstance(args_[0], cpu_program.Ref):
                try:
                    out = cpu_program.view(node.target, *args_, **kwargs)
                except RuntimeError:  # a view the layout does not allow (PyTorch would copy)
                    out = None
            else:
                out = node.target(*args_, **kwargs)  # getitem of a recorded op's tuple of outputs
            if out is None:
                self.declined[key] = _name(node.target)
                return None
            env[node] = out
        return None


def segments(gm: fx.GraphModule) -> list[Segment]:
    """The Segments a lean graph calls, in order."""
    return [n.target for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.target, Segment)]


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _constants(b: cpu_program.Builder, value):
    """Weights (tensors among a node's arguments at record time) as the builder's constant Refs."""
    if isinstance(value, torch.Tensor):
        return b.constant(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_constants(b, v) for v in value)
    if isinstance(value, dict):
        return {k: _constants(b, v) for k, v in value.items()}
    return value
