"""The pass manager: named passes, textual pipelines, properties and instruments.

A pass is a plain function `fn(ir: GraphIR, options) -> PassResult`, registered by name with
`@register_pass`. It holds no state between runs; its options come in a frozen dataclass that the pipeline
string fills in:

    "remove-noops,dce,constant-fold,convert-dtype{dtype=bfloat16}"

Each pass declares the graph properties it `requires` and the ones it `establishes`; every property not
listed in `preserves` is dropped after it runs (MLIR's rule: nothing survives unless declared preserved).
The manager checks requirements before each pass, records time and stats, and runs instruments around
it: print-after, dump-to-directory, verify-after-each (debug mode) and a reproducer written when a pass
fails, holding the input graph and the pipeline string that broke it.

The properties, and the ordering rules they enforce (a pass that needs one fails before it runs, in one
line naming it and the passes before it):

    specs           every node carries meta["spec"] (capture; every pass keeps it)
    cache-in-place  KV writes are in-place copies into the cache inputs (capture; fuse-attention needs it)
    source-dtype    the weights are still in the dtype they were captured in: quantize and fuse-attention
                    need it, convert-dtype ends it (so both run before convert-dtype)
    unquantized     no layer is quantized yet: quantize needs it and ends it (it runs once)
    unfolded        constant-fold has not run: the fusions need it (they run before constant-fold)
    unsharded       one device's graph: every rewrite but dce needs it, shard ends it (shard runs last)
    folded          weight-only subgraphs are folded (constant-fold establishes it)

This module sits in `ir/` because both the compiler's passes (`passes/`) and the runtime's load pipeline
(`runtime/load.py`) register passes with it; it imports neither.
"""

from __future__ import annotations

import dataclasses
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from lmforge.errors import PassError
from lmforge.ir.graph import GraphIR


@dataclass(frozen=True)
class PassResult:
    changed: bool
    stats: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class NoOptions:
    pass


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: Callable[[GraphIR, Any], PassResult]
    options: type
    requires: frozenset[str]
    establishes: frozenset[str]
    preserves: frozenset[str]


# Properties a graph can have (see the module docstring); capture establishes CAPTURED.
PROPERTIES = frozenset({"specs", "cache-in-place", "source-dtype", "unquantized", "unfolded", "unsharded", "folded"})
CAPTURED = frozenset({"specs", "cache-in-place", "source-dtype", "unquantized", "unfolded", "unsharded"})

_REGISTRY: dict[str, PassInfo] = {}


def register_pass(
    name: str,
    *,
    options: type = NoOptions,
    requires: Iterable[str] = ("specs",),
    establishes: Iterable[str] = (),
    preserves: Iterable[str] = (),
):
    """Register `fn` under `name`. Options must be a frozen dataclass with defaults for every field. A pass
    keeps only the properties it lists in `preserves` (default: none)."""

    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"pass {name!r} registered twice")
        unknown = (set(requires) | set(establishes) | set(preserves)) - PROPERTIES
        if unknown:
            raise ValueError(f"pass {name!r} names unknown properties {sorted(unknown)}")
        _REGISTRY[name] = PassInfo(name, fn, options, frozenset(requires), frozenset(establishes), frozenset(preserves))
        return fn

    return wrap


def registered_passes() -> dict[str, PassInfo]:
    """The passes registered so far: importing `lmforge.passes` registers the compiler's, importing
    `lmforge.runtime.load` the runtime's load pipeline."""
    return dict(_REGISTRY)


# --- pipelines ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineStep:
    name: str
    options: Any

    def __str__(self) -> str:
        fields = [
            f"{f.name}={_format_value(getattr(self.options, f.name))}"
            for f in dataclasses.fields(self.options)
            if getattr(self.options, f.name) != f.default
        ]
        return f"{self.name}{{{','.join(fields)}}}" if fields else self.name


def _format_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def parse_pipeline(text: str) -> list[PipelineStep]:
    """`"a,b{k=v,k2=v2}"` -> steps; the inverse of `format_pipeline`."""
    passes = registered_passes()
    steps: list[PipelineStep] = []
    for item in _split_top_level(text):
        name, _, rest = item.partition("{")
        name = name.strip()
        if name not in passes:
            raise PassError(f"unknown pass {name!r} in pipeline {text!r}; known: {', '.join(sorted(passes))}")
        if rest and not rest.endswith("}"):
            raise PassError(f"unclosed '{{' after {name!r} in pipeline {text!r}")
        options = _parse_options(passes[name], rest[:-1] if rest else "")
        steps.append(PipelineStep(name, options))
    return steps


def format_pipeline(steps: Iterable[PipelineStep]) -> str:
    return ",".join(str(s) for s in steps)


def _split_top_level(text: str) -> list[str]:
    items, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    return [i.strip() for i in items if i.strip()]


def _parse_options(info: PassInfo, text: str):
    fields = {f.name: f for f in dataclasses.fields(info.options)}
    hints = typing.get_type_hints(info.options)
    values: dict[str, Any] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, eq, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in fields:
            known = ", ".join(fields) or "none"
            raise PassError(f"bad option {pair!r} for pass {info.name!r}; its options: {known}")
        values[key] = _convert(raw.strip(), hints[key], f"{info.name}.{key}")
    return info.options(**values)


