"""Read an optimized (compiled, SPMD-partitioned) XLA HLO module's text: its collectives and a rough count of the
bytes its top-level instructions move through memory.

Collectives: all-reduce, all-gather, reduce-scatter, all-to-all (and ragged-all-to-all), collective-permute, in their
synchronous and asynchronous (`-start`, or `async-start` wrapping one) forms, counted once per execution of the
computation that holds them: an instruction inside a while loop's body counts its trip count (XLA's
`known_trip_count`; 1, flagged, when unknown) times. For each: the bytes each device holds (all-reduce, all-to-all,
collective-permute: the operand; all-gather: the gathered output; reduce-scatter: the input), the group size, and
the bytes each device sends with a ring algorithm (all-reduce 2(n-1)/n, all-gather / reduce-scatter / all-to-all
(n-1)/n of that size, collective-permute all of it). Replica groups are read in the three forms XLA prints
(`{{0,1},{2,3}}`, iota `[2,4]<=[4,2]T(1,0)`, and `mesh['a'=2,'b'=4] {'b'}`); device ids are positions in the
program's device assignment, which `crossing` maps to slices to tell which collectives cross the slow links.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_OPCODES = {**{op: op for op in COLLECTIVES}, "ragged-all-to-all": "all-to-all",
            **{op + "-start": op for op in COLLECTIVES}, "ragged-all-to-all-start": "all-to-all"}
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5, "s2": 0.25, "u2": 0.25}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9](?:fn|fnuz|b11fnuz)?)?)\[([0-9,]*)\]")
_COMP_HEAD = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_CALL_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
# top-level instructions that move no data of their own
# (an asynchronous op's `-start` result is a tuple that carries its operands too: its `-done` result, the output, is
# counted instead; copy-start/-done move buffers between memory spaces, prefetches the compiler schedules)
_NO_TRAFFIC = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant", "after-all", "partition-id",
               "replica-id", "while", "conditional", "call", "copy-start", "copy-done", "async-update", "opt-barrier"}


@dataclasses.dataclass
class Collective:
    kind: str  # one of COLLECTIVES
    name: str  # the HLO instruction
    count: int  # executions per program run (trip counts of enclosing loops)
    size_bytes: float  # per device, per execution (see the module docstring)
    group_size: int
    groups: list[list[int]] | None  # device-assignment positions; None: every device in one group
    trip_count_known: bool = True

    @property
    def wire_bytes(self) -> float:
        """Bytes one device sends per execution (ring algorithm)."""
        n = max(1, self.group_size)
        factor = {"all-reduce": 2 * (n - 1) / n, "collective-permute": 1.0}.get(self.kind, (n - 1) / n)
        return factor * self.size_bytes


def shape_bytes(type_text: str) -> list[float]:
    """Bytes of each array in an HLO type ('bf16[8,128]{1,0}' or a tuple of them), in order."""
    out = []
    for dtype, dims in _SHAPE.findall(type_text):
        if dtype.startswith("f8") or dtype.startswith("f4"):
            size = 1 if dtype.startswith("f8") else 0.5
        else:
            size = DTYPE_BYTES.get(dtype)
            if size is None:
                continue
        out.append(size * math.prod(int(d) for d in dims.split(",") if d))
    return out


def _split_instruction(line: str):
    """(name, result type text, opcode, rest of the line) of one instruction line, or None."""
    m = _INSTR.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):  # tuple type: up to the matching parenthesis
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        type_text, rest = rest[:i + 1], rest[i + 1:].lstrip()
    else:
        type_text, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\(", rest)
    return (m.group(1), type_text, op.group(1), rest) if op else None


def computations(text: str) -> tuple[dict[str, list[tuple]], str]:
    """{computation name: [(name, type, opcode, rest)]} and the entry computation's name."""
    comps: dict[str, list[tuple]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            m = _COMP_HEAD.match(line)
            if m and "=" not in line.split("(")[0]:
                current = m.group(2)
                comps[current] = []
                entry = current if m.group(1) else entry
            continue
        if line.strip() == "}":
            current = None
            continue
        parsed = _split_instruction(line)
        if parsed:
            comps[current].append(parsed)
    return comps, entry


def _trip_count(rest: str) -> int | None:
    m = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', rest)
    return int(m.group(1)) if m else None


def executions(comps: dict, entry: str) -> dict[str, tuple[int, bool]]:
    """{computation: (executions per run of the entry, every enclosing trip count known)}, through while bodies
    (trip count), conditionals, calls, fusions and async wrappers (once each)."""
    out: dict[str, tuple[int, bool]] = {}

    def visit(name: str, times: int, known: bool, depth: int = 0):
        if name not in comps or depth > 64:
            return
        prev = out.get(name, (0, True))
        out[name] = (prev[0] + times, prev[1] and known)
        for _, _, op, rest in comps[name]:
            called = _CALLS.findall(rest) + [c.strip().lstrip("%") for group in _CALL_LISTS.findall(rest)
                                             for c in group.split(",") if c.strip()]
            trip = _trip_count(rest) if op == "while" else 1
            for c in called:
                body = op == "while" and re.search(r"\bbody=%?" + re.escape(c) + r"\b", rest)
                visit(c, times * ((trip or 1) if body else 1), known and (trip is not None or not body), depth + 1)

    visit(entry, 1, True)
    return out


def replica_groups(rest: str, num_devices: int) -> list[list[int]] | None:
    """Device groups of a collective from its attributes (None: all devices, one group)."""
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", rest)
    if pairs:
        return [[int(x) for x in p.split(",")] for p in re.findall(r"\{(\d+,\d+)", pairs.group(1) + "}")]
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", rest)
    if m:
        shape = [int(x) for x in m.group(1).split(",")]
        ids = np.arange(math.prod(int(x) for x in m.group(2).split(","))).reshape(
            [int(x) for x in m.group(2).split(",")])
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(shape[0], -1).tolist()
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)
    if m:
        axes = [(a.split("=")[0].strip().strip("'"), int(a.split("=")[1])) for a in m.group(1).split(",")]
        names = [a for a, _ in axes]
        group_axes = [names.index(a.strip().strip("'")) for a in m.group(2).split(",") if a.strip()]
        ids = np.arange(math.prod(s for _, s in axes)).reshape([s for _, s in axes])
        other = [i for i in range(len(axes)) if i not in group_axes]
        return ids.transpose(other + group_axes).reshape(-1, math.prod(axes[i][1] for i in group_axes)).tolist()
    m = re.search(r"replica_groups=\{((?:\{[\d,\s]*\},?\s*)*)\}", rest)
    if m and m.group(1).strip():
        return [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([\d,\s]*)\}", m.group(1))]
    return None


