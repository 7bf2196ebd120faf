"""XLA flags that make CPU gradients correct, set before JAX's backend starts.

jaxlib 0.9 and 0.10 (0.10.2 is what pip installs on Python 3.11) hand fusions to YNNPACK on
CPU, and some of those fusions compute convolution gradients wrongly: the first update of
AlexNet at 227x227 is off float64 by up to 3.4e-3 of conv3's largest, through `jax.pmap` or
a plain `jax.jit` (`tests/test_gradients.py`). With YNNPACK fusions off
(`--xla_cpu_experimental_ynn_fusion_type=`) it is 2.8e-5, and Eigen's matrix products were
also the faster path for these networks. XLA reads `XLA_FLAGS` once, when the backend
starts, so this runs when `cnn_jax` is imported: that covers the project's jit and pmap
paths and a researcher's own `jax.jit` alike, as long as nothing ran on JAX before.
`CNN_JAX_KEEP_XLA_DEFAULTS=1` leaves XLA's defaults (to measure them).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
import warnings

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
FIX = f"{YNN_FLAG}="
FIRST_WITH_FLAG = (0, 8)  # jaxlib 0.7 aborts on the flag as unknown; 0.8 knows it
WRONG_WITHOUT = ((0, 9), (0, 12))  # measured wrong: 0.9.2-0.10.2; 0.8.3 and 0.12.0 right; 0.11 not measured
KEEP_DEFAULTS = "CNN_JAX_KEEP_XLA_DEFAULTS"


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


def _started_on_cpu() -> bool:
    """JAX's backend already started (so XLA_FLAGS is read), and computes on the CPU."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    started = getattr(bridge, "backends_are_initialized", lambda: False)  # private: absent means unknown
    return bool(started()) and sys.modules["jax"].default_backend() == "cpu"


def apply(environ=os.environ) -> None:
    """Sets the flags in `environ`, which XLA reads when the backend starts.

    Too late when the backend already started: then, on a jaxlib measured wrong, it warns
    once and names the fix. The jit runner still compiles with it (`parallel.compiler_options`);
    the pmap runner and a researcher's `jax.jit` do not.
    """
    if environ.get(KEEP_DEFAULTS) == "1":
        return
    flags, jaxlib = environ.get("XLA_FLAGS", ""), _version("jaxlib")
    wanted = flags_with_fix(flags, jaxlib)
    if wanted == flags:
        return
    if not _started_on_cpu():
        environ["XLA_FLAGS"] = wanted
    elif WRONG_WITHOUT[0] <= jaxlib < WRONG_WITHOUT[1]:
        warnings.warn(f"JAX's backend started before cnn_jax was imported, so XLA:CPU may compute wrong "
                      f"convolution gradients with jaxlib {'.'.join(map(str, jaxlib))}: import cnn_jax first, "
                      f"or add {FIX} to XLA_FLAGS before starting Python", BackendStartedWarning, stacklevel=3)
