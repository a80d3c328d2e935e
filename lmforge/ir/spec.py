"""Per-node shape and dtype metadata that survives serialization.

`torch.export` leaves a FakeTensor in `node.meta["val"]`; FakeTensors cannot be written to JSON and need a
live ShapeEnv to mean anything. Every lmforge graph therefore also carries `node.meta["spec"]`, a plain
value built from `val` at capture time and kept up to date by every pass:

- `TensorSpec(shape, dtype)`: a tensor; a dimension is an int, or a string naming a symbolic size
  (`"batch"`, `"seq"`, `"kv_len"`, or an expression such as `"kv_len - seq"`).
- `SymSpec(expr)`: a symbolic integer (the result of `sym_size` and integer arithmetic on it).
- a tuple of these: an op with several results, read through `operator.getitem`.
- `None`: a node with no value (`output`, and ops that return nothing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

import torch

Dim = Union[int, str]


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[Dim, ...]
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"{dtype_short(self.dtype)}[{', '.join(str(d) for d in self.shape)}]"

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)


@dataclass(frozen=True)
class SymSpec:
    expr: str

    def __str__(self) -> str:
        return f"sym({self.expr})"


Spec = Union[TensorSpec, SymSpec, tuple, None]

_SHORT = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "bool", torch.float8_e4m3fn: "f8e4m3", torch.float8_e5m2: "f8e5m2",
}


def dtype_short(dtype: torch.dtype) -> str:
    return _SHORT.get(dtype, str(dtype).removeprefix("torch."))


def dtype_from_name(name: str) -> torch.dtype:
    """`"float32"` -> `torch.float32`, refusing anything that is not a dtype."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dim(d, names: dict[str, str]) -> Dim:
    if isinstance(d, int):
        return d
    if isinstance(d, torch.SymInt) and d.node.is_constant():
        return int(d)
    expr = str(d)
    for sym, name in names.items():
        expr = re.sub(rf"\b{re.escape(sym)}\b", name, expr)
    return expr


def spec_from_value(val, names: dict[str, str] | None = None) -> Spec:
    """Build a spec from a node's `meta["val"]` (FakeTensor, SymInt, tuple or None).

    `names` renames export's symbols (`s0`, `s27`) to readable ones (`batch`).
    """
    names = names or {}
    if isinstance(val, torch.Tensor):
        return TensorSpec(tuple(_dim(d, names) for d in val.shape), val.dtype)
    if isinstance(val, (torch.SymInt, int)) and not isinstance(val, bool):
        return SymSpec(str(_dim(val, names)))
    if isinstance(val, (tuple, list)):
        return tuple(spec_from_value(v, names) for v in val)
    return None


def spec_from_tensor(t: torch.Tensor) -> TensorSpec:
    return TensorSpec(tuple(int(d) for d in t.shape), t.dtype)


def spec_of(arg) -> TensorSpec | None:
    """The tensor spec of a node argument (`meta["spec"]`), or None: a scalar, a tuple, a missing spec."""
    spec = arg.meta.get("spec") if hasattr(arg, "meta") else None
    return spec if isinstance(spec, TensorSpec) else None
