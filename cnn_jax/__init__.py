"""cnn_jax: the classic convolutional networks in JAX/Flax, faithful to their papers."""

from cnn_jax import xla_flags

xla_flags.apply()  # before anything starts JAX's backend: correct CPU gradients (see xla_flags)

from cnn_jax.models import get_model, list_models, register  # noqa: E402

__all__ = ["get_model", "list_models", "register"]
__version__ = "0.1.0"
