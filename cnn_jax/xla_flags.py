"""XLA flags that make CPU gradients correct, set before JAX's backend starts.

jaxlib 0.9 and 0.10 (0.10.2 is what pip installs on Python 3.11) hand fusions to YNNPACK on
CPU, and some of those fusions compute convolution gradients wrongly: `jax.grad` of AlexNet's
loss at 227x227 differs from float64 by up to 1.3e-2 of conv3's largest gradient, where
float32 PyTorch is within 1e-6 (`tests/test_gradients.py`). Turning YNNPACK fusions off
(`--xla_cpu_experimental_ynn_fusion_type=`) gives 6e-7, and it is also the faster path
for these networks (Eigen's matrix products). XLA reads `XLA_FLAGS` once, when the backend
starts, so this runs when `cnn_jax` is imported: that covers the project's jit and pmap
paths and a researcher's own `jax.jit` alike, as long as nothing ran on JAX before.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import warnings

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
FIX = f"{YNN_FLAG}="
FIRST_WITH_FLAG = (0, 8)  # jaxlib 0.7 aborts on the flag as unknown; 0.8 knows it


class BackendStartedWarning(UserWarning):
    """`cnn_jax` was imported after JAX's backend started, too late to set XLA's flags."""


def _version(package: str) -> tuple[int, ...]:
    try:
        text = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ()
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def flags_with_fix(flags: str, jaxlib: tuple[int, ...]) -> str:
    """`flags` (an XLA_FLAGS value) with YNNPACK fusions turned off, when this jaxlib knows
    the flag and `flags` does not already choose a value for it (a choice made by hand wins)."""
    if not jaxlib or jaxlib < FIRST_WITH_FLAG or YNN_FLAG in flags:
        return flags
    return f"{flags} {FIX}".strip()


def _backend_started() -> bool:
    import sys

    bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(bridge is not None and bridge.backends_are_initialized())


def apply(environ=os.environ) -> None:
    """Sets the flags in `environ`, which XLA reads when the backend starts.

    Warns (once, naming the fix) when the backend already started with other flags: the
    project's own jit steps still compile with the fix (`parallel.compiler_options`), but
    a `jax.pmap` or a researcher's `jax.jit` would not.
    """
    flags = environ.get("XLA_FLAGS", "")
    wanted = flags_with_fix(flags, _version("jaxlib"))
    if wanted == flags:
        return
    if _backend_started():
        warnings.warn(f"JAX's backend started before cnn_jax was imported, so XLA:CPU may compute wrong "
                      f"convolution gradients with this jaxlib: import cnn_jax first, or set "
                      f"XLA_FLAGS='{FIX}' before starting Python", BackendStartedWarning, stacklevel=3)
        return
    environ["XLA_FLAGS"] = wanted
