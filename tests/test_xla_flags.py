"""The XLA flag that keeps CPU gradients correct: when it is added, and what a late import says."""

import os
import subprocess
import sys

from cnn_jax import parallel, xla_flags


def test_fix_is_appended_for_the_jaxlibs_that_need_it():
    assert xla_flags.flags_with_fix("--xla_force_host_platform_device_count=8", (0, 10)) == \
        "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type="
    assert xla_flags.flags_with_fix("", (0, 9)) == "--xla_cpu_experimental_ynn_fusion_type="
    assert xla_flags.flags_with_fix("", (0, 12)) == "--xla_cpu_experimental_ynn_fusion_type="


def test_fix_is_not_added_where_it_is_not_needed_unknown_or_overridden():
    assert xla_flags.flags_with_fix("", (0, 13)) == ""  # not measured yet
    assert xla_flags.flags_with_fix("", (0, 8)) == ""  # right by default; 0.7 aborts on the flag
    assert xla_flags.flags_with_fix("", ()) == ""  # no jaxlib installed
    chosen = "--xla_cpu_experimental_ynn_fusion_type=dot"
    assert xla_flags.flags_with_fix(chosen, (0, 10)) == chosen
    assert not xla_flags.fix_wanted({"XLA_FLAGS": chosen})  # nor do the compiled steps override it


def test_this_process_runs_with_the_fix_where_its_jaxlib_needs_it():
    has_fix = xla_flags.FIX in os.environ["XLA_FLAGS"].split()
    assert has_fix == xla_flags.needs_fix(xla_flags.jaxlib_version())
    assert bool(parallel.compiler_options("cpu")) == has_fix


def test_keep_defaults_leaves_the_flags_alone():
    environ = {xla_flags.KEEP_DEFAULTS: "1", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    xla_flags.apply(environ)
    assert environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    assert not xla_flags.fix_wanted(environ)


def test_import_after_the_backend_started_warns_where_the_jaxlib_is_wrong():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    code = "import jax; jax.numpy.ones(1).block_until_ready(); import cnn_jax"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if xla_flags.needs_fix(xla_flags.jaxlib_version()):
        assert "BackendStartedWarning" in out.stderr and xla_flags.FIX in out.stderr
    else:
        assert "BackendStartedWarning" not in out.stderr, out.stderr
