"""Kernels and the ops that call them. Importing this package registers the `lmforge::` ops."""

from lmforge.codegen import attention, collectives, glu, linear, quant_linear, rms_norm, rotary  # noqa: F401  (registers the lmforge:: ops)
