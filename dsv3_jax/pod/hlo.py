"""Read compiled HLO text: the bytes each collective kind moves per step, with every loop body counted as many
times as the loop runs.

A loop's trip count comes from XLA's `known_trip_count` annotation where the backend writes one (XLA:CPU,
XLA:GPU). XLA:TPU does not, so the count is read from the loop itself: a condition `i < N` (or `N > i`) on a
tuple element whose start is a constant in the operand tuple and whose body adds a constant to it (JAX's
`scan` and `fori_loop` compile to this form). A loop whose count is data-dependent (the blocked MoE kernel's
block loop) is counted once, and `collective_report` counts those loops.

`ragged-all-to-all` (the expert-parallel dispatch on TPU and GPU) is counted by its receive buffer, the
capacity the dispatch reserved: an upper bound, since only the routed rows move.

Result bytes do not say what a collective costs: an all-reduce moves about twice an all-gather's bytes, and a
gather over g devices sends (g-1)/g of its result. `link_bytes` is the ring model's figure, the bytes one
device sends: all-gather and all-to-all (g-1)/g of the result, reduce-scatter (g-1) results, all-reduce
2(g-1)/g of the buffer, collective-permute the buffer; g is read from the instruction's replica groups.
"""

from __future__ import annotations

import math
import re

COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-gather", "reduce-scatter", "all-reduce",
               "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}

_COMP_HEAD = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_CALLEES = re.compile(r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_NAME = re.compile(r"%([\w.\-]+)")
_INT = re.compile(r"constant\((-?\d+)\)")
_PASS_THROUGH = ("copy", "bitcast", "copy-done", "copy-start")


_GROUPS_LIST = re.compile(r"replica_groups=\{\{([\d,]*)\}")                 # {{0,1,2,3},{4,5,6,7}}
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")                # [groups,size]<=[32]...
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}")   # mesh['axis_0'=4,...] {'axis_0'}
_PARTITIONS = re.compile(r"num_partitions=(\d+)")


def group_size(line: str, num_devices: int | None = None) -> int | None:
    """Devices in each replica group of a collective instruction (None when the line names none and the
    module's device count is unknown). The mesh form lists the group's axes after the mesh."""
    m = _GROUPS_LIST.search(line)
    if m:
        return len([d for d in m.group(1).split(",") if d])
    m = _GROUPS_IOTA.search(line)
    if m:
        return int(m.group(2))
    m = _GROUPS_MESH.search(line)
    if m:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2)) if a in sizes)
    return num_devices


def _link_share(kind: str, g: int | None) -> float:
    """Bytes one device sends per result byte on a ring of g devices (module docstring)."""
    if g is None:                   # groups unknown: count the result once
        return 1.0
    if g <= 1:                      # a group of one moves nothing
        return 0.0
    return {"all-gather": (g - 1) / g, "all-to-all": (g - 1) / g, "ragged-all-to-all": (g - 1) / g,
            "reduce-scatter": g - 1.0, "all-reduce": 2 * (g - 1) / g, "collective-permute": 1.0}[kind]


def shape_bytes(text: str) -> float:
    """Bytes of an HLO result shape, e.g. `bf16[8,128]{1,0}` or a tuple of them."""
    total = 0.0
    for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text):
        if dt in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _operands(rest: str) -> list[str]:
    """Instruction names among an instruction's operands (the text after `op(`, up to its closing paren)."""
    depth = 1
    for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return _NAME.findall(rest[:i])
    return _NAME.findall(rest)


