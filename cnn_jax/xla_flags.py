"""XLA flags that make CPU gradients correct, set before JAX's backend starts.

jaxlib 0.9 to 0.12 (0.10.2 is what pip installs on Python 3.11) hand convolutions to
YNNPACK on CPU, and some come out with wrong gradients: the first update of AlexNet at
227x227 is off float64 by up to 3.4e-3 of conv3's, through `jax.pmap` or a plain `jax.jit`
(`tests/test_gradients.py`). With YNNPACK fusions off (`--xla_cpu_experimental_ynn_fusion_type=`)
it is 2.8e-5. One case is left on jaxlib 0.12: with the flag, XLA's own convolutions give the
two-tower AlexNet's conv1 and conv2 (vmapped over the towers) updates off by 8.3e-3 and
2.7e-2; no setting of these flags is right for both networks there.

XLA reads `XLA_FLAGS` once, when the backend starts, so this runs when `cnn_jax` is
imported: that covers the project's jit and pmap paths and a researcher's own `jax.jit`
alike, as long as nothing ran on JAX before. `CNN_JAX_KEEP_XLA_DEFAULTS=1` leaves XLA's
defaults (to measure them).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
import warnings

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
FIX = f"{YNN_FLAG}="
# jaxlib versions whose YNNPACK convolutions give wrong gradients (measured: 0.9.2, 0.10.0,
# 0.10.2, 0.11.0, 0.12.0); 0.8.3 is right by default, and newer ones are not known yet.
NEEDS_FIX = ((0, 9), (0, 13))
KEEP_DEFAULTS = "CNN_JAX_KEEP_XLA_DEFAULTS"


class BackendStartedWarning(UserWarning):
    """`cnn_jax` was imported after JAX's backend started, too late to set XLA's flags."""


def jaxlib_version() -> tuple[int, ...]:
    """(major, minor) of the installed jaxlib, read without starting JAX; () if none."""
    try:
        text = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return ()
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def needs_fix(jaxlib: tuple[int, ...]) -> bool:
    return NEEDS_FIX[0] <= jaxlib < NEEDS_FIX[1]


def fix_wanted(environ=os.environ) -> bool:
    """This process should turn YNNPACK fusions off: its jaxlib needs it, neither
    `CNN_JAX_KEEP_XLA_DEFAULTS=1` nor a value of the flag set by hand in XLA_FLAGS says otherwise."""
    chosen = re.search(rf"{YNN_FLAG}=(\S*)", environ.get("XLA_FLAGS", ""))
    return environ.get(KEEP_DEFAULTS) != "1" and not (chosen and chosen.group(1)) and needs_fix(jaxlib_version())


def flags_with_fix(flags: str, jaxlib: tuple[int, ...]) -> str:
    """`flags` (an XLA_FLAGS value) with YNNPACK fusions turned off, when this jaxlib needs it
    and `flags` does not already choose a value for it (a choice made by hand wins)."""
    if not needs_fix(jaxlib) or YNN_FLAG in flags:
        return flags
    return f"{flags} {FIX}".strip()


def _started_on_cpu() -> bool:
    """JAX's backend already started (so XLA_FLAGS is read), and computes on the CPU."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    started = getattr(bridge, "backends_are_initialized", lambda: False)  # private: absent means unknown
    return bool(started()) and sys.modules["jax"].default_backend() == "cpu"


def apply(environ=os.environ) -> None:
    """Sets the flags in `environ`, which XLA reads when the backend starts.

    Too late when the backend already started on the CPU: then it warns once and names the
    fix. The jit runner still compiles with it (`parallel.compiler_options`); the pmap runner
    and a researcher's `jax.jit` do not.
    """
    if not fix_wanted(environ):
        return
    flags, jaxlib = environ.get("XLA_FLAGS", ""), jaxlib_version()
    wanted = flags_with_fix(flags, jaxlib)
    if wanted == flags:
        return
    if not _started_on_cpu():
        environ["XLA_FLAGS"] = wanted
        return
    warnings.warn(f"JAX's backend started before cnn_jax was imported, so XLA:CPU may compute wrong "
                  f"convolution gradients with jaxlib {'.'.join(map(str, jaxlib))}: import cnn_jax first, "
                  f"or add {FIX} to XLA_FLAGS before starting Python", BackendStartedWarning, stacklevel=3)
