"""`python -m experiments.alexnet` end to end, as a user runs it (subprocesses)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

# AlexNet at 67x67 with 256-unit fc6/fc7: 3.9M parameters rather than 21.6M, so each checkpoint
# is 31 MB, not 173 (what these tests check does not depend on the layers' width).
TINY = ["--config.input_size=67", "--config.resize_size=72", "--config.model.fc_units=256", "--config.smoke=True"]
# A run that is lengthened and resumed: the default drop at 75% of the run would move with its
# length (refused on resume); the paper's plateau rule does not.
LENGTHENED = [*TINY, "--config.schedule=plateau"]


def run_cli(args, data_dir, env_extra=None, **kw):
    env = dict(os.environ, TFDS_DATA_DIR=str(data_dir), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "experiments.alexnet", *args], env=env,
                          capture_output=True, text=True, timeout=300, **kw)


def test_smoke_run_trains_evaluates_and_writes_everything(data_dir, tmp_path):
    # The first command's network at 227x227, with 256-unit fc6/fc7 (the checkpoints' 0.5 GB
    # would be most of the test's time).
    proc = run_cli(["--config.smoke=True", "--config.model.fc_units=256", f"--workdir={tmp_path}"], data_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "finished at step 3" in proc.stdout
    assert "He-normal" in proc.stdout  # the departure from the paper is said plainly
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (tmp_path / "checkpoints" / "3").is_dir() and (tmp_path / "curves.png").is_file()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss", "train/images_per_second", "train/data_wait"} <= set(logged[0])
    # The smoke run evaluates eval_limit=32 of the 300 validation digits (experiments/_run.smoke)
    # in one padded batch: each error rate is a count out of exactly those 32 (not out of the
    # padded batch, not a mean of batch means), top-5 cannot exceed top-1, and the summary is
    # the evaluation that was logged and printed.
    evaluated = 32
    assert 0.0 < summary["top1_error"] < 1.0  # 3 steps from a random start: neither extreme
    for key in ("top1_error", "top5_error"):
        wrong = summary[key] * evaluated
        assert abs(wrong - round(wrong)) < 1e-6, f"{key}={summary[key]} is not a count out of {evaluated}"
    assert summary["top5_error"] <= summary["top1_error"]
    last_eval = [entry for entry in logged if "eval/top1_error" in entry][-1]
    assert last_eval["step"] == 3
    assert (last_eval["eval/top1_error"], last_eval["eval/top5_error"]) == (summary["top1_error"], summary["top5_error"])
    assert f"finished at step 3: validation top-1 error {summary['top1_error']:.1%}" in proc.stdout


@pytest.mark.parametrize("flag,needle", [("--config.batch_sise=4", "did you mean --config.batch_size"),
                                         ("--config.batch_size=abc", "batch_size"),
                                         ("--config.dataset=nosuchset", "unknown dataset"),
                                         ("--config.dataset=mnist:x.y", "is not a dataset name")])
def test_bad_flags_give_one_line_errors(data_dir, tmp_path, flag, needle):
    proc = run_cli([flag, f"--workdir={tmp_path}"], data_dir)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_ctrl_c_saves_and_the_next_run_resumes(data_dir, tmp_path):
    env = dict(os.environ, TFDS_DATA_DIR=str(data_dir))
    proc = subprocess.Popen([sys.executable, "-m", "experiments.alexnet", *LENGTHENED,
                             "--config.num_train_steps=500", f"--workdir={tmp_path}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "SIGINT: saved step" in err + out
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] >= 3
    again = run_cli([*LENGTHENED, f"--config.num_train_steps={steps[-1] + 1}", f"--workdir={tmp_path}"], data_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from {tmp_path / 'checkpoints'}/{steps[-1]}" in again.stdout
    assert f"finished at step {steps[-1] + 1}" in again.stdout


@pytest.mark.parametrize("args", [pytest.param(["--config.parallel=pmap"], marks=pytest.mark.slow, id="pmap"),
                                  pytest.param(["--config.model_name=alexnet_2tower", "--config.mesh=(4, 2)",
                                                "--config.model.init_scheme=lecun"], id="two_towers")])
def test_parallel_modes_train_from_the_cli_on_8_devices(data_dir, tmp_path, args):
    assert "device_count=8" in os.environ.get("XLA_FLAGS", "")
    proc = run_cli([*TINY, *args, f"--workdir={tmp_path}"], data_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "finished at step 3" in proc.stdout
    png = tmp_path / "conv1_kernels.png"
    assert png.exists()  # Figure 3: a block of 48 kernels per tower, 16 to a row, 44-pixel tiles
    from PIL import Image

    width, height = Image.open(png).size
    assert width >= 16 * 44 and height >= 2 * 3 * 44 and width / height < 4, (width, height)


@pytest.mark.slow
def test_viz_cli_reads_a_checkpoint_written_on_other_devices(data_dir, tmp_path):
    import numpy as np

    from cnn_jax import viz

    assert run_cli([*TINY, f"--workdir={tmp_path}"], data_dir).returncode == 0
    one_device = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the run had 8
    proc = subprocess.run([sys.executable, "-m", "cnn_jax.viz", str(tmp_path), "--out", str(tmp_path / "fig.png")],
                          env=one_device, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "fig.png").stat().st_size > 0
    assert viz.main([str(tmp_path / "nothing")]) == 2
    with pytest.raises(ValueError, match="no conv1 \\(their first layers: C1, C3\\)"):  # LeNet's names
        viz.save_conv1_figure({"C1": {"kernel": np.zeros((5, 5, 1, 6))}, "C3": {}}, tmp_path / "lenet.png")


def test_mesh_mismatch_is_a_one_line_error(data_dir, tmp_path):
    proc = run_cli([*TINY, "--config.mesh=(3, 2)", f"--workdir={tmp_path}"], data_dir)
    assert proc.returncode != 0 and "--config.mesh=(3, 2): needs 6 devices but 8" in proc.stderr
    assert "Traceback" not in proc.stderr


def free_port(low: int = 0, high: int = 0) -> int:
    """A port nobody listens on: any (the system's choice), or one in [low, high]."""
    import random
    import socket

    for port in ([0] if not low else random.sample(range(low, high + 1), 50)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in {low}..{high}")


@pytest.mark.parametrize("rank", [0, 1])
def test_a_task_whose_peers_never_start_is_one_line_within_the_timeout(data_dir, tmp_path, rank):
    """Task `rank` of 2 under srun, the other never started: a one-line error naming what was
    read, not a hang, nor (process 0, waiting inside XLA) XLA's abort."""
    start = time.monotonic()
    proc = run_cli([*TINY, "--config.distributed_timeout=5", f"--workdir={tmp_path}"], data_dir,
                   env_extra={**slurm_task(rank), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "could not join the others" in errors[0] and "within 5 s" in errors[0], errors[0]
    assert "SLURM_NTASKS=2" in errors[0] and f"SLURM_PROCID={rank}" in errors[0], errors[0]
    assert "config.distributed_timeout" in errors[0] and time.monotonic() - start < 90
    assert "Traceback" not in proc.stderr and "Aborted" not in proc.stderr


def slurm_task(rank: int, tasks: int = 2) -> dict:
    """The variables `srun --ntasks=2` sets in each task on one node (127.0.0.1); JAX derives the
    coordinator's port from the job id."""
    job = free_port(61440, 65535) - 61440  # JAX's port for a SLURM job: 61440 + job id mod 4096
    return {"SLURM_JOB_ID": str(job + 4096 * 7), "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": str(tasks),
            "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_STEP_NUM_NODES": "1",
            "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1"}


@pytest.mark.parametrize("launch", [pytest.param("flags", marks=pytest.mark.slow), "srun"])
def test_two_processes_train_together_and_one_process_resumes(data_dir, tmp_path, launch):
    """Multi-host on one machine: 2 processes x 2 CPU devices, gloo collectives on 127.0.0.1,
    started with the three settings, or as `srun` starts them (no settings: found by JAX)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    env = dict(os.environ, TFDS_DATA_DIR=str(data_dir), XLA_FLAGS="--xla_force_host_platform_device_count=2")
    port, workdir, slurm = free_port(), tmp_path / "two_processes", slurm_task(0)

    def task(i):
        if launch == "srun":
            return [], {**env, **slurm, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)}
        return ["--config.num_processes=2", f"--config.process_id={i}",
                f"--config.coordinator_address=127.0.0.1:{port}"], env

    procs = [subprocess.Popen([sys.executable, "-m", "experiments.alexnet", *LENGTHENED, *task(i)[0], f"--workdir={workdir}"],
                              env=task(i)[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err[-2000:]
            outputs.append(out)
    finally:
        for proc in procs:
            proc.kill()
    assert all(json.loads(out.strip().splitlines()[-1])["step"] == 3 for out in outputs)

    # The same run on one process with the same 4 devices and global batch trains the same
    # weights: the global batches, augmentation draws and dropout masks do not depend on the
    # process count. Only the order of the gradient all-reduce's float32 sums differs (gloo
    # across processes, in-process here): seen <= 1.5e-8 after 3 steps. The bound, 1e-6 +
    # 1e-5 relative (~1e-5 of a typical weight, ~0.1), is well below the 6e-5 to 5e-3 that
    # steps 2-3 move each layer's largest weight, so other batches, crops or a gradient share
    # left out of the sum fail it.
    reference = tmp_path / "one_process"
    one = run_cli([*LENGTHENED, f"--workdir={reference}"], data_dir,
                  env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert one.returncode == 0, one.stderr[-2000:]
    checkpointer, here = ocp.StandardCheckpointer(), jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def params_at_step_3(run_dir):
        path = run_dir / "checkpoints" / "3" / "state"
        saved = checkpointer.metadata(path)
        saved = getattr(saved, "item_metadata", saved)  # saved on another topology: restore onto one device
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), saved)
        return jax.device_get(checkpointer.restore(path, target)["params"])

    two_params, one_params = params_at_step_3(workdir), params_at_step_3(reference)
    assert jax.tree.structure(two_params) == jax.tree.structure(one_params)
    for (path, two_leaf), one_leaf in zip(jax.tree_util.tree_leaves_with_path(two_params), jax.tree.leaves(one_params)):
        np.testing.assert_allclose(two_leaf, one_leaf, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))

    # Written once, readable by a different number of processes (the stream is a function of
    # the step alone, so there is no per-process reader state to carry over):
    single = run_cli([*LENGTHENED, "--config.num_train_steps=4", f"--workdir={workdir}"], data_dir,
                     env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert single.returncode == 0, single.stderr[-2000:]
    assert f"resumed from {workdir / 'checkpoints'}/3" in single.stdout
    assert "finished at step 4" in single.stdout


@pytest.mark.slow
def test_eval_only_reports_centre_and_ten_crop(data_dir, tmp_path):
    empty = run_cli([*TINY, "--config.eval_only=True", f"--workdir={tmp_path}"], data_dir)
    assert empty.returncode != 0 and "no checkpoint" in empty.stderr and "Traceback" not in empty.stderr
    assert run_cli([*TINY, f"--workdir={tmp_path}"], data_dir).returncode == 0
    proc = run_cli([*TINY, "--config.eval_only=True", f"--workdir={tmp_path}"], data_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "evaluated step 3" in proc.stdout and "ten-crop (softmax averaged over 10 patches)" in proc.stdout
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"top1_error", "ten_crop_top1_error", "ten_crop_top5_error"} <= set(summary)


CAPPED = ("import os, resource, signal, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16)); "
          "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
# What a full disk does to a write, for one process: files cannot grow past 64 kB (EFBIG; with
# SIGXFSZ ignored, which exec keeps, the write fails instead of killing the process).


@pytest.mark.slow
def test_a_failed_save_stops_in_one_line_and_keeps_the_previous_checkpoint(data_dir, tmp_path):
    import chex

    from cnn_jax.checkpoint import restore_as_numpy

    steps = ["--config.checkpoint_every_steps=2", "--config.eval_every_steps=2"]
    first = run_cli([*LENGTHENED, *steps, "--config.num_train_steps=2", f"--workdir={tmp_path}"], data_dir)
    assert first.returncode == 0, first.stderr[-2000:]
    before = restore_as_numpy(tmp_path / "checkpoints" / "2" / "state")
    env = dict(os.environ, TFDS_DATA_DIR=str(data_dir))
    proc = subprocess.run([sys.executable, "-c", CAPPED, "-m", "experiments.alexnet", *LENGTHENED, *steps,
                           "--config.num_train_steps=4", f"--workdir={tmp_path}"], env=env, capture_output=True,
                          text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert "saving checkpoint 4 to" in errors[0] and "(File too large); kept: [2]" in errors[0], errors[0]
    assert "Traceback" not in proc.stderr, proc.stderr[proc.stderr.index("Traceback") - 300:][:3000]
    after = restore_as_numpy(tmp_path / "checkpoints" / "2" / "state")
    chex.assert_trees_all_equal(before, after)  # step 2 untouched by the failed save of step 4


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_saved_step(data_dir, tmp_path):
    """A scheduler preempting one host: both processes agree at a log step, save that step
    together and exit 143; the run then resumes from it."""
    env = dict(os.environ, TFDS_DATA_DIR=str(data_dir), XLA_FLAGS="--xla_force_host_platform_device_count=2")
    port, workdir = free_port(), tmp_path / "run"
    args = [*LENGTHENED, "--config.num_train_steps=200", "--config.checkpoint_every_steps=3"]
    procs = [subprocess.Popen([sys.executable, "-m", "experiments.alexnet", *args, "--config.num_processes=2",
                               f"--config.process_id={i}", f"--config.coordinator_address=127.0.0.1:{port}",
                               f"--workdir={workdir}"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.monotonic() + 240
        while not (workdir / "checkpoints" / "3").is_dir():  # training is under way
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)
        results = [proc.communicate(timeout=240) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [143, 143], [err[-1500:] for _, err in results]
    saved = {line.split("saved step ")[1].split()[0] for out, err in results for line in (out + err)
             .replace("\r", "\n").splitlines() if line.startswith("SIGTERM: saved step")}
    assert len(saved) == 1, saved  # reported by process 0; the same step on every process
    step = int(saved.pop())
    assert 3 <= step < 200 and (workdir / "checkpoints" / str(step)).is_dir()
    resumed = run_cli([*args, f"--config.num_train_steps={step + 1}", f"--workdir={workdir}"], data_dir,
                      env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {workdir / 'checkpoints'}/{step}" in resumed.stdout


def test_eval_only_leaves_the_run_config_alone_and_five_classes_have_no_top5(data_dir, tmp_path, capsys):
    """An evaluation changes nothing a later training run compares against; with 5 classes
    every label is in the top 5, so top-5 error is not applicable (not 0%)."""
    from experiments import _run, alexnet

    def main(*args):
        status = _run.main(alexnet.get_config, ["alexnet", *LENGTHENED, "--config.classes=(0, 1, 2, 3, 4)",
                                                f"--config.data_dir={data_dir}", f"--workdir={tmp_path}", *args])
        out = capsys.readouterr().out
        assert status == 0, out[-2000:]
        return out

    trained = main()
    assert "top-5 error n/a (5 classes or fewer)" in trained and "top-5 error 0.0%" not in trained
    assert "top5_error" not in json.loads(trained.strip().splitlines()[-1])
    recorded = (tmp_path / "config.json").read_bytes()
    evaluated = main("--config.eval_only=True")
    assert "evaluated step 3" in evaluated and "config changed" not in evaluated
    assert (tmp_path / "config.json").read_bytes() == recorded
    resumed = main("--config.num_train_steps=4")
    changed = [line for line in resumed.splitlines() if line.startswith("config changed")]
    assert "resumed from" in resumed
    assert changed == ["config changed since the last run: num_train_steps: 3 -> 4"], changed
    assert json.loads((tmp_path / "config.json").read_text())["num_train_steps"] == 4  # the record follows the run


def test_a_repeated_run_compiles_nothing_new_with_the_cache(data_dir, tmp_path):
    """The second run of a command finds every program it compiles in --config.compilation_cache:
    nothing is added, and both runs end alike."""
    cache = tmp_path / "xla"  # every program is kept, however fast its compile
    first = run_cli([*TINY, f"--config.compilation_cache={cache}", f"--workdir={tmp_path / 'a'}"], data_dir)
    assert first.returncode == 0, first.stderr[-2000:]
    entries = sorted(p.name for p in cache.iterdir())
    # The steps and the dozens of small programs of the model's initialisation: with JAX's
    # default (only programs of a second's compile or more) this run keeps 2.
    assert len(entries) > 10, entries
    again = run_cli([*TINY, f"--config.compilation_cache={cache}", f"--workdir={tmp_path / 'b'}"], data_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(p.name for p in cache.iterdir()) == entries
    assert first.stdout.strip().splitlines()[-1] == again.stdout.strip().splitlines()[-1]
