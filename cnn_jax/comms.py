"""What a compiled program communicates: its collectives, read from the optimised HLO text.

    text = jax.jit(step).lower(*args).compile().as_text()
    ops = collectives(text)
    tower_bytes(ops, mesh)   # bytes each device sends to the other tower per call

Each collective is named by the JAX name scope it was traced in (`op_name` metadata), so a
test can check that the two-tower AlexNet talks across towers only inside its
`tower_gather_<layer>` scopes, and at which layers.

XLA writes replica groups in three forms, all read here: listed (`{{0,1},{2,3}}`), iota
(`[2,2]<=[4]`) and, from jax 0.12 on, mesh axes (`mesh['data'=2,'model'=2] {'model'}`).
Device ids in them are positions in the program's device assignment, i.e. in the mesh's
flattened device order, not `Device.id`.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1,
          "s64": 8, "u64": 8}
_LINE = re.compile(r"= (?P<type>.+?) (?P<kind>" + "|".join(KINDS) + r")(?:-start)?\(")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    result_bytes: int  # size of the result (all tuple elements)
    groups: tuple  # tuples of device ids that communicate together
    op_name: str  # the JAX name scope, e.g. '.../tower_gather_conv3/all_gather'


_IOTA = r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?"


def _nums(text: str | None) -> list[int]:
    return [int(d) for d in re.findall(r"\d+", text or "")]


def _iota(dims: str, reshape: str, perm: str | None) -> np.ndarray:
    """`[dims]<=[reshape]T(perm)`: an iota over `reshape`, transposed by `perm`, laid out as `dims`."""
    ids = np.arange(int(np.prod(_nums(reshape)))).reshape(_nums(reshape))
    return (ids.transpose(_nums(perm)) if perm else ids).reshape(_nums(dims))


def _mesh_axes_groups(axes: str, device_ids: str | None, grouped: str) -> tuple:
    """Groups from `mesh['a'=4,'b'=2] {'b'}`: the devices that differ only along the grouped axes.

    A sub-axis `a:(pre)size` is the `size` factor of axis a after its `pre` major devices, so
    each axis is first split into its referenced factors (and the fillers between them).
    """
    sizes = {name: int(n) for name, n in re.findall(r"'?([\w.-]+)'?=(\d+)", axes)}
    refs: dict[str, list] = {}
    for name, pre, size in re.findall(r"'?([\w.-]+)'?(?::\((\d+)\)(\d+))?", grouped):
        refs.setdefault(name, []).append((int(pre), int(size)) if size else (1, sizes[name]))
    shape, grouped_dims = [], []
    for name, n in sizes.items():
        done = 1  # product of this axis's factors laid out so far, major first
        for pre, size in sorted(refs.get(name, [])):
            if pre > done:
                shape.append(pre // done)
            grouped_dims.append(len(shape))
            shape.append(size)
            done = pre * size
        if done < n:
            shape.append(n // done)
    iota = re.fullmatch(_IOTA, (device_ids or "").strip())
    ids = (_iota(*iota.groups()) if iota else np.array(_nums(device_ids)) if device_ids
           else np.arange(int(np.prod(list(sizes.values())))))
    rest = [d for d in range(len(shape)) if d not in grouped_dims]
    rows = ids.reshape(shape).transpose(rest + grouped_dims).reshape(-1, int(np.prod([shape[d] for d in grouped_dims])))
    return tuple(tuple(int(d) for d in row) for row in rows)


def _groups(line: str) -> tuple:
    mesh = re.search(r"replica_groups=mesh\[(?P<axes>[^\]]*)\](?:,\s*device_ids=\((?P<ids>[^)]*\)?)\))?"
                     r"\s*\{(?P<grouped>[^}]*)\}", line)
    if mesh:  # newer XLA (jax 0.12): named mesh axes
        return _mesh_axes_groups(mesh.group("axes"), mesh.group("ids"), mesh.group("grouped"))
    listed = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", line)
    if listed:
        return tuple(tuple(int(d) for d in g.split(",") if d) for g in re.findall(r"\{([\d,]*)\}", listed.group(1)))
    iota = re.search(r"replica_groups=" + _IOTA, line)
    if iota:  # [G,S]<=[dims]T(perm): G groups of S
        return tuple(tuple(int(d) for d in row) for row in _iota(*iota.groups()))
    pairs = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", line)
    if pairs:
        return tuple(tuple(int(d) for d in p.split(",")) for p in re.findall(r"\{(\d+,\d+)\}", pairs.group(1)))
    return ()


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of an optimised HLO module, in program order."""
    out = []
    for line in hlo_text.splitlines():
        match = _LINE.search(line)
        if not match:
            continue
        nbytes = sum(_BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                     for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group("type")))
        name = re.search(r'op_name="([^"]*)"', line)
        out.append(Collective(match.group("kind"), nbytes, _groups(line), name.group(1) if name else ""))
    return out


def axis_groups(mesh, axis: str) -> set[frozenset]:
    """The sets of HLO device ids (mesh positions) that differ only along `axis` of `mesh`."""
    ids = np.arange(mesh.devices.size).reshape(mesh.devices.shape)
    moved = np.moveaxis(ids, mesh.axis_names.index(axis), -1)
    return {frozenset(int(i) for i in row) for row in moved.reshape(-1, moved.shape[-1])}


def along(op: Collective, mesh, axis: str) -> bool:
    """True when every group of `op` lies along `axis` of the mesh."""
    groups = axis_groups(mesh, axis)
    return bool(op.groups) and all(frozenset(g) in groups for g in op.groups)


def bytes_sent(op: Collective) -> float:
    """Bytes one participant sends, for the usual algorithms with n participants:
    all-gather (n-1)/n of the result, reduce-scatter (n-1) x the result (its operand is n
    results), all-reduce 2 (n-1)/n of the buffer (reduce-scatter then all-gather)."""
    n = max(len(op.groups[0]), 1) if op.groups else 1
    if op.kind == "all-gather":
        return op.result_bytes * (n - 1) / n
    if op.kind == "reduce-scatter":
        return op.result_bytes * (n - 1)
    if op.kind == "all-reduce":
        return op.result_bytes * 2 * (n - 1) / n
    return float(op.result_bytes)


def scope_of(op: Collective, prefix: str = "tower_gather_") -> str | None:
    """The layer named by a `tower_gather_<layer>` scope in the op's name, if any."""
    match = re.search(prefix + r"(\w+?)/", op.op_name + "/")
    return match.group(1) if match else None


def tower_report(ops: list[Collective], mesh, axis: str = "model") -> dict[str, float]:
    """Bytes each device sends across `axis` per call, by the layer scope they belong to."""
    report: dict[str, float] = {}
    for op in ops:
        if along(op, mesh, axis):
            key = scope_of(op) or f"unscoped:{op.op_name}"
            report[key] = report.get(key, 0.0) + bytes_sent(op)
    return report