def _size(kind: str, opcode: str, type_text: str, group_size: int) -> float:
    sizes = shape_bytes(type_text)
    if not sizes:
        return 0.0
    if opcode == "collective-permute-start":  # (input, output, contexts)
        return sizes[0]
    if opcode.endswith("-start") and kind != "all-reduce":  # ((inputs), outputs): the outputs
        sizes = sizes[len(sizes) // 2:]
    return sum(sizes) * (group_size if kind == "reduce-scatter" else 1)


def collectives(text: str, num_devices: int) -> list[Collective]:
    """Every collective of the module (see the module docstring)."""
    comps, entry = computations(text)
    runs = executions(comps, entry)
    out = []
    for comp, instrs in comps.items():
        times, known = runs.get(comp, (0, True))
        if times == 0:
            continue
        for name, type_text, op, rest in instrs:
            kind = _OPCODES.get(op)
            if kind is None:
                continue
            groups = replica_groups(rest, num_devices)
            if kind == "collective-permute":
                size = 2
            else:
                size = len(groups[0]) if groups else num_devices
            out.append(Collective(kind, name, times, _size(kind, op, type_text, size), size, groups, known))
    return out


def crossing(c: Collective, slice_of_position) -> bool:
    """Whether collective `c` moves data between slices: some group (or permute pair) spans two slices.
    `slice_of_position`: device-assignment position -> slice index."""
    if c.groups is None:
        return len({slice_of_position(i) for i in range(c.group_size)}) > 1 if c.group_size > 1 else False
    return any(len({slice_of_position(i) for i in g}) > 1 for g in c.groups)


def summary(colls: list[Collective], slice_of_position=None) -> dict:
    """{kind: {'count', 'bytes', 'wire_bytes', 'cross_slice_count', 'cross_slice_wire_bytes'}} per program run,
    per device, plus 'unknown_trip_counts' (collectives inside loops whose trip count XLA did not record)."""
    out = {k: {"count": 0, "bytes": 0.0, "wire_bytes": 0.0, "cross_slice_count": 0, "cross_slice_wire_bytes": 0.0}
           for k in COLLECTIVES}
    unknown = 0
    for c in colls:
        row = out[c.kind]
        row["count"] += c.count
        row["bytes"] += c.count * c.size_bytes
        row["wire_bytes"] += c.count * c.wire_bytes
        if slice_of_position is not None and crossing(c, slice_of_position):
            row["cross_slice_count"] += c.count
            row["cross_slice_wire_bytes"] += c.count * c.wire_bytes
        unknown += not c.trip_count_known
    return {"by_kind": out, "unknown_trip_counts": unknown}


_ON_CHIP = re.compile(r":[^{}]*S\((?:[1-9]\d*)\)")  # a layout in a memory space other than 0 (TPU VMEM etc.)


def _hbm_bytes(type_text: str) -> float:
    """Bytes of the arrays of an HLO type that live in device memory (layout memory space 0)."""
    return sum(b for b, layout in zip(shape_bytes(type_text), _layouts(type_text)) if not _ON_CHIP.search(layout))


def _layouts(type_text: str) -> list[str]:
    """The layout text ('{1,0:T(8,128)S(1)}' or '') after each array of an HLO type, in shape_bytes' order."""
    out = []
    for m in _SHAPE.finditer(type_text):
        rest = type_text[m.end():]
        out.append(rest[:rest.index("}") + 1] if rest.startswith("{") else "")
    return out


def traffic_bytes(text: str) -> float:
    """A rough count of the bytes a run moves through device memory (HBM): every top-level instruction's result
    (entry computation and loop bodies, times their executions) that lives in device memory, written once and read
    once; fusion internals stay in registers / on-chip memory and are not counted, nor are results the compiler
    placed in on-chip memory (TPU layouts `S(1)`); an asynchronous op counts by its `-done` result."""
    comps, entry = computations(text)
    runs = executions(comps, entry)
    called_as_fusion = {c for instrs in comps.values() for _, _, op, rest in instrs
                        if op in ("fusion", "async-start", "all-reduce", "all-reduce-start", "reduce-scatter",
                                  "reduce", "map", "scatter", "select-and-scatter", "sort", "reduce-window")
                        for c in _CALLS.findall(rest)}
    total = 0.0
    for comp, instrs in comps.items():
        times = runs.get(comp, (0, True))[0]
        if times == 0 or comp in called_as_fusion:
            continue
        total += times * sum(2 * _hbm_bytes(t) for _, t, op, _ in instrs
                             if op not in _NO_TRAFFIC and not op.endswith("-start"))
    return total


_CUSTOM_CALL_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def custom_calls(text: str) -> dict[str, int]:
    """{custom-call target: executions per run} of the program: the kernels XLA did not write itself (Pallas/Mosaic
    `tpu_custom_call`, Triton, cuDNN, ...), counted through loops as the collectives are."""
    comps, entry = computations(text)
    runs = executions(comps, entry)
    out: dict[str, int] = {}
    for comp, instrs in comps.items():
        times = runs.get(comp, (0, True))[0]
        for _, _, op, rest in instrs:
            m = _CUSTOM_CALL_TARGET.search(rest) if op == "custom-call" else None
            if m and times:
                out[m.group(1)] = out.get(m.group(1), 0) + times
    return dict(sorted(out.items()))
