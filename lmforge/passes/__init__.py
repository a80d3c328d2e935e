"""The compiler's passes over `GraphIR`, run by the pass manager (`lmforge/ir/pass_manager.py`).

Importing this package registers the built-in passes. `default_pipeline` (`pipeline.py`, phases as data) is
what `lmforge optimize` runs.
"""

from lmforge.passes import (  # noqa: F401  (registration)
    constant_fold,
    convert_dtype,
    cse,
    dce,
    fuse_add_rmsnorm,
    fuse_attention,
    fuse_glu,
    fuse_rmsnorm,
    fuse_rotary,
    quantize,
    remove_noops,
    shard,
)
from lmforge.ir.pass_manager import (
    Instruments,
    PassManager,
    PassResult,
    PipelineStep,
    format_pipeline,
    load_reproducer,
    parse_pipeline,
    register_pass,
    registered_passes,
)
from lmforge.passes.pipeline import PHASES, default_pipeline
from lmforge.passes.quantize import QuantizeOptions

__all__ = ["PHASES", "Instruments", "PassManager", "PassResult", "PipelineStep", "QuantizeOptions", "default_pipeline",
           "format_pipeline", "load_reproducer", "parse_pipeline", "register_pass", "registered_passes"]
