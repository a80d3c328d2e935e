"""Quantization schemes: one handler per scheme, and which layers get which scheme.

    scheme  file     handler     config (frozen, versioned)              packed tensors
    int4    int4.py  Int4Scheme  Int4Config(group_size, symmetric, method)  qweight (N, K/2) uint8,
                                                                            scales, zeros (N, K/G)
    fp8     fp8.py   Fp8Scheme   Fp8Config()                                qweight (N, K) float8_e4m3fn,
                                                                            scales (N,) float32
    int8    int8.py  Int8Scheme  Int8Config()                               qweight (N, K) int8,
                                                                            scales (N,) float32

Each scheme file holds the pure math (`quantize`/`dequantize`, the reference the ops and tests compare
against) and the scheme's handler (`scheme.py` says what a handler owns: config, packing, the op and its
arguments, how its tensors are cut for tensor parallelism, its manifest layout). Everything outside this
package asks the registry, never the config classes: `handler(name)`, `handler_for(cfg)`,
`handler_for_op(node.target)`. `rules.py` decides each layer's scheme (`LayerRules`: skip globs and
per-pattern overrides); `primitives.py` imports torchao, whose primitives the math uses.

The pass `quantize` (`passes/quantize.py`) rewrites linear layers into each scheme's op
(`lmforge::int4_linear`, `lmforge::fp8_linear`, `lmforge::int8_linear`, defined in `codegen/quant_linear.py`).

A new scheme is a new file here with its math and a `@register_scheme` handler class, imported below (the
import order is the order messages list the schemes in), and its op in `codegen/`.
"""

from lmforge.quant import int4  # noqa: F401  (registers int4, first)
from lmforge.quant import fp8  # noqa: F401  (registers fp8)
from lmforge.quant import int8  # noqa: F401  (registers int8)
from lmforge.quant.fp8 import Fp8Config
from lmforge.quant.int4 import Int4Config
from lmforge.quant.int8 import Int8Config
from lmforge.quant.primitives import import_torchao_quietly, torchao_primitives
from lmforge.quant.rules import DEFAULT_SKIP, LayerRules, make_config
from lmforge.quant.scheme import (SCHEMES, PackedTensor, QuantScheme, handler, handler_for, handler_for_op,
                                  register_scheme)

__all__ = ["DEFAULT_SKIP", "SCHEMES", "Fp8Config", "Int4Config", "Int8Config", "LayerRules", "PackedTensor",
           "QuantScheme", "handler", "handler_for", "handler_for_op", "import_torchao_quietly", "make_config",
           "register_scheme", "torchao_primitives"]
