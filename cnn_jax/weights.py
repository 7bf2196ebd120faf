"""PyTorch-format weights in and out, for torchvision's layouts of the zoo's networks.

    variables = weights.load("resnet50.pth", get_model("resnet50"))   # or a .safetensors file
    weights.save(variables, get_model("resnet50"), "exported.safetensors")

A PyTorch state dict maps dotted names to tensors in PyTorch's layouts: convolution kernels
(out, in, height, width), linear weights (out, in), and the first linear layer after a
convolution stack reads its input flattened channel-major (C, H, W). Flax keeps kernels
(height, width, in, out) and (in, out), and flattens (H, W, C). Batch norm's weight, bias,
running_mean and running_var become 'params' scale and bias and 'batch_stats' mean and var.

Supported: `vgg11`...`vgg19` and their `_bn` forms (torchvision's VGG, whose adaptive 7x7
pool is the identity at 224x224), `resnet18`...`resnet152`, `googlenet_torchvision` and
`alexnet_torchvision`. `.safetensors` files need only the `safetensors` package; `.pth` /
`.pt` files need PyTorch (`pip install 'cnn_jax[torch]'`) and load with
`torch.load(weights_only=True)`, which refuses pickles that would run code.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax.config import SettingError, Set
from cnn_jax.files import replaced_atomically
from cnn_jax.models import TorchLayout, abstract_variables, spec_of


class WeightsError(SettingError):
    """A weights file that cannot be read into the model; the message says why in one line."""


@dataclasses.dataclass(frozen=True)
class Layer:
    """One parameterised layer: its Flax module path, its state-dict prefix, and its kind:
    'conv', 'dense', 'dense_chw' (reads a (C, H, W) flattening of `channels`) or 'bn'."""

    path: tuple[str, ...]
    prefix: str
    kind: str
    channels: int = 0


def layout(model) -> TorchLayout:
    """How torchvision names `model`'s layers, from its spec; an error names what would fit."""
    describe = spec_of(model).torchvision
    found = describe(model) if describe else None
    if found is None:
        raise WeightsError(f"{type(model).__name__} has no torchvision layout: weights load into vgg11..vgg19(_bn), "
                           "resnet18..resnet152, googlenet_torchvision and alexnet_torchvision")
    for field, wanted in found.requires.items():
        if getattr(model, field) != wanted:
            raise WeightsError(f"torchvision's {type(model).__name__} has {field}={wanted!r}: build the model "
                               f"with {field}={wanted!r} ({{0}})", Set(f"model.{field}", wanted))
    return found


def layers(model: nn.Module, variables=None) -> list[Layer]:
    """Every parameterised layer of `model` with its state-dict prefix and kind."""
    found = layout(model)
    to_prefix, chw = found.prefix, found.chw
    params = (variables or abstract_variables(model))["params"]
    found = []

    def walk(tree, path):
        if "kernel" in tree:
            kind = "conv" if len(tree["kernel"].shape) == 4 else "dense_chw" if path in chw else "dense"
            found.append(Layer(path, to_prefix(path), kind, chw.get(path, 0)))
        elif "scale" in tree:
            found.append(Layer(path, to_prefix(path), "bn"))
        else:
            for name, sub in tree.items():
                walk(sub, (*path, name))

    walk(params, ())
    return found


