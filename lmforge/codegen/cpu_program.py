"""Step programs: the CPU kernel calls of a decode step, recorded once and made by one C call (`cpu/program.c`).

    b = Builder()
    x = b.input(tensor)                     # a Ref: where the step's input will be, and its layout
    y = facts.record(b, x, w_ref, ...)      # each op's `OpFacts.record` appends its kernel call, returns its output
    program = b.finish([y])                 # a Program, or None when an output is not one of its own
    (y_now,) = program([tensor], kv_len)    # runs every recorded call; the outputs are fresh tensors

A Ref stands for a tensor while recording: a slot of the program's address table plus a layout (a meta tensor:
shape, strides, storage offset, dtype). It has the attributes the kernels' `supports`/`kernel_takes` checks read,
so each op's recorder asks the same question its CPU implementation asks, and view ops (split, getitem,
unsqueeze, ...) act on the meta tensor, costing nothing at run time. Slots: 0 is the scratch buffer holding every
intermediate at its own 64-byte-aligned offset; then the inputs, refilled by each call; then the weights, whose
addresses are fixed (the program keeps them alive). Why: see `cpu/program.c`.
"""

from __future__ import annotations

import ctypes
import functools
import math

import torch

from lmforge.codegen import cpu_gemv

STEP_KINDS = ("gemv_bf16", "gemv_f32", "int4", "int4_q8", "rms_norm", "add_rms_norm", "glu_silu_bf16",  # program.c's
              "glu_gelu_tanh_bf16", "glu_silu_f32", "glu_gelu_tanh_f32", "qkv_attention", "int8",  # enum, from 1
              "amx")
STEP_REFS, STEP_INTS = 8, 20
_ALIGN = 64
_CPU = torch.device("cpu")


class StepOp(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int64), ("slot", ctypes.c_int64 * STEP_REFS), ("offset", ctypes.c_int64 * STEP_REFS),
                ("i", ctypes.c_int64 * STEP_INTS), ("f", ctypes.c_double * 2)]


@functools.lru_cache(maxsize=None)
def _runner():
    kernel = cpu_gemv.kernel()
    if kernel is None:
        return None
    lib = kernel.lib
    if lib.program_op_size() != ctypes.sizeof(StepOp):
        raise RuntimeError("program.c's step_op and cpu_program.StepOp differ")
    fn = lib.program_run
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64),
                   ctypes.c_void_p]
    return fn


def available() -> bool:
    return cpu_gemv.available()


def kind_class(kind: str) -> str:
    """"matmul", "attention" or "other": how `measure.step_split` counts a step op of `kind`."""
    if kind.startswith(("gemv", "int4", "int8", "amx")):
        return "matmul"
    return "attention" if kind.endswith("attention") else "other"


class Ref:
    """A tensor-to-be of a step program: `slot` of the address table, laid out as `meta` (a meta tensor); for an
    input whose length along one dim changes from step to step (the KV cache and its mask), that dim."""

    __slots__ = ("slot", "meta", "dynamic")
    is_cpu = True
    device = _CPU

    def __init__(self, slot: int, meta: torch.Tensor, dynamic: int | None = None):
        self.slot, self.meta, self.dynamic = slot, meta, dynamic

    shape = property(lambda self: self.meta.shape)
    dtype = property(lambda self: self.meta.dtype)

    def stride(self, dim: int | None = None):
        return self.meta.stride() if dim is None else self.meta.stride(dim)

    def size(self, dim: int | None = None):
        return self.meta.size() if dim is None else self.meta.size(dim)

    def dim(self) -> int:
        return self.meta.dim()

    def numel(self) -> int:
        return self.meta.numel()

    def is_contiguous(self) -> bool:
        return self.meta.is_contiguous()

    def element_size(self) -> int:
        return self.meta.element_size()

    @property
    def offset(self) -> int:
        """Bytes from the slot's address to element 0."""
        return self.meta.storage_offset() * self.meta.element_size()

    def __repr__(self) -> str:
        return f"Ref(slot={self.slot}, shape={tuple(self.shape)}, stride={self.stride()}, dtype={self.dtype})"


def view(op, ref: Ref, *args, **kwargs):
    """A view op (split, getitem on a split, unsqueeze, transpose, ...) applied to a Ref: Ref(s) of the same slot."""
    out = op(ref.meta, *args, **kwargs)
    wrap = lambda m: Ref(ref.slot, m, ref.dynamic if m.dim() == ref.meta.dim() else None)  # noqa: E731
    return [wrap(m) for m in out] if isinstance(out, (list, tuple)) else wrap(out)


