"""torchao's quantization primitives, which the schemes' math is built on, imported quietly and only when used."""

from __future__ import annotations

import logging

from lmforge.errors import LmforgeError


def import_torchao_quietly():
    """torchao's `quant_primitives` module, or None when torchao is not installed. torchao logs a warning for
    each optional CUDA extension it cannot load on a CPU machine (and transformers imports it when it is
    there), so the first import happens here with those loggers silenced."""
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        from torchao.quantization import quant_primitives
    except ImportError:
        return None
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)
    return quant_primitives


def torchao_primitives():
    """torchao's quantization primitives, which the schemes' math uses; a one-line error without torchao."""
    primitives = import_torchao_quietly()
    if primitives is None:
        raise LmforgeError("quantizing needs torchao: pip install torchao")
    return primitives
