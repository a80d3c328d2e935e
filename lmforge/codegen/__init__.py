"""Kernels and the ops that call them. Importing this package registers the `lmforge::` ops."""

from lmforge.codegen import attention, linear  # noqa: F401  (registers lmforge::attention, lmforge::linear)
