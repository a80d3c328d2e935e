"""Kernels and the ops that call them. Importing this package registers the `lmforge::` ops."""
