"""PyTorch-format weights: torchvision-layout networks in PyTorch give the same logits here."""

from __future__ import annotations

import functools
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import summary, weights
from cnn_jax.models import get_model
from cnn_jax.models.torchvision import adaptive_avg_pool, ceil_pads

torch = pytest.importorskip("torch")
import torchvision_reference as tv  # noqa: E402 - tests/, beside this file
from safetensors.numpy import save_file  # noqa: E402

# (cnn_jax name, torchvision-layout network, input side, file type)
FAMILIES = [
    ("resnet18", lambda: tv.ResNet(18), 64, ".pth"),
    ("resnet50", lambda: tv.ResNet(50), 64, ".safetensors"),
    ("alexnet_torchvision", tv.AlexNet, 224, ".pth"),
    ("googlenet_torchvision", tv.GoogLeNet, 224, ".safetensors"),
    ("vgg11", lambda: tv.VGG(11), 224, ".pth"),
    ("vgg11_bn", lambda: tv.VGG(11, batch_norm=True), 224, ".safetensors"),
]


def _state(net) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def _write(net, path: pathlib.Path) -> pathlib.Path:
    if path.suffix == ".safetensors":
        save_file(_state(net), str(path))
    else:
        torch.save(net.state_dict(), path)
    return path


def _logits(model, variables, x):
    return np.asarray(jax.jit(functools.partial(model.apply, train=False))(variables, jnp.asarray(x)))


def _torch_logits(net, x):
    with torch.no_grad():
        return net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


@pytest.mark.parametrize("name,make,size,suffix", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_torchvision_weights_give_the_same_logits_and_export_back(name, make, size, suffix, tmp_path):
    net = tv.randomise(make())
    path = _write(net, tmp_path / f"{name}{suffix}")
    model = get_model(name)
    variables = weights.load(path, model)
    x = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
    ours, reference = _logits(model, variables, x), _torch_logits(net, x)
    chex.assert_shape(ours, (2, 1000))
    scale = np.abs(reference).max()
    chex.assert_trees_all_close(ours / scale, reference / scale, atol=1e-4)  # 1e-4 of the logits' range
    exported = weights.export(variables, model)  # the same state dict, key for key and bit for bit
    original = _state(net)
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_a_saved_pth_loads_strictly_into_pytorch(tmp_path):
    model = get_model("resnet18", num_classes=7)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
    variables = {**variables, "batch_stats": jax.tree.map(lambda v: v + 0.5, variables["batch_stats"])}
    path = weights.save(variables, model, tmp_path / "exported.pth")
    net = tv.ResNet(18, num_classes=7).eval()
    net.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
    chex.assert_trees_all_close(_logits(model, variables, x), _torch_logits(net, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,published", [("alexnet_torchvision", 61_100_840),
                                            ("googlenet_torchvision", 6_624_904)])
def test_parameter_counts_are_torchvisions(name, published):
    """torchvision's documented counts (GoogLeNet's without the auxiliary heads)."""
    model = get_model(name, **({"aux_heads": False} if "googlenet" in name else {}))
    assert summary.totals(summary.layer_table(model)).params == published


@pytest.mark.parametrize("size,out", [(14, 4), (13, 6), (10, 7), (6, 6), (5, 7)])
def test_adaptive_average_pool_equals_pytorch(size, out):
    x = np.random.default_rng(2).normal(size=(2, size, size + 1, 3)).astype(np.float32)
    reference = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2)), out)
    ours = adaptive_avg_pool(jnp.asarray(x), out)
    chex.assert_trees_all_close(np.asarray(ours), reference.numpy().transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("window,stride,pad", [(3, 2, 0), (3, 1, 1), (2, 2, 0), (3, 2, 1)])
def test_ceil_mode_padding_gives_pytorchs_sizes(window, stride, pad):
    for size in range(max(window - pad, 1), 40):
        lo, hi = ceil_pads(size, window, stride, pad)
        ours = (size + lo + hi - window) // stride + 1
        pool = torch.nn.MaxPool2d(window, stride, pad, ceil_mode=True)
        assert ours == pool(torch.zeros(1, 1, size, size)).shape[-1], size


# ---- errors: one line each ------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet18_state():
    return _state(tv.randomise(tv.ResNet(18)))


def _error(path, model) -> str:
    with pytest.raises(weights.WeightsError) as err:
        weights.load(path, model)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_and_unexpected_keys_are_listed(resnet18_state, tmp_path):
    state = dict(resnet18_state)
    for key in [k for k in state if k.startswith("layer4.1.")]:
        del state[key]
    state["extra.weight"] = np.zeros(3, np.float32)
    save_file(state, str(tmp_path / "w.safetensors"))
    message = _error(tmp_path / "w.safetensors", get_model("resnet18"))
    assert "10 missing (layer4.1.bn1.weight, layer4.1.bn1.bias, " in message, message  # the first few, and how many
    assert "1 unexpected (extra.weight)" in message, message


def test_a_shape_mismatch_names_the_parameter_and_both_shapes(resnet18_state, tmp_path):
    save_file(resnet18_state, str(tmp_path / "w.safetensors"))
    message = _error(tmp_path / "w.safetensors", get_model("resnet18", num_classes=10))
    assert "fc.weight (layer fc here) has shape (1000, 512)" in message and "needs (10, 512)" in message, message


def test_files_that_are_not_state_dicts_are_refused(tmp_path):
    model = get_model("resnet18")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    assert "holds a list, not a state dict" in _error(tmp_path / "list.pth", model)
    (tmp_path / "text.pt").write_text("not weights")
    assert "is not a PyTorch weights file" in _error(tmp_path / "text.pt", model)
    (tmp_path / "text.safetensors").write_text("not weights")
    assert "is not a readable safetensors file" in _error(tmp_path / "text.safetensors", model)
    assert "does not exist" in _error(tmp_path / "absent.pth", model)
    assert "has no torchvision layout" in _error(tmp_path / "text.pt", get_model("alexnet"))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_a_pickle_that_would_run_code_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _RunsCode(marker)}, tmp_path / "evil.pth")
    assert "refused to load" in _error(tmp_path / "evil.pth", get_model("resnet18"))  # says which call
    assert not marker.exists()


