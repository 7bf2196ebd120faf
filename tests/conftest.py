"""Test set-up: 8 simulated CPU devices for mesh tests (must precede the first JAX use)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CNN_JAX_COMPILATION_CACHE", "")  # runs under test compile afresh (no ~/.cache writes)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A tfds data dir with the offline digits prepared once for the whole session."""
    from cnn_jax.data.sources import open_split

    path = tmp_path_factory.mktemp("tfds")
    open_split("digits", "train", str(path))
    return path
