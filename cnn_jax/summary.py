"""Per-layer table of a model: output shape, parameters, multiply-adds; totals and splits.

Everything is read off the model itself (abstractly, with `jax.eval_shape`: no FLOPs are
spent and no memory is allocated), never typed in:

    python -m cnn_jax.summary alexnet
    python -m cnn_jax.summary alexnet --size 224 --set floor=True
    python -m cnn_jax.summary --reductions     # the cost of Inception's 1x1 reductions

Counting rules. A layer with a `kernel` and C output channels does `kernel.size / C`
multiply-adds per output element: every weight is used once per output position (so
grouped and partially connected convolutions count only their connections). A bias adds one addition per output element; it is reported separately so
that both conventions can be printed: all biases counted, or the lecture table's, which
leaves the fully connected layers' biases out of both parameters and multiply-adds
(AlexNet: 62,369,152 parameters and 1,135,906,176 multiply-adds).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import math
import sys

import jax
import jax.numpy as jnp
import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class LayerRow:
    path: str
    kind: str  # 'conv', 'fc' or the module's class name
    output_shape: tuple  # per example, without the batch axis
    params: int  # all parameters, biases included
    bias_params: int
    macs: int  # multiply-adds of the weights, per example
    bias_adds: int  # additions of the bias, per example
    state: int = 0  # non-trainable variables (batch-norm running statistics)
    copies: int = 1  # stacked copies computed side by side (towers); output_shape is one copy's


def _trace_calls(model: nn.Module, x: jax.ShapeDtypeStruct, call_kwargs: dict):
    """Abstract init, then an abstract apply that records each module's output in call order."""
    variables = jax.eval_shape(functools.partial(model.init, **call_kwargs), jax.random.key(0), x)
    calls: dict[tuple, tuple | None] = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.path:
            path = tuple(context.module.path)
            calls.setdefault(path, None)  # first entry fixes the order: outermost call first
            if hasattr(out, "shape"):
                calls[path] = (type(context.module).__name__, tuple(out.shape[1:]))
        return out

    def apply(v, inputs):
        with nn.intercept_methods(record):
            return model.apply(v, inputs, **call_kwargs)

    jax.eval_shape(apply, variables, x)
    return variables, calls


def _subtree(tree, path):
    for key in path:
        tree = tree.get(key, {}) if hasattr(tree, "get") else {}
    return tree


def layer_table(model: nn.Module, input_shape=None, **call_kwargs) -> list[LayerRow]:
    """One `LayerRow` per leaf module (a module with no sub-modules), in call order.

    `input_shape` is (H, W, C) without the batch; by default the model's `input_shape`.
    """
    call_kwargs.setdefault("train", False)
    input_shape = input_shape or model.input_shape
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    variables, calls = _trace_calls(model, x, call_kwargs)
    params, stats = variables.get("params", {}), variables.get("batch_stats", {})
    paths = [p for p, v in calls.items() if v is not None]
    leaves = [p for p in paths if not any(q != p and q[: len(p)] == p for q in paths)]
    rows = []
    for path in leaves:
        kind, out_shape = calls[path]
        own = _subtree(params, path)
        n_params = sum(a.size for a in jax.tree.leaves(own))
        outputs = math.prod(out_shape)
        kernel, bias = own.get("kernel") if own else None, own.get("bias") if own else None
        # A layer vmapped over stacked copies (AlexNet's towers) reports one copy's output.
        copies = bias.size // out_shape[-1] if bias is not None else 1
        macs = outputs * kernel.size // out_shape[-1] if kernel is not None else 0
        if kernel is not None:
            kind = "fc" if len(out_shape) == 1 else "conv"
        rows.append(LayerRow("/".join(path), kind, out_shape, n_params,
                             bias.size if bias is not None else 0, macs,
                             outputs * copies if bias is not None else 0,
                             sum(a.size for a in jax.tree.leaves(_subtree(stats, path))), copies))
    return rows


@dataclasses.dataclass(frozen=True)
class Totals:
    params: int
    macs: int
    conv_params: int
    conv_macs: int
    state: int = 0


