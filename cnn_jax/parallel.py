"""Every device: one ('data', 'model') mesh, jit with shardings, the pmap path, the towers.

- Data parallel (default): the global batch is sharded on 'data', parameters replicated;
  `jax.jit` with in/out shardings compiles one program for all devices, and XLA inserts the
  gradient all-reduce.
- `pmap` (`parallel="pmap"`): the classic path, the same pure `train_step` with
  gradients averaged by `pmean` over 'data'. Batch-norm statistics are then per device, as in
  the classic recipes (the jit path computes them over the global batch).
- AlexNet's two towers: a model whose spec has `partition_rules` (alexnet_2tower) has its tower axis
  split over 'model', and its forward pass runs under `jax.shard_map` with the towers'
  activations exchanged by `all_gather` exactly where the paper's GPUs communicate.
- Multi-host: `initialize_distributed` before anything else; each process loads its own
  part of the global batch, and `place_batch` assembles the global array.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import sys
import threading
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cnn_jax.config import ConfigError, Set, one_of
from cnn_jax.data.augment import CROPS
from cnn_jax.models import spec_of
from cnn_jax.trees import path_name

MODES = ("jit", "pmap")


class MeshError(ConfigError):
    """Devices, mesh, batch and parallel mode that do not fit together."""


def check_mesh(mesh: tuple, towers: int, device_count: int, mode: str = "jit", process_count: int = 1,
               model_name: str = "") -> int:
    """The one rule for a (data, model) mesh: its product is the device count, its 'model' axis
    holds the model's towers (1: not split), pmap runs one process with no towers. Returns the
    'data' axis size. `mesh=()` means all devices on 'data'."""
    mesh, named = tuple(mesh), f"model {model_name!r}" if model_name else "the model"
    one_of("parallel", mode, MODES, "parallel mode", MeshError)
    if mesh and (len(mesh) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in mesh)):
        typed = mesh[0] if len(mesh) == 1 and isinstance(mesh[0], str) else mesh  # 'abc' parses as ('abc',)
        raise MeshError("must be () or a (data, model) pair of positive integers, e.g. {0}",
                        Set("mesh", (device_count, 1)), key="mesh", value=typed)
    if towers > 1 and device_count < towers:
        raise MeshError(f"needs {towers} devices, one per tower, but {device_count} is available: run on "
                        f"{towers} devices or simulate them with XLA_FLAGS=--xla_force_host_platform_device_count="
                        f"{towers}", key="model_name" if model_name else "mesh",
                        value=model_name if model_name else mesh)
    fit = Set("mesh", (max(device_count // towers, 1), towers))
    if mesh and math.prod(mesh) != device_count:
        raise MeshError(f"needs {math.prod(mesh)} devices but {device_count} are available: use {{0}} or "
                        f"another (data, model) pair whose product is {device_count}", fit, key="mesh", value=mesh)
    model_axis = mesh[1] if mesh else 1
    if model_axis != towers:
        raise MeshError(f"{named} needs a 'model' axis of {towers}: use {{0}}", fit, key="mesh", value=mesh)
    if mode == "pmap" and (towers > 1 or model_axis != 1 or process_count > 1):
        raise MeshError("runs data parallel on one process only (a (devices, 1) mesh, no towers): use {0}",
                        Set("parallel", "jit"), key="parallel", value="pmap")
    return mesh[0] if mesh else device_count


DISTRIBUTED = ("detect", "auto", "manual")
# What a cluster launcher sets in every task's environment, and what jax.distributed.initialize()
# reads when called without arguments: (variables that must all be set, the task count's variable).
CLUSTERS = {
    "SLURM": (("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"),
              "SLURM_NTASKS"),
    "Open MPI": (("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                  "OMPI_COMM_WORLD_LOCAL_RANK"), "OMPI_COMM_WORLD_SIZE"),
}


def detected_cluster(environ=os.environ) -> tuple[str, int] | None:
    """(launcher, task count) when this process is one task of a cluster launch (srun, mpirun)."""
    for name, (variables, count) in CLUSTERS.items():
        if all(v in environ for v in variables):
            return name, _whole(environ, count)
    return None


def launch(mode: str, num_processes: int = 1, coordinator: str = "", environ=os.environ) -> tuple[str, int, str]:
    """(how the processes find each other: 'single', 'auto' or 'manual'; the process count; the
    coordinator) for `mode`: 'detect' (auto under a cluster launch of 2+ tasks, else the manual
    settings), 'auto' (jax.distributed.initialize() finds the cluster: SLURM, Open MPI,
    Kubernetes, Cloud TPU) or 'manual' (num_processes, process_id, coordinator_address, or
    JAX_NUM_PROCESSES, JAX_PROCESS_ID, JAX_COORDINATOR_ADDRESS)."""
    one_of("distributed", mode, DISTRIBUTED, "process launch")
    count = _whole(environ, "JAX_NUM_PROCESSES", num_processes)
    coordinator = coordinator or environ.get("JAX_COORDINATOR_ADDRESS", "")
    cluster = detected_cluster(environ)
    if mode == "auto" or (mode == "detect" and count == 1 and cluster and cluster[1] > 1):
        return "auto", cluster[1] if cluster else 0, ""  # 0: the launcher's count, known once joined
    if count > 1 and not coordinator:
        raise ConfigError(f"{count} processes need the HOST:PORT of process 0: set {{0}} (or "
                          "$JAX_COORDINATOR_ADDRESS), or start them with a cluster launcher (srun, mpirun)",
                          Set("coordinator_address", "HOST:PORT"))
    if count > 1 and not re.fullmatch(r"\S+:\d+", coordinator):  # a port is what process 0 listens on
        raise ConfigError("must be HOST:PORT of process 0, e.g. {0}", Set("coordinator_address", "10.0.0.1:1234"),
                          key="coordinator_address", value=coordinator)
    return ("manual" if count > 1 else "single"), count, coordinator


def initialize_distributed(mode: str = "detect", coordinator: str = "", num_processes: int = 1, process_id: int = 0,
                           timeout: int = 300, environ=os.environ):
    """`jax.distributed.initialize` when this run is one of several processes (see `launch`). A
    process that cannot join within `timeout` seconds raises a one-line `ConfigError` naming
    what it read, instead of waiting for ever; process 0, held inside XLA while it waits for
    the others, prints that line and exits with status 2 (XLA would abort it)."""
    how, count, coordinator = launch(mode, num_processes, coordinator, environ)
    if how == "single" or jax.distributed.is_initialized():  # one process runs several trainings
        return
    process_id = _whole(environ, "JAX_PROCESS_ID", process_id)
    if how == "auto":
        coordinator, process_id = _cluster_address(timeout)
    read = _read_variables(environ) if how == "auto" else f"coordinator {coordinator}, {count} processes"

    def not_joined(why: str) -> ConfigError:
        return ConfigError(f"this process could not join the others ({why}; read {read}): start "
                           "every task, check that process 0's host is reachable, or raise {0}",
                           Set("distributed_timeout"), key="distributed", value=mode)

    # XLA's client aborts the whole process when process 0 cannot be reached in time: look first.
    if process_id and coordinator and not _reachable(coordinator, timeout):
        raise not_joined(f"nothing answers at {coordinator} within {timeout} s")
    # Process 0 waits for the others inside XLA, which aborts when they never come: a watchdog
    # speaks first (XLA's own deadline is GRACE seconds later).
    watchdog = _exit_with(not_joined(f"the {count or 'launched'} processes did not all join within {timeout} s"),
                          after=timeout)
    try:
        if how == "auto":
            jax.distributed.initialize(initialization_timeout=timeout + GRACE)
        else:
            jax.distributed.initialize(coordinator_address=coordinator, num_processes=count, process_id=process_id,
                                       initialization_timeout=timeout + GRACE)
    except Exception as err:  # noqa: BLE001 - jax raises several kinds; all mean: did not join
        raise not_joined(str(err).splitlines()[0][:200] if str(err) else type(err).__name__) from None
    finally:
        watchdog.cancel()


GRACE = 30  # seconds XLA waits beyond distributed_timeout


def _exit_with(error: Exception, after: float) -> threading.Timer:
    """A timer that, unless cancelled within `after` seconds, prints `error` in one line and
    ends the process with status 2: the main thread is then blocked inside XLA, where no
    Python exception reaches it, and XLA's own end is an abort with a C++ stack."""

    def expire():
        print(f"error: {error}", file=sys.stderr, flush=True)
        os._exit(2)

    timer = threading.Timer(after, expire)
    timer.daemon = True
    timer.start()
    return timer


