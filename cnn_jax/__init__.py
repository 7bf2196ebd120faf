"""cnn_jax: the classic convolutional networks in JAX/Flax, faithful to their papers."""

from cnn_jax import config
from cnn_jax.models import get_model, list_models, register

__all__ = ["config", "get_model", "list_models", "register"]
__version__ = "0.1.0"
