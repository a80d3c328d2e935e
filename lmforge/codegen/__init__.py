"""Kernels and the ops that call them. Importing this package registers the `lmforge::` ops."""

from lmforge.codegen import (  # noqa: F401  (registers the lmforge:: ops)
    add_rms_norm, attention, collectives, glu, linear, qkv_attention, quant_linear, rms_norm, rotary,
)
