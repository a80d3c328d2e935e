"""The default pipeline `lmforge optimize` runs, as data grouped by phase.

    phase     passes                                   why here
    cleanup   remove-noops, dce                        fewer pass-through nodes for the fusions to walk
    fuse      fuse-attention                           on the float graph, before convert-dtype casts it
    lower     quantize, convert-dtype                  quantize reads the weights as captured; then the dtype
    fuse      fuse-rmsnorm, fuse-add-rmsnorm,      they fuse the casts lowering added; the residual add
              fuse-rotary, fuse-glu                    joins the norm that reads it
    fold      constant-fold                            tabulates per-position work up to max_seq_len
    shard     shard                                    last: every rewrite before it sees one device's graph
    cleanup   cse, dce                                 one copy of what every layer recomputes (cos/sin views and
                                                       casts), then drops what the rewrites disconnected

Each step names a pass and how its options follow from the user's choices (`dtype`, `max_seq_len`, the
quantization options, `tp`), or None when the step does not apply. The pass manager enforces the order
through the passes' properties; this table only chooses it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from lmforge.ir.pass_manager import PipelineStep, registered_passes
from lmforge.passes.quantize import QuantizeOptions

LOW_PRECISION = ("bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Choices:
    """What the user chose, which the steps' options follow from."""

    dtype: str | None = None  # the compute dtype to convert to (None: keep the captured one)
    max_seq_len: int | None = None
    quant: QuantizeOptions | None = None
    tp: int = 1


def _quantize(c: Choices) -> QuantizeOptions | None:
    if c.quant is None:
        return None
    # int4 scales are made in the compute dtype the graph is about to get
    return dataclasses.replace(c.quant, dtype=c.dtype) if c.dtype in LOW_PRECISION else c.quant


def _convert(c: Choices) -> dict[str, Any] | None:
    return {"dtype": c.dtype} if c.dtype in LOW_PRECISION else None


Options = Callable[[Choices], "dict[str, Any] | QuantizeOptions | None"]
ALWAYS: Options = lambda c: {}  # noqa: E731

PHASES: tuple[tuple[str, tuple[tuple[str, Options], ...]], ...] = (
    ("cleanup", (("remove-noops", ALWAYS), ("dce", ALWAYS))),
    ("fuse", (("fuse-attention", ALWAYS),)),
    ("lower", (("quantize", _quantize), ("convert-dtype", _convert))),
    ("fuse", (("fuse-rmsnorm", ALWAYS), ("fuse-add-rmsnorm", ALWAYS), ("fuse-rotary", ALWAYS), ("fuse-glu", ALWAYS))),
    ("fold", (("constant-fold", lambda c: {"max_positions": c.max_seq_len} if c.max_seq_len else {}),)),
    ("shard", (("shard", lambda c: {"tp": c.tp} if c.tp > 1 else None),)),
    ("cleanup", (("cse", ALWAYS), ("dce", ALWAYS))),
)


def default_pipeline(dtype: str | None = None, max_seq_len: int | None = None, quant: QuantizeOptions | None = None,
                     tp: int = 1) -> list[PipelineStep]:
    """The steps of `PHASES` that apply to these choices; `format_pipeline` prints them as text. `quant` holds the
    quantize pass's options, e.g. `QuantizeOptions("int4", group_size=64)`."""
    choices, passes = Choices(dtype, max_seq_len, quant, tp), registered_passes()
    steps = []
    for _, phase in PHASES:
        for name, options_for in phase:
            options = options_for(choices)
            if options is None:
                continue
            if isinstance(options, dict):
                options = passes[name].options(**options)
            steps.append(PipelineStep(name, options))
    return steps