def parse(hlo_text: str) -> tuple[dict, str | None]:
    """-> ({computation: {"instrs": {name: (shape, op, operands, line)}, "root": name}}, entry name)."""
    comps: dict[str, dict] = {}
    entry, cur = None, None
    for line in hlo_text.splitlines():
        head = _COMP_HEAD.match(line) if line[:1] in ("%", "E") else None     # instructions are indented
        if head:
            cur = comps.setdefault(head.group(2), {"instrs": {}, "root": None})
            if head.group(1):
                entry = head.group(2)
            continue
        m = _INSTR.match(line) if cur is not None else None
        if not m:
            continue
        root, name, shape, op, rest = m.groups()
        cur["instrs"][name] = (shape, op, _operands(rest), line)
        if root:
            cur["root"] = name
    return comps, entry


def _int_constant(instrs: dict, name: str, depth: int = 0):
    """The integer a scalar instruction holds, through copies and bitcasts; None when it is not a constant."""
    ins = instrs.get(name)
    if ins is None or depth > 16:
        return None
    shape, op, operands, line = ins
    if op == "constant":
        m = _INT.search(line)
        return int(m.group(1)) if m else None
    if op in _PASS_THROUGH and operands:
        return _int_constant(instrs, operands[0], depth + 1)
    return None


def _tuple_index(instrs: dict, name: str, depth: int = 0):
    """k when `name` is get-tuple-element(parameter, index=k), through copies and bitcasts (XLA:TPU copies a
    loop counter between memory spaces), else None."""
    ins = instrs.get(name)
    if ins is None or depth > 16:
        return None
    if ins[1] in _PASS_THROUGH and ins[2]:
        return _tuple_index(instrs, ins[2][0], depth + 1)
    if ins[1] != "get-tuple-element":
        return None
    m = re.search(r"index=(\d+)", ins[3])
    return int(m.group(1)) if m else None


