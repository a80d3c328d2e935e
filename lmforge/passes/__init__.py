"""Passes over `GraphIR`, run by the pass manager in `manager.py`.

Importing this package registers the built-in passes. `default_pipeline` is what `lmforge optimize` runs.
"""

from lmforge.passes import (  # noqa: F401  (registration)
    constant_fold,
    convert_dtype,
    dce,
    fuse_attention,
    fuse_rmsnorm,
    fuse_rotary,
    quantize,
    remove_noops,
    shard,
)
from lmforge.passes.manager import (
    Instruments,
    PassManager,
    PassResult,
    format_pipeline,
    load_reproducer,
    parse_pipeline,
    register_pass,
    registered_passes,
)

__all__ = ["Instruments", "PassManager", "PassResult", "default_pipeline", "format_pipeline", "load_reproducer",
           "parse_pipeline", "register_pass", "registered_passes"]


def default_pipeline(dtype: str | None = None, max_seq_len: int | None = None, quant: str | None = None,
                     tp: int = 1) -> str:
    """cleanup -> fuse (attention) -> lower (quantize, dtype) -> fuse (norms and rotary, with the casts lowering
    added) -> fold (and tabulate per-position work up to max_seq_len) -> shard (tp > 1) -> cleanup. `quant`
    holds the quantize pass's options, e.g. "scheme=int4,group_size=64"."""
    steps = ["remove-noops", "dce", "fuse-attention"]
    if quant:  # int4 scales are made in the compute dtype the graph is about to get
        dtype_option = f",dtype={dtype}" if dtype in ("bfloat16", "float16") else ""
        steps.append(f"quantize{{{quant}{dtype_option}}}")
    if dtype in ("bfloat16", "float16"):
        steps.append(f"convert-dtype{{dtype={dtype}}}")
    steps += ["fuse-rmsnorm", "fuse-rotary"]
    steps.append(f"constant-fold{{max_positions={max_seq_len}}}" if max_seq_len else "constant-fold")
    if tp > 1:  # last: every rewrite before it works on the one-device graph
        steps.append(f"shard{{tp={tp}}}")
    steps.append("dce")
    return ",".join(steps)
