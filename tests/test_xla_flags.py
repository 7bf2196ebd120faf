"""The XLA flag that keeps CPU gradients correct: when it is added, and what a late import says."""

import os
import subprocess
import sys

from cnn_jax import xla_flags


def test_fix_is_appended_for_jaxlibs_that_know_the_flag():
    assert xla_flags.flags_with_fix("--xla_force_host_platform_device_count=8", (0, 10)) == \
        "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type="
    assert xla_flags.flags_with_fix("", (0, 12)) == "--xla_cpu_experimental_ynn_fusion_type="


def test_fix_is_not_added_where_it_would_abort_or_override_a_choice():
    assert xla_flags.flags_with_fix("", (0, 7)) == ""  # jaxlib 0.7 aborts on an unknown flag
    assert xla_flags.flags_with_fix("", ()) == ""  # no jaxlib installed
    chosen = "--xla_cpu_experimental_ynn_fusion_type=dot"
    assert xla_flags.flags_with_fix(chosen, (0, 10)) == chosen


def test_this_process_runs_with_the_fix():
    assert xla_flags.FIX in os.environ["XLA_FLAGS"].split()


def test_keep_defaults_leaves_the_flags_alone():
    environ = {xla_flags.KEEP_DEFAULTS: "1", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    xla_flags.apply(environ)
    assert environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"


def test_import_after_the_backend_started_warns_where_the_jaxlib_is_wrong():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    code = "import jax; jax.numpy.ones(1).block_until_ready(); import cnn_jax"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    low, high = xla_flags.WRONG_WITHOUT
    if low <= xla_flags._version("jaxlib") < high:
        assert "BackendStartedWarning" in out.stderr and xla_flags.FIX in out.stderr
    else:
        assert "BackendStartedWarning" not in out.stderr, out.stderr
