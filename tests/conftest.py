"""Test set-up: 8 simulated CPU devices for mesh tests (must precede the first JAX use)."""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Runs under test (`train_and_evaluate`, in the workers and in the processes tests start) share
# one compilation cache for the session, never ~/.cache: the same AlexNet programs recur in many
# of them. It goes when the session ends.
if "CNN_JAX_COMPILATION_CACHE" not in os.environ:
    os.environ["CNN_JAX_COMPILATION_CACHE"] = _SESSION_CACHE = tempfile.mkdtemp(prefix="cnn_jax_test_xla_")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A tfds data dir with the offline digits prepared once for the whole session."""
    from cnn_jax.data.sources import open_split

    path = tmp_path_factory.mktemp("tfds")
    open_split("digits", "train", str(path))
    return path


def pytest_unconfigure(config):
    if "_SESSION_CACHE" in globals():  # this process made it (the workers inherit the variable)
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