def test_safetensors_load_without_pytorch(resnet18_state, tmp_path, monkeypatch):
    save_file(resnet18_state, str(tmp_path / "w.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in resnet18_state.items()}, tmp_path / "w.pth")
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # `import torch` now fails
    variables = weights.load(tmp_path / "w.safetensors", get_model("resnet18"))
    np.testing.assert_array_equal(variables["params"]["fc"]["bias"], resnet18_state["fc.bias"])
    assert "needs PyTorch: pip install 'cnn_jax[torch]'" in _error(tmp_path / "w.pth", get_model("resnet18"))


def test_googlenet_auxiliary_head_equals_torchvisions():
    """Its 4x4 adaptive pool and the (C, H, W) flattening into fc1, which eval-mode logits skip."""
    from cnn_jax.models.torchvision import AuxTorchvision

    net = tv.randomise(tv.InceptionAux(512, 10))
    state = _state(net)
    variables = {}
    for layer in (weights.Layer(("conv", "conv"), "conv.conv", "conv"), weights.Layer(("conv", "bn"), "conv.bn", "bn"),
                  weights.Layer(("fc1",), "fc1", "dense_chw", 128), weights.Layer(("fc2",), "fc2", "dense")):
        for collection, leaves in weights.to_flax(layer, state).items():
            tree = variables.setdefault(collection, {})
            for name in layer.path:
                tree = tree.setdefault(name, {})
            tree.update(leaves)
    x = np.random.default_rng(3).normal(size=(2, 14, 14, 512)).astype(np.float32)
    ours = AuxTorchvision(10).apply(variables, jnp.asarray(x), train=False)
    chex.assert_trees_all_close(np.asarray(ours), _torch_logits(net, x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_googlenet_transform_input_is_torchvisions_formula():
    """x_c * (std_c / 0.5) + (mean_c - 0.5) / 0.5 with ImageNet's mean and deviation."""
    model = get_model("googlenet_torchvision", num_classes=4, aux_heads=False)
    x = np.random.default_rng(4).normal(size=(1, 64, 64, 3)).astype(np.float32)  # any size: ceil pooling
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
    by_hand = np.stack([x[..., c] * (s / 0.5) + (m - 0.5) / 0.5 for c, (m, s) in
                        enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))], axis=-1)
    transformed = get_model("googlenet_torchvision", num_classes=4, aux_heads=False, transform_input=True)
    chex.assert_trees_all_close(_logits(transformed, variables, x), _logits(model, variables, by_hand),
                                rtol=1e-5, atol=1e-5)


def test_imagenet_normalisation_gives_torchvisions_logits_on_a_photo(tmp_path):
    """Published torchvision weights expect torchvision's eval transform. Through the prepared
    store and the preprocessor with normalize='imagenet', a torchvision-layout ResNet-18 gives the
    logits PyTorch gives with that transform written out: Resize(256) (PIL bilinear, shorter
    side), CenterCrop(224), ToTensor, Normalize(ImageNet mean, std)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from cnn_jax.data import augment, store

    photo = load_sample_images().images[0][:420, :630]  # 2:3, so Resize(256) is 256x384 exactly
    net = tv.randomise(tv.ResNet(18)).eval()
    model = get_model("resnet18")
    variables = weights.load(_write(net, tmp_path / "resnet18.pth"), model)

    resized = np.asarray(Image.fromarray(photo).resize((384, 256), Image.BILINEAR), np.float32) / 255.0
    top, left = int(round((256 - 224) / 2)), int(round((384 - 224) / 2))
    x = (resized[top:top + 224, left:left + 224] - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    reference = _torch_logits(net, x[None].astype(np.float32))

    stored = store.square(photo, store.StoreSpec(size=256))
    prep = augment.make_preprocessor(np.zeros((256, 256, 3)), np.zeros(3), np.eye(3), input_size=224, flip=False,
                                     pca_noise=0.0, normalize="imagenet")
    ours = _logits(model, variables, prep.evaluate(jnp.asarray(stored[None])))
    scale = np.abs(reference).max()
    chex.assert_trees_all_close(ours / scale, reference / scale, atol=1e-4)
    # the paper's normalisation feeds the same weights other inputs: the logits move
    plain = augment.make_preprocessor(np.zeros((256, 256, 3)), np.zeros(3), np.eye(3), input_size=224, flip=False,
                                      pca_noise=0.0)
    assert np.abs(_logits(model, variables, plain.evaluate(jnp.asarray(stored[None]))) - reference).max() > 0.1 * scale