def _chw_to_hwc(weight: np.ndarray, channels: int) -> np.ndarray:
    """A PyTorch (out, C*H*W) linear weight as a Flax (H*W*C, out) kernel."""
    out, n = weight.shape
    side = int(round((n // channels) ** 0.5))
    return weight.reshape(out, channels, side, side).transpose(2, 3, 1, 0).reshape(n, out)


def _hwc_to_chw(kernel: np.ndarray, channels: int) -> np.ndarray:
    n, out = kernel.shape
    side = int(round((n // channels) ** 0.5))
    return kernel.reshape(side, side, channels, out).transpose(3, 2, 0, 1).reshape(out, n)


def to_flax(layer: Layer, tensors: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """{'params': {...}, 'batch_stats': {...}} leaves of one layer from its PyTorch tensors."""
    get = lambda name: tensors[f"{layer.prefix}.{name}"]  # noqa: E731
    if layer.kind == "bn":
        return {"params": {"scale": get("weight"), "bias": get("bias")},
                "batch_stats": {"mean": get("running_mean"), "var": get("running_var")}}
    weight = get("weight")
    kernel = {"conv": lambda w: w.transpose(2, 3, 1, 0), "dense": lambda w: w.T,
              "dense_chw": lambda w: _chw_to_hwc(w, layer.channels)}[layer.kind](weight)
    params = {"kernel": kernel}
    if f"{layer.prefix}.bias" in tensors:
        params["bias"] = get("bias")
    return {"params": params}


def to_torch(layer: Layer, leaves: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The inverse of `to_flax`: PyTorch tensors (as NumPy) of one layer."""
    params, out = leaves["params"], {}
    if layer.kind == "bn":
        stats = leaves["batch_stats"]
        return {f"{layer.prefix}.weight": params["scale"], f"{layer.prefix}.bias": params["bias"],
                f"{layer.prefix}.running_mean": stats["mean"], f"{layer.prefix}.running_var": stats["var"],
                f"{layer.prefix}.num_batches_tracked": np.zeros((), np.int64)}
    kernel = params["kernel"]
    out[f"{layer.prefix}.weight"] = {"conv": lambda k: k.transpose(3, 2, 0, 1), "dense": lambda k: k.T,
                                     "dense_chw": lambda k: _hwc_to_chw(k, layer.channels)}[layer.kind](kernel)
    if "bias" in params:
        out[f"{layer.prefix}.bias"] = params["bias"]
    return out


def subtree(tree, path):
    for name in path:
        tree = tree[name]
    return tree


def under(path: str, layers: Iterable[str]) -> bool:
    """Whether module or parameter path 'aux1/fc2/kernel' is one of `layers` or inside one."""
    return any(path == layer or path.startswith(layer + "/") for layer in layers)


def _leaves(variables, layer: Layer) -> dict:
    """The layer's own {'params': ..., 'batch_stats': ...} (statistics for batch norm only)."""
    return {c: subtree(variables[c], layer.path) for c in ("params", "batch_stats")
            if c in variables and (c == "params" or layer.kind == "bn")}


def _assign(tree: dict, path: tuple, leaves: dict):
    for name in path:
        tree = tree.setdefault(name, {})
    tree.update(leaves)


def _expected(model, abstract) -> dict[str, tuple[Layer, tuple]]:
    """{state-dict key: (layer, the PyTorch shape the model needs)}, by tracing `to_torch` on
    shapes (nothing is allocated: VGG's fc6 alone would be 400 MB of zeros)."""
    expected = {}
    for layer in layers(model, abstract):
        keys = []  # in `to_torch`'s order (a dict out of `eval_shape` comes back sorted)

        def values(leaves, layer=layer, keys=keys):
            tensors = to_torch(layer, leaves)
            keys[:] = list(tensors)
            return list(tensors.values())

        shapes = jax.eval_shape(values, _leaves(abstract, layer))
        expected.update((key, (layer, tuple(value.shape))) for key, value in zip(keys, shapes))
    return expected


def _listed(keys: list[str], what: str) -> str:
    shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
    return f"{len(keys)} {what} ({shown})"


def convert(state: Mapping[str, np.ndarray], model: nn.Module, *, replace: Iterable[str] = ()) -> dict:
    """Flax variables from a state dict of NumPy arrays.

    Strict: missing and unexpected keys and shape mismatches are `WeightsError`s. Layers in
    `replace` (e.g. the model's `head` for a new class count) may be missing or of another
    shape; they are left out, for the caller to initialise (`transfer.merge`).
    """
    abstract = abstract_variables(model)
    expected = _expected(model, abstract)
    replaceable = lambda layer: under("/".join(layer.path), replace)  # noqa: E731
    ignored = {k for k in state if k.endswith(".num_batches_tracked")}
    missing = [k for k, (layer, _) in expected.items() if k not in state and not k.endswith(".num_batches_tracked")
               and not replaceable(layer)]
    unexpected = [k for k in state if k not in expected and k not in ignored]
    if missing or unexpected:
        parts = [_listed(missing, "missing")] if missing else []
        parts += [_listed(unexpected, "unexpected")] if unexpected else []
        heads = ("aux1.", "aux2.")
        if unexpected and all(k.startswith(heads) for k in unexpected):
            hint, fix = "the file has auxiliary heads: build the model with aux_heads=True ({0})", True
        elif missing and all(k.startswith(heads) for k in missing):
            hint, fix = "the file has no auxiliary heads: build the model with aux_heads=False ({0})", False
        else:
            hint, fix = "is this file for another network?", None
        settings = () if fix is None else (Set("model.aux_heads", fix),)
        raise WeightsError(f"the weights do not fit {type(model).__name__}: {'; '.join(parts)} key(s); {hint}",
                           *settings)
    replaced = set()
    for key, (layer, shape) in expected.items():
        if key.endswith(".num_batches_tracked"):
            continue
        if key not in state or tuple(state[key].shape) != tuple(shape):
            if replaceable(layer):
                replaced.add(layer)
                continue
            raise WeightsError(f"parameter {key} (layer {'/'.join(layer.path)} here) has shape {tuple(state[key].shape)} in "
                               f"the file but {type(model).__name__} needs {tuple(shape)}: build the model with the "
                               "file's sizes (e.g. its num_classes)")
    variables = {}
    for layer in {layer for layer, _ in expected.values()} - replaced:
        for collection, leaves in to_flax(layer, state).items():
            _assign(variables.setdefault(collection, {}), layer.path, {k: np.asarray(v, np.float32)
                                                                       for k, v in leaves.items()})
    return variables


# ---- files ---------------------------------------------------------------------------

def read_state_dict(path) -> dict[str, np.ndarray]:
    """A state dict file as {key: float32 NumPy array}: `.safetensors` without PyTorch,
    anything else through `torch.load(weights_only=True)`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.flax import load_file  # JAX arrays: bfloat16 files too, which NumPy cannot hold

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError, TypeError) as err:
            raise WeightsError(f"{path} is not a readable safetensors file ({str(err).splitlines()[0]})") from None
    else:
        state = _torch_load(path)
    return {k: np.asarray(jnp.asarray(v, jnp.float32)) if jnp.issubdtype(v.dtype, jnp.floating) else np.asarray(v)
            for k, v in state.items()}


def _torch_load(path: pathlib.Path) -> dict:
    try:
        import torch
    except ImportError:
        raise WeightsError(f"reading {path.name} needs PyTorch: pip install 'cnn_jax[torch]', or use a "
                           ".safetensors file") from None
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if unsafe:
            raise WeightsError(f"refused to load {path}: unpickling it would call {unsafe.group(1)} (code, or "
                               "objects other than tensors); only plain state dicts are read") from None
        raise WeightsError(f"{path} is not a PyTorch weights file (it does not unpickle)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise WeightsError(f"{path} is not a PyTorch weights file ({str(err).splitlines()[0]})") from None
    for wrapper in ("state_dict", "model"):  # training checkpoints that hold a state dict
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors: save "
                           "model.state_dict()")
    strip = all(k.startswith("module.") for k in obj)  # saved from DataParallel
    return {k.removeprefix("module.") if strip else k: v.detach().float().numpy() if v.is_floating_point()
            else v.numpy() for k, v in obj.items()}


def load(path, model: nn.Module, *, replace: Iterable[str] = ()) -> dict:
    """Flax variables for `model` from a PyTorch-format weights file (strict; see `convert`).
    A model without a torchvision layout is refused before the file is read."""
    layout(model)
    return convert(read_state_dict(path), model, replace=replace)


def export(variables, model: nn.Module) -> dict[str, np.ndarray]:
    """The torchvision state dict (NumPy arrays) of `variables`, with `num_batches_tracked`
    buffers, so that `load_state_dict(..., strict=True)` accepts it."""
    variables = jax.device_get(variables)
    state = {}
    for layer in layers(model, variables):
        state.update(to_torch(layer, jax.tree.map(np.asarray, _leaves(variables, layer))))
    return state


def save(variables, model: nn.Module, path) -> pathlib.Path:
    """Writes `export(variables, model)` as `.safetensors` (no PyTorch needed) or, for any
    other suffix, with `torch.save`."""
    path, state = pathlib.Path(path), export(variables, model)
    state = {k: np.array(v, order="C", copy=True) for k, v in state.items()}  # writable: torch wants them
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        write = lambda tmp: save_file(state, str(tmp))  # noqa: E731
    else:
        try:
            import torch
        except ImportError:
            raise WeightsError(f"writing {path.name} needs PyTorch: pip install 'cnn_jax[torch]', or save as "
                               ".safetensors") from None
        write = lambda tmp: torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp)  # noqa: E731
    with replaced_atomically(path) as tmp:  # an existing file stays whole until the new one is
        write(tmp)
    return path
