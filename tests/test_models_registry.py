import pytest

import cnn_jax
from cnn_jax.models import get_model, list_models


def test_alexnet_is_registered():
    assert "alexnet" in list_models()
    assert cnn_jax.get_model("alexnet", num_classes=7).num_classes == 7


def test_unknown_model_suggests_a_name():
    with pytest.raises(ValueError, match="Did you mean 'alexnet'"):
        get_model("alexnett")


def test_unknown_field_is_an_error():
    with pytest.raises(ValueError, match="no field.*num_class"):
        get_model("alexnet", num_class=10)


def test_a_model_class_without_a_spec_cannot_register():
    import flax.linen as nn

    from cnn_jax.models import register

    class Bare(nn.Module):
        pass

    with pytest.raises(TypeError, match="must declare spec = ModelSpec"):
        register("bare_test_model")(Bare)
    assert "bare_test_model" not in list_models()


def _one_per_class():
    seen = {}
    for name in list_models():
        model = get_model(name, num_classes=10)
        seen.setdefault(type(model), name)
    return sorted(seen.values())


@pytest.mark.parametrize("name", _one_per_class())
def test_the_spec_head_names_layers_whose_shape_follows_the_class_count(name):
    """Transfer replaces exactly these layers: each exists, and its parameters change shape with
    num_classes while no other layer's do."""
    import jax

    from cnn_jax.models import abstract_variables, spec_of
    from cnn_jax.trees import path_name

    def shapes(classes):
        model = get_model(name, num_classes=classes)
        return {path_name(p): leaf.shape for p, leaf in
                jax.tree_util.tree_leaves_with_path(abstract_variables(model)["params"])}

    ten = shapes(10)
    head = set(spec_of(get_model(name, num_classes=10)).head)
    present = {h for h in head if any(p.startswith(h + "/") for p in ten)}
    assert present == head, (head, sorted(ten)[:5])
    if not head:  # lenet5: fixed RBF prototypes for the 10 digits, so no other class count
        with pytest.raises(ValueError, match="10 digits"):
            shapes(20)
        return
    twenty = shapes(20)
    changed = {path.rsplit("/", 1)[0] for path in ten if ten[path] != twenty[path]}
    assert changed == present, (changed, head)