def _convert(raw: str, typ: Any, where: str) -> Any:
    if typ is bool:
        if raw.lower() not in ("true", "false", "1", "0"):
            raise PassError(f"{where} must be true or false, got {raw!r}")
        return raw.lower() in ("true", "1")
    if typ in (int, float):
        try:
            return typ(raw)
        except ValueError:
            raise PassError(f"{where} must be {typ.__name__}, got {raw!r}") from None
    return raw


# --- running -----------------------------------------------------------------------------------------


@dataclass
class Instruments:
    """What the manager does around each pass."""

    print_after: frozenset[str] = frozenset()  # pass names whose output IR is printed ("all" for every pass)
    print_fn: Callable[[str], None] = print
    dump_dir: Path | None = None  # write the IR after each pass to NN-name.txt here
    verify_each: bool = False  # run the verifier after every pass (debug mode)
    reproducer_dir: Path | None = None  # on failure: input graph + pipeline string, for `lmforge` to replay
    on_pass_start: Callable[[str], None] | None = None  # progress reporting: each pass's name as it starts
    on_pipeline_start: Callable[[int], None] | None = None  # progress reporting: how many passes will run


def check_order(steps: Iterable[PipelineStep], properties: frozenset[str] = CAPTURED) -> str | None:
    """Why `steps` cannot run in this order on a graph with `properties` (the first pass that needs a property
    the passes before it ended), or None."""
    passes = registered_passes()
    done: list[str] = []
    for step in steps:
        info = passes[step.name]
        missing = info.requires - properties
        if missing:
            return (f"pass {step.name!r} requires {sorted(missing)}, which the passes before it "
                    f"({', '.join(done) or 'none'}) did not establish or did not preserve")
        properties = (properties & info.preserves) | info.establishes
        done.append(step.name)
    return None


class PassManager:
    def __init__(self, pipeline: str | list[PipelineStep], instruments: Instruments | None = None):
        self.steps = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
        self.instruments = instruments or Instruments()

    @property
    def pipeline(self) -> str:
        return format_pipeline(self.steps)

    def run(self, ir: GraphIR, properties: frozenset[str] = CAPTURED) -> GraphIR:
        from lmforge.ir.printer import format_ir
        from lmforge.ir.verify import verify

        passes = registered_passes()
        inst = self.instruments
        problem = check_order(self.steps, properties)  # before any pass runs: an ordering error costs nothing
        if problem:
            raise PassError(problem)
        verify(ir, where="before the pipeline")
        if inst.on_pipeline_start:
            inst.on_pipeline_start(len(self.steps))
        done: list[str] = []
        for index, step in enumerate(self.steps):
            info = passes[step.name]
            if inst.on_pass_start:
                inst.on_pass_start(step.name)
            nodes_before = len(ir.graph.nodes)
            snapshot = _snapshot(ir) if inst.reproducer_dir else None
            start = time.perf_counter()
            try:
                result = info.fn(ir, step.options)
                ir.gm.recompile()
                if inst.verify_each:
                    verify(ir, where=f"after pass {step.name!r}")
            except Exception as e:
                if snapshot is not None:
                    _write_reproducer(snapshot, self.steps[index:], inst.reproducer_dir)
                before = f" (after {', '.join(done)})" if done else ""
                detail = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise PassError(f"pass {step.name!r} failed{before}: {detail}") from e
            seconds = time.perf_counter() - start
            done.append(step.name)
            ir.history.append(
                {
                    "pass": str(step),
                    "seconds": round(seconds, 4),
                    "changed": result.changed,
                    "stats": dict(result.stats),
                    "nodes_before": nodes_before,
                    "nodes_after": len(ir.graph.nodes),
                }
            )
            text = None
            if step.name in inst.print_after or "all" in inst.print_after:
                text = format_ir(ir)
                inst.print_fn(f"// IR after {step}\n{text}")
            if inst.dump_dir is not None:
                inst.dump_dir.mkdir(parents=True, exist_ok=True)
                (inst.dump_dir / f"{index:02d}-{step.name}.txt").write_text(text or format_ir(ir))
        verify(ir, where="after the pipeline")
        return ir


def _snapshot(ir: GraphIR):
    """The graph as JSON plus references to its weights (passes replace weights, never mutate them)."""
    from lmforge.ir.serialize import graph_to_json

    return graph_to_json(ir), {ir.weight_names.get(a, a): t for a, t in ir.weights().items()}, ir.config


def _write_reproducer(snapshot, steps: list[PipelineStep], out: Path) -> None:
    import json

    from safetensors.torch import save_file

    graph_json, weights, config = snapshot
    out.mkdir(parents=True, exist_ok=True)
    (out / "graph.json").write_text(json.dumps(graph_json))
    save_file({k: v.detach().contiguous().clone() for k, v in weights.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, default=str))
    (out / "pipeline.txt").write_text(format_pipeline(steps) + "\n")


def load_reproducer(path: str | Path) -> tuple[GraphIR, str]:
    """The graph a failing pass received and the pipeline from that pass on, as `--debug` wrote them:

        ir, pipeline = load_reproducer("out.reproducer")
        PassManager(pipeline, Instruments(verify_each=True)).run(ir)   # fails the same way
    """
    import json

    from safetensors.torch import load_file

    from lmforge.ir.serialize import graph_from_json

    path = Path(path)
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    ir = graph_from_json(json.loads((path / "graph.json").read_text()), load_file(str(path / "model.safetensors")),
                         config, where=str(path / "graph.json"))
    return ir, (path / "pipeline.txt").read_text().strip()
