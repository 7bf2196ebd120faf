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
