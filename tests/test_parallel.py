"""Data parallelism (jit, pmap) and AlexNet's two towers on 8 simulated CPU devices."""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cnn_jax import comms, get_model, optim, parallel, train
from cnn_jax.data import augment

SIZE, BATCH, STEPS = 67, 16, 3
NARROW = 256  # fc6/fc7 units: what these tests compare does not depend on the layers' width
# Sums run in another order across shards. One step agrees elementwise to ~1e-8 (TOL). Over
# several steps a pre-activation at a ReLU or max-pool decision boundary can flip and move
# that unit's gradient (seen: one conv5 bias of 256 off by 3e-5, the rest within 1e-10), so
# multi-step runs are held to MAX_ABS: 5e-5, about 0.5% of a typical weight (~1e-2).
TOL = dict(rtol=1e-5, atol=1e-6)
MAX_ABS = 5e-5


def assert_params_close(actual, expected):
    chex.assert_trees_all_close(actual, expected, rtol=0, atol=MAX_ABS)


@pytest.fixture(autouse=True)
def eight_devices():
    if jax.device_count() != 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)")


# Stored squares the size of the input, no mirror, no colour noise: the preprocessor only
# normalises, so every layout sees the same inputs.
PREP = augment.make_preprocessor(np.full((SIZE, SIZE, 3), 128.0), np.zeros(3), np.eye(3), input_size=SIZE,
                                 flip=False, pca_noise=0.0)


def batches(n=STEPS, num_classes=10):
    rng = np.random.default_rng(0)
    return [{"image": rng.integers(0, 256, size=(BATCH, SIZE, SIZE, 3), dtype=np.uint8),
             "label": rng.integers(0, num_classes, BATCH).astype(np.int32)} for _ in range(n)]


def fresh_state(model, apply_fn=None):
    state = train.create_train_state(jax.random.key(0), model, optim.make_optimizer("paper_sgd", 0.01),
                                     (SIZE, SIZE, 3))
    return state.replace(apply_fn=apply_fn or model.apply)


def single_device_params(model, steps=STEPS):
    step = jax.jit(train.train_step, donate_argnums=(0,))
    state = fresh_state(model)
    for batch in batches(steps):
        state, _ = step(state, batch, jax.random.key(1), PREP)
    return state.params


def runner_params(model, mode, mesh_shape, steps=STEPS):
    mesh = parallel.make_mesh(mesh_shape)
    state = fresh_state(model, parallel.apply_fn(model, mesh))
    runner = parallel.make_runner(mode, mesh, model, state, train.train_step, train.eval_step, BATCH)
    state = runner.place_state(jax.device_put(state, runner.state_shardings))
    for batch in batches(steps):
        state, stats = runner.step(state, runner.place(batch), jax.random.key(1), PREP)
    assert np.isfinite(stats["loss"])
    return runner.host_state(state).params


def test_mesh_and_batch_errors_name_both_numbers():
    with pytest.raises(parallel.MeshError, match=r"config.mesh=\(4, 4\): needs 16 devices but 8"):
        parallel.make_mesh((4, 4))
    with pytest.raises(parallel.MeshError, match=r"config.batch_size=12: must be a multiple of 8 \(the 'data' mesh "
                                                 r"axis has 8 device\(s\)\): use config.batch_size=8 or "
                                                 r"config.batch_size=16$"):
        parallel.check_batch(12, parallel.make_mesh().shape["data"])
    with pytest.raises(ValueError, match="unknown parallel mode"):
        parallel.make_runner("gspmd", parallel.make_mesh(), None, None, None, None, 8)


def test_jit_data_parallel_equals_one_device():
    model = get_model("alexnet", num_classes=10, init_scheme="lecun", dropout_rate=0.0, fc_units=NARROW)
    assert_params_close(runner_params(model, "jit", (8, 1)), single_device_params(model))


def test_jit_dropout_masks_equal_one_device():
    # Masks come from a partitionable PRNG: one step with dropout matches elementwise.
    model = get_model("alexnet", num_classes=10, init_scheme="lecun", fc_units=NARROW)
    chex.assert_trees_all_close(runner_params(model, "jit", (8, 1), steps=1),
                                single_device_params(model, steps=1), **TOL)


def test_jit_data_parallel_batch_norm_equals_one_device():
    model = get_model("resnet_tiny", num_classes=10)  # statistics over the global batch
    assert_params_close(runner_params(model, "jit", (8, 1)), single_device_params(model))