def _cluster_address(timeout: int) -> tuple[str, int]:
    """(coordinator, this process's id) as jax.distributed.initialize() will find them; ('', 0)
    where this jax cannot say beforehand (its detection is internal)."""
    try:
        from jax._src import clusters

        found = clusters.ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, timeout)
        return found[0] or "", int(found[2] or 0)
    except Exception:  # noqa: BLE001 - the look-ahead is optional; initialize() still detects
        return "", 0


def _reachable(address: str, timeout: float) -> bool:
    """Whether something accepts connections at HOST:PORT within `timeout` seconds."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def _whole(environ, variable: str, default: int | None = None) -> int:
    """An environment variable that must hold a whole number, as an int (else `default`)."""
    text = environ.get(variable)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"${variable}={text!r} is not a whole number: fix it or unset it") from None


def _read_variables(environ) -> str:
    found = [f"{v}={environ[v]}" for variables, _ in CLUSTERS.values() for v in variables if v in environ]
    return ", ".join(found) or "no cluster variables set"


def make_mesh(shape: tuple[int, int] | None = None) -> Mesh:
    """A ('data', 'model') mesh over all devices; default (device count, 1).

    Auto axis types: shardings propagate from the inputs (Explicit axes would demand an
    `out_sharding` on every operation).
    """
    n = jax.device_count()
    shape = tuple(shape) if shape else (n, 1)
    check_mesh(shape, shape[1] if len(shape) == 2 else 1, n)
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh(shape, ("data", "model"), axis_types=auto)


# XLA:CPU hands matrix products to YNNPACK by default (jaxlib 0.9 and later); Eigen's kernels
# were 27% faster for AlexNet's step (2-core AVX-512 machine, `python -m benchmarks.train_step`).
# A rounding choice, not a correctness one: both agree with float64 to float32's precision.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def compiler_options(backend: str | None = None) -> dict | None:
    """Options for `jax.jit(..., compiler_options=...)` on `backend` (default: JAX's).

    CPU: `CPU_COMPILER_OPTIONS`, when this jaxlib knows them (an option it does not know is
    an error at compile time, so it is tried once on a tiny function); elsewhere none.
    """
    if (backend or jax.default_backend()) != "cpu":
        return None
    try:
        jax.jit(lambda x: x @ x, compiler_options=CPU_COMPILER_OPTIONS).lower(jnp.ones((2, 2))).compile()
    except Exception:  # noqa: BLE001 - any refusal means: compile with XLA's defaults
        return None
    return dict(CPU_COMPILER_OPTIONS)


def jit(fun: Callable, **kwargs) -> Callable:
    """`jax.jit` with this backend's `compiler_options`."""
    return jax.jit(fun, compiler_options=compiler_options(), **kwargs)


def use_compilation_cache(directory: str) -> str:
    """Keeps every compiled program in `directory` (created), so that a repeated or resumed run
    skips compiling them; '' turns the cache off. Every program, not only those of a second's
    compile or more (JAX's default): initialising a model runs dozens of small ones, each
    compiled on its own (a warm AlexNet run at 67x67: 17.8 s with JAX's default, 10.7 s with
    all; one run each, on shared cores). JAX settles this at its first
    compilation in a process: call it before anything compiles. Returns the folder."""
    if not directory:
        jax.config.update("jax_enable_compilation_cache", False)
        return ""
    path = os.path.abspath(os.path.expanduser(directory))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot be created ({err.strerror}): choose a writable folder, or '' to "
                          "compile afresh", key="compilation_cache", value=directory) from None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # a user's own threshold wins
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def barrier(name: str):
    """Every process waits here for the others (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any: for decisions all must share."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def check_batch(global_batch: int, data_axis: int, process_count: int = 1, key: str = "batch_size",
                also: str = ""):
    """The one rule for a batch: it splits evenly over the 'data' axis and the processes (`also`:
    another way out, added to the message)."""
    step = math.lcm(data_axis, process_count)
    if global_batch % step:
        why = (f"the 'data' mesh axis has {data_axis} device(s)" +
               (f" and there are {process_count} processes" if process_count > 1 else ""))
        below = global_batch // step * step
        fixes = [Set(key, below), Set(key, below + step)] if below > 0 else [Set(key, step)]
        said = " or ".join(f"{{{i}}}" for i in range(len(fixes)))
        raise MeshError(f"must be a multiple of {step} ({why}): use {said}{also}", *fixes, key=key, value=global_batch)


def spec_for(path: str, rules) -> P:
    """The first rule whose regex matches the end of `path` ('a/b/kernel'), else replicated."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            return spec
    return P()