def trip_count(comps: dict, caller: dict, line: str, operands: list[str]):
    """Executions of a while loop's body: XLA's known_trip_count, else read from the loop (module docstring);
    None when neither gives it."""
    known = _TRIP.search(line)
    if known:
        return int(known.group(1))
    cond = comps.get((re.search(r"condition=%?([\w.\-]+)", line) or [None, None])[1])
    body = comps.get((re.search(r"body=%?([\w.\-]+)", line) or [None, None])[1])
    if not cond or not body or not cond["root"] or not body["root"] or not operands:
        return None
    _, op, cmp_ops, cmp_line = cond["instrs"][cond["root"]]
    if op != "compare" or len(cmp_ops) != 2:
        return None
    direction = (re.search(r"direction=(\w+)", cmp_line) or [None, None])[1]
    a, b = cmp_ops if direction == "LT" else (cmp_ops[::-1] if direction == "GT" else (None, None))
    index, limit = _tuple_index(cond["instrs"], a) if a else None, _int_constant(cond["instrs"], b) if b else None
    if index is None or limit is None:
        return None
    init = caller["instrs"].get(operands[0])
    if init is None or init[1] != "tuple" or index >= len(init[2]):
        return None
    start = _int_constant(caller["instrs"], init[2][index])
    out = body["instrs"][body["root"]]
    if start is None or out[1] != "tuple" or index >= len(out[2]):
        return None
    nxt = body["instrs"].get(out[2][index])
    if nxt is None or nxt[1] != "add" or len(nxt[2]) != 2:
        return None
    x, y = nxt[2]
    step = _int_constant(body["instrs"], y) if _tuple_index(body["instrs"], x) == index else (
        _int_constant(body["instrs"], x) if _tuple_index(body["instrs"], y) == index else None)
    if not step or step < 0:
        return None
    return max(0, -(-(limit - start) // step))


def collective_bytes(hlo_text: str) -> dict:
    """{kind: bytes per device per step} for each collective kind in compiled HLO text: the result bytes of
    every collective (async `-done` halves counted once), a loop body's times its trip count."""
    return collective_report(hlo_text)[0]


def collective_report(hlo_text: str, top: int = 0) -> tuple[dict, int, list[dict], dict]:
    """(`collective_bytes`, the number of while loops whose trip count could not be read (their bodies are
    counted once), the `top` largest sources: {kind, op_name, shape, group, executions, bytes, link_bytes}, one
    per collective instruction, largest total first, and {kind: link bytes per device per step})."""
    found, uncounted = _collectives(hlo_text)
    counts, link = dict.fromkeys(COLLECTIVES, 0.0), dict.fromkeys(COLLECTIVES, 0.0)
    for c in found:
        counts[c["kind"]] += c["bytes"]
        link[c["kind"]] += c["link_bytes"]
    largest = sorted(found, key=lambda c: -c["bytes"])[:top]
    return ({k: int(v) for k, v in counts.items()}, uncounted,
            [dict(c, bytes=int(c["bytes"]), link_bytes=int(c["link_bytes"])) for c in largest],
            {k: int(v) for k, v in link.items()})


def _groups_line(comps: dict, line: str) -> str:
    """The line that names a collective's replica groups: itself, or for XLA:TPU's reduce-scatter fusion
    (whose line names none) the all-reduce inside the fused computation."""
    if "replica_groups" in line or "calls=%all-reduce-scatter" not in line:
        return line
    inner = comps.get((re.search(r"calls=%?([\w.\-]+)", line) or [None, None])[1], {"instrs": {}})
    return next((l for _, op, _, l in inner["instrs"].values() if "replica_groups" in l), line)


def _collectives(hlo_text: str) -> tuple[list[dict], int]:
    """Every collective instruction with its executions per step (the product of the trip counts of the loops
    around it, summed over the places its computation is called from); and the uncounted loops."""
    comps, entry = parse(hlo_text)
    header = _PARTITIONS.search(hlo_text, 0, hlo_text.find("\n"))      # the HloModule line
    devices = int(header.group(1)) if header else None
    edges: dict[str, list] = {name: [] for name in comps}
    uncounted = 0
    for cname, comp in comps.items():
        for shape, op, operands, line in comp["instrs"].values():
            if op == "fusion" and "calls=%all-reduce-scatter" in line:     # XLA:TPU's reduce-scatter fusion
                continue                                                   # (counted below, not its inside)
            mult = 1
            if op == "while":
                trips = trip_count(comps, comp, line, operands)
                uncounted += trips is None
                mult = 1 if trips is None else trips
            edges[cname] += [(callee, mult) for callee in _CALLEES.findall(line) if callee in comps]
            for group in _BRANCHES.findall(line):
                edges[cname] += [(c.strip().lstrip("%"), 1) for c in group.split(",") if c.strip().lstrip("%") in comps]
    # Executions per computation, callers before callees (the call graph is acyclic).
    indegree = dict.fromkeys(comps, 0)
    for outs in edges.values():
        for callee, _ in outs:
            indegree[callee] += 1
    execs = dict.fromkeys(comps, 0)
    if entry:
        execs[entry] = 1
    ready = [name for name, d in indegree.items() if d == 0]
    while ready:
        name = ready.pop()
        for callee, mult in edges[name]:
            execs[callee] += execs[name] * mult
            indegree[callee] -= 1
            if indegree[callee] == 0:
                ready.append(callee)
    found = []
    for cname, comp in comps.items():
        for shape, op, operands, line in comp["instrs"].values():
            kind = op[:-5] if op.endswith("-done") else op
            if op == "fusion" and "calls=%all-reduce-scatter" in line:
                kind = "reduce-scatter"
            elif kind not in COLLECTIVES or op.endswith("-start"):
                continue
            if execs[cname]:
                name = (re.search(r'op_name="([^"]*)"', line) or [None, ""])[1]
                g = group_size(_groups_line(comps, line), devices)
                nbytes = shape_bytes(shape) * execs[cname]
                found.append({"kind": kind, "op_name": name, "shape": re.sub(r"\{[^}]*\}|/\*[^*]*\*/", "", shape),
                              "group": g, "executions": execs[cname], "bytes": nbytes,
                              "link_bytes": nbytes * _link_share(kind, g)})
    return found, uncounted