def test_pmap_equals_one_device_without_dropout():
    # Under pmap each device draws its own masks, so compare without dropout.
    model = get_model("alexnet", num_classes=10, init_scheme="lecun", dropout_rate=0.0, fc_units=NARROW)
    assert_params_close(runner_params(model, "pmap", (8, 1)), single_device_params(model))


# ---- two towers ---------------------------------------------------------------------------

def towers(dropout_rate=0.0):
    return get_model("alexnet_2tower", num_classes=10, init_scheme="lecun", dropout_rate=dropout_rate)


def test_two_tower_parameter_count_and_layout():
    from cnn_jax.summary import layer_table, totals

    assert totals(layer_table(get_model("alexnet_2tower"))).params == 60_965_224
    model = towers()
    mesh = parallel.make_mesh((4, 2))
    state = fresh_state(model)
    shardings = parallel.tree_shardings(state, mesh, model.spec.partition_rules)
    assert shardings.params["conv2"]["kernel"].spec == P("model")
    assert shardings.opt_state.inner_state[1].velocity["fc6"]["kernel"].spec == P("model")
    assert shardings.step.spec == P()
    placed = jax.device_put(state.params, shardings.params)
    # each device holds one tower: half of conv1's 96 kernels
    assert placed["conv1"]["kernel"].addressable_shards[0].data.shape == (1, 11, 11, 3, 48)


def test_two_towers_sharded_equal_unsharded():
    model = towers()
    mesh = parallel.make_mesh((4, 2))
    x = PREP.evaluate(jnp.asarray(batches(1)[0]["image"]))
    params = fresh_state(model).params
    expected = model.apply({"params": params}, x, train=False)
    apply = parallel.towers_apply(model, mesh)
    sharded = jax.device_put({"params": params}, parallel.tree_shardings({"params": params}, mesh, model.spec.partition_rules))
    chex.assert_trees_all_close(jax.jit(lambda v, x: apply(v, x, train=False))(sharded, x), expected, **TOL)
    # and after three training steps on a (4, 2) mesh
    assert_params_close(runner_params(model, "jit", (4, 2)), single_device_params(model))


def test_two_towers_need_a_model_axis_of_two():
    with pytest.raises(ValueError, match=r"'model' mesh axis of 2, not 1"):
        parallel.towers_apply(towers(), parallel.make_mesh((8, 1)))


@pytest.fixture(scope="module")
def tower_step_hlo():
    model = towers(dropout_rate=0.5)
    mesh = parallel.make_mesh((4, 2))
    state = fresh_state(model, parallel.apply_fn(model, mesh))
    runner = parallel.make_runner("jit", mesh, model, state, train.train_step, train.eval_step, BATCH)
    state = jax.device_put(state, runner.state_shardings)
    lowered = runner.step.lower(state, runner.place(batches(1)[0]), jax.random.key(0), PREP)
    return mesh, comms.collectives(lowered.compile().as_text())


def test_towers_communicate_only_where_the_paper_says(tower_step_hlo):
    mesh, ops = tower_step_hlo
    cross = [op for op in ops if comms.along(op, mesh, "model")]
    layers = {comms.scope_of(op) for op in cross}
    assert layers == {"conv3", "fc6", "fc7", "fc8", "logits"}  # and none unscoped (None)
    assert not [op for op in cross if any(f"conv{i}" in op.op_name for i in (1, 2, 4, 5))]
    # forward all-gathers and their backward reduce-scatters, at each gathering layer
    for layer in ("conv3", "fc6", "fc7", "fc8"):
        kinds = sorted(op.kind for op in cross if comms.scope_of(op) == layer)
        assert kinds == ["all-gather", "reduce-scatter"], layer
    # the gradient all-reduce of data parallelism runs along 'data' only
    assert any(op.kind == "all-reduce" and comms.along(op, mesh, "data") for op in ops)
    assert all(comms.along(op, mesh, "model") or comms.along(op, mesh, "data") for op in ops)


def test_tower_traffic_matches_a_hand_count(tower_step_hlo):
    mesh, ops = tower_step_hlo
    report = comms.tower_report(ops, mesh)
    b = BATCH // mesh.shape["data"]  # examples per device
    # At 67x67: pool2 is 3x3x128 per tower, pool5 1x1x128; fc6, fc7 give 2048 per tower.
    # Each device sends its half forward (all-gather) and the peer's half of the gradient
    # back (reduce-scatter); the logits are one psum of the (b, 10) matrix.
    halves = {"conv3": 3 * 3 * 128, "fc6": 1 * 1 * 128, "fc7": 2048, "fc8": 2048}
    for layer, floats in halves.items():
        assert report[layer] == 2 * b * floats * 4, layer
    assert report["logits"] == b * 10 * 4
    print({k: int(v) for k, v in report.items()}, "bytes per device per step")


