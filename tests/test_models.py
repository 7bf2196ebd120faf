"""Model zoo: published parameter counts, paper shapes, train/eval behaviour, retracing."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import get_model, summary
from cnn_jax.models import googlenet, lenet


def rows_of(name, shape=None, **overrides):
    return {r.path: r for r in summary.layer_table(get_model(name, **overrides), shape)}


def init(name, shape, **overrides):
    model = get_model(name, **overrides)
    return model, jax.jit(lambda k: model.init(k, jnp.zeros((2, *shape)), train=False))(jax.random.key(0))


# ---- LeNet-5 ------------------------------------------------------------------------------

def test_lenet5_counts_and_shapes_match_the_paper():
    rows = rows_of("lenet5")
    expected = {"C1": ((28, 28, 6), 156), "S2": ((14, 14, 6), 12), "C3": ((10, 10, 16), 1516),
                "S4": ((5, 5, 16), 32), "C5": ((1, 1, 120), 48_120), "F6": ((84,), 10_164),
                "output": ((10,), 0)}
    for name, (shape, params) in expected.items():
        assert (rows[name].output_shape, rows[name].params) == (shape, params), name
    assert summary.totals(list(rows.values())).params == 60_000


def test_lenet5_c3_connects_only_the_table():
    """Perturbing S2 map i changes exactly the C3 maps whose table entry contains i."""
    model = lenet.PartialConv()
    x = jax.random.normal(jax.random.key(0), (1, 14, 14, 6))
    params = model.init(jax.random.key(1), x)
    base = model.apply(params, x)
    for i in range(6):
        changed = np.abs(model.apply(params, x.at[..., i].add(1.0)) - base).max(axis=(0, 1, 2)) > 0
        np.testing.assert_array_equal(changed, [i in maps for maps in lenet.C3_TABLE], err_msg=f"map {i}")


def test_lenet5_rbf_and_squashing():
    protos = lenet.rbf_prototypes()
    chex.assert_shape(protos, (10, 84))
    assert set(np.unique(protos)) == {-1.0, 1.0}
    assert len({p.tobytes() for p in protos}) == 10  # ten distinct bitmaps
    np.testing.assert_allclose(lenet.squash(jnp.array([1.0, -1.0])), [1.0, -1.0], atol=1e-4)
    x = jax.random.normal(jax.random.key(0), (3, 84))
    penalties = ((np.asarray(x)[:, None, :] - protos[None]) ** 2).sum(-1)
    np.testing.assert_allclose(lenet.EuclideanRBF().apply({}, x), penalties, rtol=1e-5)


def test_lenet5_refuses_other_class_counts():
    with pytest.raises(ValueError, match="lenet5_modern"):
        init("lenet5", (32, 32, 1), num_classes=5)


def test_lenet5_modern_counts():
    # C1 156, C3 full 5*5*6*16 + 16, C5 48,120, F6 10,164, output 84*10 + 10.
    assert summary.totals(list(rows_of("lenet5_modern").values())).params == 156 + 2416 + 48_120 + 10_164 + 850


# ---- VGG ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,params", [("vgg11", 132_863_336), ("vgg13", 133_047_848),
                                         ("vgg16", 138_357_544), ("vgg19", 143_667_240)])
def test_vgg_parameter_counts(name, params):
    rows = rows_of(name)
    assert summary.totals(list(rows.values())).params == params
    assert rows["pool5"].output_shape == (7, 7, 512)


def test_vgg_batch_norm_adds_statistics():
    rows = rows_of("vgg11_bn")
    assert "bn1_1" in rows and rows["bn1_1"].params == 2 * 64 and rows["bn1_1"].state == 2 * 64


# ---- GoogLeNet ----------------------------------------------------------------------------

def test_googlenet_shapes_compute_and_module_counts():
    rows = rows_of("googlenet")
    shapes = [rows[p].output_shape[0] for p in ("pool1", "pool2", "pool3", "pool4")]
    assert shapes == [56, 28, 14, 7]
    assert rows["inception5b/b4_proj"].output_shape == (7, 7, 128)
    assert 1.45e9 < summary.totals(list(rows.values())).macs < 1.65e9  # the paper: ~1.5 G
    # Inception 3a by hand from table 1 (192 input channels): weights + biases of each branch.
    b1, r3, b3, r5, b5, proj = googlenet.MODULES["3a"]
    hand = (192 * b1 + b1) + (192 * r3 + r3) + (9 * r3 * b3 + b3) + (192 * r5 + r5) + (25 * r5 * b5 + b5) + (192 * proj + proj)
    assert sum(r.params for p, r in rows.items() if p.startswith("inception3a/")) == hand


@pytest.mark.slow  # 1 1/2 minutes of compiling
def test_googlenet_aux_heads_in_training_only():
    model, variables = init("googlenet", (128, 128, 3), num_classes=5)
    assert {"aux1", "aux2"} <= set(variables["params"])
    x = jax.random.normal(jax.random.key(1), (2, 128, 128, 3))
    train_out = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert set(train_out) == {"logits", "aux_logits"} and len(train_out["aux_logits"]) == 2
    for logits in (train_out["logits"], *train_out["aux_logits"]):
        chex.assert_shape(logits, (2, 5))
    chex.assert_shape(model.apply(variables, x, train=False), (2, 5))


def test_one_by_one_reduction_costs():
    direct = summary.totals(summary.layer_table(googlenet.ReductionExample(0))).macs
    reduced = summary.totals(summary.layer_table(googlenet.ReductionExample(16))).macs
    assert direct == 28 * 28 * 32 * (5 * 5 * 192)  # ~120 M
    assert reduced == 28 * 28 * 16 * 192 + 28 * 28 * 32 * (5 * 5 * 16)  # ~12.4 M
    assert "120,422,400" in summary.reductions_report() and "12,443,648" in summary.reductions_report()


# ---- ResNet -------------------------------------------------------------------------------

@pytest.mark.parametrize("name,params", [("resnet18", 11_689_512), ("resnet34", 21_797_672),
                                         ("resnet50", 25_557_032), ("resnet101", 44_549_160),
                                         ("resnet152", 60_192_808)])
def test_resnet_parameter_counts_option_b(name, params):
    assert summary.totals(list(rows_of(name).values())).params == params


def test_resnet_projections_only_where_dimensions_change():
    b = [p for p in rows_of("resnet18") if "proj_conv" in p]
    assert b == ["stage2_block1/proj_conv", "stage3_block1/proj_conv", "stage4_block1/proj_conv"]
    assert not [p for p in rows_of("resnet18", shortcut="A") if "proj" in p]


def test_resnet20_cifar_count_by_hand():
    def conv_bn(cin, cout):
        return 9 * cin * cout + 2 * cout
    stem = conv_bn(3, 16)
    stage1 = 6 * conv_bn(16, 16)
    stage2 = conv_bn(16, 32) + 5 * conv_bn(32, 32)
    stage3 = conv_bn(32, 64) + 5 * conv_bn(64, 64)
    rows = rows_of("resnet20_cifar", num_classes=10)
    assert summary.totals(list(rows.values())).params == stem + stage1 + stage2 + stage3 + 64 * 10 + 10 == 269_722


def test_resnet_batch_norm_train_and_eval():
    model, variables = init("resnet_tiny", (32, 32, 3), num_classes=3)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3)) * 3 + 1
    out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    old, new = variables["batch_stats"]["bn1"], updates["batch_stats"]["bn1"]
    assert not np.allclose(old["mean"], new["mean"])  # training moves the running statistics
    # Evaluation uses them: an example's logits do not depend on the rest of the batch.
    variables = {**variables, **updates}
    chex.assert_trees_all_close(model.apply(variables, x, train=False)[:1],
                                model.apply(variables, x[:1], train=False), rtol=1e-4, atol=1e-5)
    assert not np.allclose(model.apply(variables, x, train=True, mutable=["batch_stats"])[0][:1],
                           model.apply(variables, x[:1], train=True, mutable=["batch_stats"])[0], atol=1e-3)


# ---- AlexNet-BN ---------------------------------------------------------------------------

@pytest.mark.parametrize("kernel,keras_total", [(5, 28_883_201), (11, 28_096_769)])
def test_alexnet_bn_keras_counts(kernel, keras_total):
    t = summary.totals(list(rows_of("alexnet_bn", conv2_kernel=kernel).values()))
    assert t.params + t.state == keras_total


# ---- every model --------------------------------------------------------------------------

SMALL = {"lenet5": (32, 32, 1), "lenet5_modern": (32, 32, 1), "vgg11": (32, 32, 3),
         "googlenet": (128, 128, 3), "resnet_tiny": (32, 32, 3), "resnet20_cifar": (32, 32, 3),
         "alexnet_bn": (224, 224, 3)}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "googlenet" else n
                                  for n in sorted(SMALL)])
def test_forward_is_deterministic_and_traces_once(name):
    chex.clear_trace_counter()  # the counter is per function definition, shared by parameters
    model, variables = init(name, SMALL[name], num_classes=10)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(v, x):
        return model.apply(v, x, train=False)

    outs = []
    for seed in range(2):
        x = jax.random.normal(jax.random.key(seed), (2, *SMALL[name]))
        outs.append(forward(variables, x))
        chex.assert_shape(outs[-1], (2, 10))
        chex.assert_tree_all_finite(outs[-1])
    assert not np.allclose(outs[0], outs[1])  # the output depends on the input
    # compiled equals eager, and in evaluation each example's logits are its own (no batch coupling)
    chex.assert_trees_all_close(outs[-1], model.apply(variables, x, train=False), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(model.apply(variables, x[1:], train=False)[0], outs[-1][1], rtol=1e-5, atol=1e-5)


def test_summary_cli_works_for_every_registered_model(capsys):
    from cnn_jax import list_models

    for name in list_models():
        assert summary.main([name]) == 0, name
    assert "resnet152" in capsys.readouterr().out
