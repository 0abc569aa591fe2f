"""A memory-traffic model of a compiled XLA program, read from its optimized HLO text.

XLA's own cost model (``compiled.cost_analysis()["bytes accessed"]``) is not HBM traffic:
on TPU it reports several times the operand bytes of a lone matmul, and it counts nothing
for a custom call such as a Pallas kernel (see ``jmoe.aot``). This module counts bytes the
plain way, op by op, on the program XLA will actually run (after fusion):

- every top-level op (a fusion, a dot, a collective, ...) reads its operands and writes
  its result once; ops that move no data (``parameter``, ``constant``, ``tuple``,
  ``get-tuple-element``, ``bitcast``, ``*-done``) count nothing;
- a fusion operand that the fused computation only reads through ``gather``,
  ``dynamic-slice`` or ``slice`` counts the rows those read, not the whole operand (an
  embedding lookup reads ``T`` rows of the table); a fusion whose root is an in-place
  ``dynamic-update-slice`` writes only the update;
- buffers XLA placed in on-chip memory (TPU layouts with a memory space ``S(n)``, n >= 1:
  VMEM, SMEM) count nothing: their HBM traffic is the ``copy-start`` or ``slice-start``
  that filled them, which counts the bytes it reads;
- a ``while`` body counts ``known_trip_count`` times (once, flagged, when XLA does not
  know the count), a ``conditional`` its largest branch;
- a custom call counts what ``kernel_bytes(op)`` returns for it, for example the live
  tiles of a Pallas kernel's grid for a given layout, else its operands and results.

This is a model, not a measurement: caches, re-fetches XLA schedules and DMA granularity
are not in it. Its use is to compare a program with a floor written from first
principles (``benchmarks/roofline.py``).

Example:
    compiled = jax.jit(f).lower(*args).compile()
    total, ops = hlo_bytes.program_bytes(compiled.as_text())
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

ITEMSIZE = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4,
    "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
    "token": 0,
}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(ITEMSIZE, key=len, reverse=True))
                    + r")\[([^\]]*)\](\{[^}]*\})?")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) \(.*\) -> .* \{$")
_SKIP = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
         "partition-id", "replica-id", "opt-barrier", "copy-done", "slice-done", "all-gather-done",
         "all-reduce-done", "collective-permute-done", "async-done", "send-done", "recv-done",
         "add-dependency"}
_ROW_READERS = {"gather": 0, "dynamic-slice": 0, "slice": 0}  # op -> operand index read by rows
_VIEWS = {"bitcast", "reshape", "transpose", "copy"}


@dataclasses.dataclass(frozen=True)
class Array:
    """One array of an HLO shape: element type, dims, bytes, and whether it is on-chip."""

    dtype: str
    dims: tuple[int, ...]
    on_chip: bool

    @property
    def nbytes(self) -> float:
        return ITEMSIZE[self.dtype] * math.prod(self.dims)


def parse_shape(text: str) -> list[Array]:
    """The arrays of an HLO shape string (a tuple gives several), in order.

    Example: ``parse_shape("(bf16[8,128]{1,0:T(8,128)(2,1)S(1)}, s32[])")`` is a VMEM
    ``bf16[8, 128]`` and a scalar."""
    out = []
    for dtype, dims, layout in _ARRAY.findall(text):
        shape = tuple(int(d.lstrip("<=")) for d in dims.split(",") if d.strip())
        out.append(Array(dtype, shape, on_chip=bool(re.search(r"S\([1-9]", layout or ""))))
    return out


def hbm_bytes(arrays) -> float:
    """Bytes of the arrays that live off-chip."""
    return float(sum(a.nbytes for a in arrays if not a.on_chip))


@dataclasses.dataclass
class Op:
    """One HLO instruction: its name, opcode, result shape, operand names and attributes."""

    name: str
    opcode: str
    shape: list[Array]
    operands: list[str]
    attrs: str
    root: bool = False
    index: int | None = None  # a parameter's number

    @property
    def op_name(self) -> str:
        """The JAX-level name XLA kept in the metadata (``jit(f)/layer_0/moe/...``)."""
        m = re.search(r'op_name="([^"]*)"', self.attrs)
        return m.group(1) if m else ""

    def called(self, key: str) -> list[str]:
        m = re.search(key + r"=\{?([^,}]*(?:, *%[^,}]*)*)\}?", self.attrs)
        return [c.strip().lstrip("%") for c in m.group(1).split(",")] if m else []


@dataclasses.dataclass
class Computation:
    name: str
    ops: list[Op]
    entry: bool

    def __post_init__(self):
        self.by_name = {op.name: op for op in self.ops}


def _split_top(s: str) -> tuple[str, str]:
    """``s`` starts with ``(``: the balanced group and the rest."""
    depth = 0
    for i, ch in enumerate(s):
        depth += ch in "({[" and 1 or 0
        depth -= ch in ")}]" and 1 or 0
        if depth == 0:
            return s[:i + 1], s[i + 1:]
    return s, ""


def _parse_op(line: str) -> Op | None:
    body = line.strip()
    root = body.startswith("ROOT ")
    if root:
        body = body[5:]
    if not body.startswith("%") or " = " not in body:
        return None
    name, rest = body.split(" = ", 1)
    if rest.startswith("("):
        shape_text, rest = _split_top(rest)
        rest = rest.lstrip()
    else:
        shape_text, rest = rest.split(" ", 1)
    paren = rest.index("(")
    opcode = rest[:paren]
    args, attrs = _split_top(rest[paren:])
    operands = re.findall(r"%([\w.\-]+)", args)
    index = int(args.strip("()").strip()) if opcode == "parameter" else None
    return Op(name.lstrip("%"), opcode, parse_shape(shape_text), operands, attrs, root, index)


def parse_module(text: str) -> dict[str, Computation]:
    """The computations of an HLO module's text, by name (the entry one has ``entry``)."""
    comps, current, entry, ops = {}, None, False, []
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            current, entry, ops = m.group(2), bool(m.group(1)), []
            continue
        if current is None:
            continue
        if line.startswith("}"):
            comps[current] = Computation(current, ops, entry)
            current = None
            continue
        op = _parse_op(line)
        if op is not None:
            ops.append(op)
    return comps


@dataclasses.dataclass(frozen=True)
class OpBytes:
    """One top-level op's modelled traffic: ``bytes`` already multiplied by ``times``."""

    name: str
    opcode: str
    op_name: str
    bytes: float
    times: int
    note: str = ""


def _trip_count(op: Op) -> int | None:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', op.attrs)
    return int(m.group(1)) if m else None


def _param_reads(fused: Computation) -> dict[int, float | None]:
    """Per fused parameter index: the bytes read when every use is a row reader (through
    views), else None (the whole operand is read)."""
    users: dict[str, list[tuple[Op, int]]] = {}
    for op in fused.ops:
        for i, name in enumerate(op.operands):
            users.setdefault(name, []).append((op, i))

    def rows(name: str, seen=()) -> float | None:
        total = 0.0
        uses = users.get(name, [])
        if not uses:
            return 0.0
        for op, i in uses:
            if op.opcode in _ROW_READERS and i == _ROW_READERS[op.opcode]:
                total += sum(a.nbytes for a in op.shape)
            elif op.opcode in _VIEWS and op.name not in seen:
                sub = rows(op.name, seen + (op.name,))
                if sub is None:
                    return None
                total += sub
            else:
                return None
        return total

    return {op.index: rows(op.name) for op in fused.ops if op.opcode == "parameter"}


def _fusion_bytes(op: Op, fused: Computation, comp: Computation) -> tuple[float, str]:
    reads = _param_reads(fused)
    root = next((o for o in fused.ops if o.root), None)
    in_place = None
    if root is not None and root.opcode == "dynamic-update-slice":
        target = fused.by_name.get(root.operands[0])
        if target is not None and target.opcode == "parameter":
            in_place = target.index
    total, note = 0.0, ""
    for i, name in enumerate(op.operands):
        operand = comp.by_name.get(name)
        arrays = operand.shape if operand is not None else []
        if i == in_place:
            continue
        r = reads.get(i)
        if r is not None and not all(a.on_chip for a in arrays):
            total += r
            note = "rows"
        else:
            total += hbm_bytes(arrays)
    if in_place is not None:
        update = fused.by_name.get(root.operands[1])
        total += sum(a.nbytes for a in update.shape) if update is not None else 0.0
        note = (note + " in-place").strip()
    else:
        total += hbm_bytes(op.shape)
    return total, note


def program_bytes(text: str, *, kernel_bytes: Callable[[Op, list[list[Array]]], float | None]
                  | None = None) -> tuple[float, list[OpBytes]]:
    """Modelled HBM bytes of a compiled program (``compiled.as_text()``), and per op.

    Args:
        text: the optimized HLO module text.
        kernel_bytes: called with a ``custom-call`` op and its operands' arrays; returns
            the bytes it moves, or None to count its operands and results.

    Returns:
        ``(total bytes, [OpBytes, ...])`` with loop bodies multiplied by their trip count.
    """
    comps = parse_module(text)
    entry = next(c for c in comps.values() if c.entry)
    rows: list[OpBytes] = []

    def walk(comp: Computation, times: int, note: str = ""):
        for op in comp.ops:
            code = op.opcode
            if code in _SKIP:
                continue
            if code == "while":
                trip = _trip_count(op)
                for key in ("body", "condition"):
                    for sub in op.called(key):
                        if sub in comps:
                            walk(comps[sub], times * (trip or 1),
                                 note if trip else "trip count unknown: once")
                continue
            if code == "conditional":
                branches = [b for b in op.called("branch_computations") if b in comps]
                if not branches:
                    branches = [b for k in ("true_computation", "false_computation")
                                for b in op.called(k) if b in comps]
                best = None
                for b in branches:
                    sub_rows_before = len(rows)
                    walk(comps[b], times, note)
                    got = rows[sub_rows_before:]
                    del rows[sub_rows_before:]
                    if best is None or sum(r.bytes for r in got) > sum(r.bytes for r in best):
                        best = got
                rows.extend(best or [])
                continue
            if code == "call":
                for sub in op.called("to_apply"):
                    if sub in comps:
                        walk(comps[sub], times, note)
                continue
            operand_arrays = [comp.by_name[n].shape if n in comp.by_name else []
                              for n in op.operands]
            why = note
            if code == "fusion":
                fused = comps.get((op.called("calls") or [""])[0])
                if fused is not None:
                    b, why = _fusion_bytes(op, fused, comp)
                    why = (note + " " + why).strip()
                else:
                    b = sum(hbm_bytes(a) for a in operand_arrays) + hbm_bytes(op.shape)
            elif code.endswith("-start") and code in ("copy-start", "slice-start"):
                # the destination is what is read from the source and written (to HBM
                # unless on-chip); copy-start's result is (destination, source, context),
                # slice-start's ((source), destination, context)
                n_src = sum(len(a) for a in operand_arrays)
                dest = op.shape[:1] if code == "copy-start" else op.shape[n_src:n_src + 1]
                b = sum(a.nbytes for a in dest) + hbm_bytes(dest)
            elif code == "custom-call":
                b = kernel_bytes(op, operand_arrays) if kernel_bytes is not None else None
                if b is None:
                    b = sum(hbm_bytes(a) for a in operand_arrays) + hbm_bytes(op.shape)
                else:
                    why = (note + " kernel model").strip()
            else:
                b = sum(hbm_bytes(a) for a in operand_arrays) + hbm_bytes(op.shape)
            rows.append(OpBytes(op.name, code, op.op_name, b * times, times, why))

    walk(entry, 1)
    return float(sum(r.bytes for r in rows)), rows


def by_scope(rows: list[OpBytes], depth: int = 3) -> dict[str, float]:
    """Bytes summed by the first ``depth`` components of each op's JAX name (after the
    ``jit(...)`` prefix), largest first: where a program's traffic goes."""
    out: dict[str, float] = {}
    for r in rows:
        parts = [p for p in r.op_name.split("/") if not p.startswith("jit(")]
        parts = [re.sub(r"layer_\d+", "layer_*", p) for p in parts]
        key = "/".join(parts[:depth]) or r.opcode
        out[key] = out.get(key, 0.0) + r.bytes
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


__all__ = ["Array", "Op", "OpBytes", "parse_shape", "parse_module", "program_bytes",
           "by_scope"]