# One all-gather line as XLA prints it, with each way of writing its replica groups.
HLO_LINE = ('%ag = f32[2,4]{1,0} all-gather(%x), channel_id=1, replica_groups=GROUPS, dimensions={0}, '
            'use_global_device_ids=true, metadata={op_name="jit(f)/shard_map/tower_gather_fc6/all_gather"}')
PAIRS, COLUMNS = ((0, 1), (2, 3), (4, 5), (6, 7)), ((0, 2, 4, 6), (1, 3, 5, 7))


@pytest.mark.parametrize("groups, expected", [
    ("{{0,1},{2,3},{4,5},{6,7}}", PAIRS),  # listed (jax 0.10)
    ("[4,2]<=[8]", PAIRS),  # iota
    ("[2,4]<=[4,2]T(1,0)", COLUMNS),
    ("mesh['data'=4,'model'=2] {'model'}", PAIRS),  # mesh axes (jax 0.12)
    ("mesh['data'=4,'model'=2] {'data'}", COLUMNS),
    ("mesh['data'=4,'model'=2] {'data','model'}", ((0, 1, 2, 3, 4, 5, 6, 7),)),
    ("mesh[data=4,model=2] {model}", PAIRS),
    ("mesh['a'=8] {'a':(1)2}", ((0, 4), (1, 5), (2, 6), (3, 7))),  # sub-axis: the major factor 2
    ("mesh['a'=8] {'a':(4)2}", PAIRS),  # the minor factor 2
    ("mesh['a'=8] {'a':(1)2,'a':(4)2}", ((0, 1, 4, 5), (2, 3, 6, 7))),
    ("mesh['data'=2,'model'=2], device_ids=(0,2,1,3) {'model'}", ((0, 2), (1, 3))),
    ("mesh['data'=2,'model'=2], device_ids=([2,2]<=[2,2]T(1,0)) {'model'}", ((0, 2), (1, 3))),
])
def test_collective_parser_reads_every_replica_group_form(groups, expected):
    (op,) = comms.collectives(HLO_LINE.replace("GROUPS", groups))
    assert (op.kind, op.result_bytes, op.groups) == ("all-gather", 32, expected)
    assert comms.scope_of(op) == "fc6"


def test_collectives_are_placed_on_the_mesh_by_position_not_device_id():
    mesh = jax.sharding.Mesh(np.array(jax.devices())[[0, 2, 4, 6, 1, 3, 5, 7]].reshape(4, 2), ("data", "model"))
    psum = jax.shard_map(lambda x: jax.lax.psum(x, "model"), mesh=mesh, in_specs=P("data", "model"),
                         out_specs=P("data"))
    (op,) = comms.collectives(jax.jit(psum).lower(jnp.ones((8, 4))).compile().as_text())
    assert op.kind == "all-reduce" and comms.along(op, mesh, "model") and not comms.along(op, mesh, "data")


def test_the_launch_reads_the_environment_or_says_what_is_wrong_in_it():
    from cnn_jax.config import ConfigError

    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node1", "SLURM_NTASKS": "4", "SLURM_PROCID": "2",
             "SLURM_LOCALID": "0"}
    assert parallel.detected_cluster(slurm) == ("SLURM", 4)
    assert parallel.launch("detect", environ=slurm) == ("auto", 4, "")
    assert parallel.launch("detect", environ={**slurm, "SLURM_NTASKS": "1"}) == ("single", 1, "")
    assert parallel.launch("manual", environ=slurm) == ("single", 1, "")
    assert parallel.launch("detect", 2, "h:1", environ={}) == ("manual", 2, "h:1")
    with pytest.raises(ConfigError, match=r"JAX_NUM_PROCESSES='two' is not a whole number"):
        parallel.launch("detect", environ={"JAX_NUM_PROCESSES": "two"})
    with pytest.raises(ConfigError, match=r"config.coordinator_address=HOST:PORT"):
        parallel.launch("detect", 2, environ={})
    for address in ("myhost", "myhost:", "myhost:port"):  # a port to connect to, or one line saying so
        with pytest.raises(ConfigError, match=rf"^config.coordinator_address={address}: must be HOST:PORT"):
            parallel.launch("detect", 2, environ={"JAX_COORDINATOR_ADDRESS": address})