class Builder:
    """Collects a step's kernel calls; the recorders in the op files (`OpFacts.record`) call `out`, `rows` and
    `call`."""

    def __init__(self):
        self.threads = torch.get_num_threads()
        self.kernel = cpu_gemv.kernel()
        self.ops: list[StepOp] = []
        self.fixed: dict[int, int] = {}  # slot -> address (weights)
        self.keep: list[torch.Tensor] = []
        self.n_inputs = 0
        self.scratch_bytes = 0
        self._constants: dict[tuple, Ref] = {}

    # --- values --------------------------------------------------------------------------------

    def input(self, t: torch.Tensor, dynamic: int | None = None) -> Ref:
        """The next input slot, laid out as `t` is; `dynamic`: the dim whose size is the step's kv_len."""
        if self.fixed:
            raise RuntimeError("declare every input before the first constant")
        self.n_inputs += 1
        return Ref(self.n_inputs, _meta_like(t), dynamic)

    def constant(self, t: torch.Tensor) -> Ref:
        """A weight: a slot holding its address, fixed for the program's life."""
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        ref = self._constants.get(key)
        if ref is None:
            slot = 1 + self.n_inputs + len(self.fixed)
            self.fixed[slot] = t.data_ptr()
            self.keep.append(t)
            ref = self._constants[key] = Ref(slot, _meta_like(t))
        return ref

    def out(self, shape, dtype: torch.dtype) -> Ref:
        """A new contiguous intermediate in the scratch buffer."""
        size = torch.empty((), dtype=dtype).element_size()
        start = -(-self.scratch_bytes // _ALIGN) * _ALIGN
        n = math.prod(shape)
        self.scratch_bytes = start + max(1, n) * size
        base = torch.empty(start // size + n, dtype=dtype, device="meta")
        return Ref(0, base.as_strided(tuple(shape), _contiguous_strides(shape), start // size))

    @staticmethod
    def rows(ref: Ref) -> tuple[int, int] | None:
        """`ref` (..., K) as M rows of K contiguous elements one stride apart: (M, row stride in elements), or None."""
        if ref.dim() == 0:
            return None
        K = ref.shape[-1]
        if K > 1 and ref.stride(-1) != 1:
            return None
        lead = [(s, st) for s, st in zip(ref.shape[:-1], ref.stride()[:-1]) if s > 1]
        for (_, outer), (size, inner) in zip(lead, lead[1:]):
            if outer != inner * size:
                return None
        return ref.numel() // max(K, 1), (lead[-1][1] if lead else K)

    def call(self, kind: str, refs, ints=(), floats=()) -> None:
        """Append one kernel call: `refs` its tensor operands (None: NULL), in program.c's order for `kind`."""
        op = StepOp()
        op.kind = STEP_KINDS.index(kind) + 1
        if len(refs) > STEP_REFS or len(ints) > STEP_INTS or len(floats) > 2:
            raise ValueError(f"{kind}: too many operands for a step op")
        for r in range(STEP_REFS):
            ref = refs[r] if r < len(refs) else None
            op.slot[r], op.offset[r] = (-1, 0) if ref is None else (ref.slot, ref.offset)
        for k, v in enumerate(ints):
            op.i[k] = int(v)
        for k, v in enumerate(floats):
            op.f[k] = float(v)
        self.ops.append(op)

    # --- the program ---------------------------------------------------------------------------

    def finish(self, outputs) -> Program | None:
        """The program, returning `outputs` (Refs into the scratch buffer); None if one is anything else."""
        if not self.ops or not all(isinstance(o, Ref) and o.slot == 0 for o in outputs):
            return None
        return Program(self, outputs)


class Program:
    """A recorded step: `program(inputs, kv_len)` makes every call in order and returns copies of the outputs."""

    def __init__(self, builder: Builder, outputs: list[Ref]):
        self._run = _runner()
        n = len(builder.ops)
        self.ops = (StepOp * n)(*builder.ops)
        self.n = n
        self.kinds = [STEP_KINDS[op.kind - 1] for op in builder.ops]
        self.n_inputs = builder.n_inputs
        self.scratch = torch.empty(max(builder.scratch_bytes, 1), dtype=torch.uint8)
        self.slots = (ctypes.c_void_p * (1 + builder.n_inputs + len(builder.fixed)))()
        self.slots[0] = self.scratch.data_ptr()
        for slot, address in builder.fixed.items():
            self.slots[slot] = address
        self.keep = builder.keep
        self.outputs = [_scratch_view(self.scratch, o) for o in outputs]
        self._failed = ctypes.c_int64(0)
        self.seconds = None  # `timed()`: each op's seconds, summed over the calls since

    def timed(self, on: bool = True) -> None:
        """Start (or stop) adding each op's time to `self.seconds` (a list of n floats, zeroed here)."""
        self.seconds = (ctypes.c_double * self.n)() if on else None

    def __call__(self, inputs, kv_len: int = 0) -> list[torch.Tensor]:
        slots = self.slots
        for i, t in enumerate(inputs, 1):
            slots[i] = t.data_ptr()
        err = self._run(self.ops, self.n, slots, kv_len, ctypes.byref(self._failed), self.seconds)
        if err:
            k = self._failed.value
            problem = "out of memory" if err == -2 else f"returned {err}"
            raise RuntimeError(f"step program: op {k} ({self.kinds[k]}) {problem}")
        return [o.clone() for o in self.outputs]


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(tuple(t.shape), t.stride(), dtype=t.dtype, device="meta")


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(tuple(shape)):
        strides.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(strides))


def _scratch_view(scratch: torch.Tensor, ref: Ref) -> torch.Tensor:
    size = ref.element_size()
    flat = scratch[: scratch.numel() // size * size].view(ref.dtype)
    return flat.as_strided(tuple(ref.shape), ref.stride(), ref.meta.storage_offset())