def totals(rows: list[LayerRow], *, fc_biases: bool = True) -> Totals:
    """Sums, with biases counted in both parameters and multiply-adds.

    `fc_biases=False` is the lecture table's convention: fully connected biases are left out.
    """

    def counted(r):
        keep_bias = fc_biases or r.kind != "fc"
        return (r.params - (0 if keep_bias else r.bias_params),
                r.macs + (r.bias_adds if keep_bias else 0))

    sums = [counted(r) for r in rows]
    conv = [s for s, r in zip(sums, rows) if r.kind == "conv"]
    return Totals(sum(p for p, _ in sums), sum(m for _, m in sums),
                  sum(p for p, _ in conv), sum(m for _, m in conv), sum(r.state for r in rows))


def format_table(rows: list[LayerRow], title: str = "") -> str:
    """The table, then totals under both bias conventions and the conv/fc split."""
    head = f"{'layer':<28}{'output':>18}{'params':>14}{'mult-adds':>16}"
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for r in rows:
        shape = "x".join(str(d) for d in r.output_shape)
        shape = f"{r.copies} x {shape}" if r.copies > 1 else shape
        lines.append(f"{r.path:<28}{shape:>18}{r.params:>14,}{r.macs + r.bias_adds:>16,}")
    lines.append("-" * len(head))
    full, lecture = totals(rows), totals(rows, fc_biases=False)
    lines.append(f"{'total, all biases':<46}{full.params:>14,}{full.macs:>16,}")
    lines.append(f"{'total, fc biases left out (lecture)':<46}{lecture.params:>14,}{lecture.macs:>16,}")
    if full.state:
        lines.append(f"{'non-trainable state (batch-norm statistics)':<46}{full.state:>14,}")
        lines.append(f"{'parameters + state (Keras: Total params)':<46}{full.params + full.state:>14,}")
    if full.params and full.macs:
        cp, cm = full.conv_params / full.params, full.conv_macs / full.macs
        lines.append(f"conv layers: {cp:.1%} of parameters, {cm:.1%} of multiply-adds; "
                     f"the rest: {1 - cp:.1%} of parameters, {1 - cm:.1%} of multiply-adds")
    return "\n".join(lines)


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=value, e.g. --set num_classes=10")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def reductions_report() -> str:
    """28x28x192 -> 28x28x32 with 5x5 kernels, directly and through a 16-channel 1x1
    reduction, counted from the two networks (the lecture: ~120 M vs ~12.4 M)."""
    from cnn_jax.models.googlenet import ReductionExample

    direct = totals(layer_table(ReductionExample(0))).macs
    reduced = layer_table(ReductionExample(16))
    parts = " + ".join(f"{r.macs:,} ({r.path})" for r in reduced)
    total = totals(reduced).macs
    return (f"28x28x192 -> 28x28x32, 5x5 'same' convolution, multiplications:\n"
            f"  direct:                    {direct:,}\n"
            f"  via a 1x1 to 16 channels:  {parts} = {total:,}  ({direct / total:.1f}x fewer)")


def main(argv=None) -> int:
    from cnn_jax.models import get_model, list_models

    parser = argparse.ArgumentParser(prog="python -m cnn_jax.summary", description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", help=f"one of: {', '.join(list_models())}")
    parser.add_argument("--reductions", action="store_true", help="print the 1x1-reduction cost example")
    parser.add_argument("--size", type=int, default=None, help="input height = width (default: the model's own)")
    parser.add_argument("--channels", type=int, default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="model overrides")
    args = parser.parse_args(argv)
    if args.reductions:
        print(reductions_report())
        return 0
    if not args.model:
        parser.error("name a model, or pass --reductions")
    try:
        model = get_model(args.model, **_parse_overrides(args.set))
        height, width, channels = model.input_shape
        shape = (args.size or height, args.size or width, args.channels or channels)
        rows = layer_table(model, shape)
    except ValueError as err:  # unknown model / field, or a geometry error: one line
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(rows, f"{args.model} at {'x'.join(map(str, shape))}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