def tree_specs(tree, rules=()):
    """A PartitionSpec for every leaf of `tree` (arrays or ShapeDtypeStructs), from `rules`;
    scalars are replicated. Rules match parameter paths, so the optimiser's copies of the
    parameters (momentum) shard like the parameters themselves."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, leaf: spec_for(path_name(kp), rules) if np.ndim(leaf) else P(), tree)


def tree_shardings(tree, mesh: Mesh, rules=()):
    """`tree_specs` as NamedShardings on `mesh`."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), tree_specs(tree, rules),
                        is_leaf=lambda x: isinstance(x, P))


def place_batch(batch: dict, mesh: Mesh) -> dict:
    """This process's part of the batch -> global arrays sharded on 'data'."""
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def towers_apply(model: nn.Module, mesh: Mesh) -> Callable:
    """`model.apply` for a tower-stacked model, one tower per device of the 'model' axis.

    Inside `shard_map` each device runs its own tower on its own slice of the batch; the
    model's `tower_gather` is an all_gather over 'model'. Dropout keys differ per tower and
    per data shard.
    """
    if mesh.shape["model"] != model.towers:
        raise MeshError(f"{model.towers} towers need a 'model' mesh axis of {model.towers}, not "
                        f"{mesh.shape['model']}: use {{0}}", Set("mesh", (max(mesh.size // model.towers, 1), model.towers)),
                        key="mesh", value=tuple(mesh.shape.values()))
    gather = functools.partial(jax.lax.all_gather, axis_name="model", axis=0, tiled=True)

    def combine(x):  # (1, B, k) -> (B, towers * k), this tower's k columns filled, then summed
        mine = jax.nn.one_hot(jax.lax.axis_index("model"), model.towers, dtype=x.dtype)
        return jax.lax.psum(jnp.einsum("bk,t->btk", x[0], mine).reshape(x.shape[1], -1), "model")

    local = model.clone(local_towers=1, tower_gather=gather, tower_combine=combine)

    def apply(variables, x, *, train: bool, rngs=None, mutable=False):
        if mutable:
            raise ValueError("the two-tower model keeps no mutable state")
        specs = tree_specs(variables, spec_of(model).partition_rules)
        key = (rngs or {}).get("dropout", jax.random.key(0))

        def body(v, images, key):
            key = jax.random.fold_in(jax.random.fold_in(key, jax.lax.axis_index("model")),
                                     jax.lax.axis_index("data"))
            return local.apply(v, images, train=train, rngs={"dropout": key})

        return jax.shard_map(body, mesh=mesh, in_specs=(specs, P("data"), P()),
                             out_specs=P("data"))(variables, x, key)

    return apply


@dataclasses.dataclass
class Runner:
    """How a training run uses the devices; the loop calls only these.

    state_shardings: the canonical layout (checkpoints, evaluation); place_state: canonical
    -> the runner's layout; host_state: the inverse; place: a host batch -> device arrays;
    step(state, batch, rng, prep) and eval(state, batch, prep, crops): the compiled functions.
    """

    mesh: Mesh
    mode: str
    state_shardings: object
    place_state: Callable
    host_state: Callable
    place: Callable
    step: Callable
    eval: Callable

    def place_eval(self, batch: dict) -> dict:
        """Evaluation runs jitted over the mesh in every mode: global arrays sharded on 'data'."""
        return place_batch(batch, self.mesh)


def apply_fn(model: nn.Module, mesh: Mesh) -> Callable:
    """The model's apply for this mesh: tower-sharded for models that declare partition rules."""
    return towers_apply(model, mesh) if spec_of(model).partition_rules else model.apply


def make_runner(mode: str, mesh: Mesh, model: nn.Module, abstract_state, train_step: Callable,
                eval_step: Callable, global_batch: int) -> Runner:
    """Builds the runner for `mode` ('jit' or 'pmap') over `mesh`.

    `train_step(state, batch, rng, prep, axis_name=None)` and `eval_step(state, batch, prep,
    crops)` are the pure steps; `prep` (the preprocessor: image spec and dataset statistics)
    is replicated. The canonical state layout (what checkpoints hold) is `tree_shardings`'.
    """
    check_mesh(tuple(mesh.shape.values()), mesh.shape["model"], mesh.size, mode, jax.process_count())
    rules = spec_of(model).partition_rules
    if rules and mode == "pmap":
        raise MeshError("the two-tower model runs with {0} (explicit sharding)", Set("parallel", "jit"),
                        key="parallel", value="pmap")
    check_batch(global_batch, mesh.shape["data"])
    state_sh = tree_shardings(abstract_state, mesh, rules)
    replicated = NamedSharding(mesh, P())
    batch_sh = NamedSharding(mesh, P("data"))
    evals = {crops: jit(functools.partial(eval_step, crops=crops), in_shardings=(state_sh, batch_sh, replicated),
                            out_shardings=replicated) for crops in CROPS}

    def eval_fn(state, batch, prep, crops="centre"):
        return evals[crops](state, batch, prep)

    canonical = functools.partial(jax.device_put, device=state_sh)
    if mode == "jit":
        step = jit(train_step, in_shardings=(state_sh, batch_sh, replicated, replicated),
                       out_shardings=(state_sh, replicated), donate_argnums=(0,))
        return Runner(mesh, mode, state_sh, canonical, canonical, lambda b: place_batch(b, mesh),
                      step, eval_fn)
    devices = mesh.devices.reshape(-1)
    n = len(devices)
    pstep = jax.pmap(functools.partial(train_step, axis_name="data"), axis_name="data", in_axes=(0, 0, 0, None),
                     devices=list(devices), donate_argnums=(0,))

    def shard(batch):
        return {k: np.asarray(v).reshape(n, -1, *np.shape(v)[1:]) for k, v in batch.items()}

    def pmap_step(state, batch, rng, prep):
        state, stats = pstep(state, batch, jnp.broadcast_to(rng, (n, *rng.shape)), prep)
        # Finish on every device before anything else is queued: a CPU all-reduce of this
        # program next to one of another program (evaluation) can wait on each other forever.
        jax.block_until_ready(state)
        return state, jax.tree.map(first_replica, stats)

    def replicate(state):
        return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), state)

    def first_replica(x):  # device 0's buffer: no multi-device program to index a pmap array
        if not isinstance(x, jax.Array):  # still the host copy made by place_state
            return np.asarray(x)[0]
        return np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:])

    return Runner(mesh, mode, state_sh, place_state=replicate,
                  host_state=lambda s: canonical(jax.tree.map(first_replica, s)),
                  place=shard, step=pmap_step, eval=eval_fn)
