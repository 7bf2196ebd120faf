"""Counting rules against hand computations and the lecture's AlexNet totals."""

import flax.linen as nn
import pytest

from cnn_jax import get_model, summary
from cnn_jax.layers import Conv


class Tiny(nn.Module):
    input_shape = (8, 8, 2)

    @nn.compact
    def __call__(self, x, *, train):
        x = Conv(4, (3, 3), padding=1, name="conv")(x)
        x = Conv(4, (3, 3), padding=1, feature_group_count=2, use_bias=False, name="grouped")(x)
        return nn.Dense(3, name="fc")(x.reshape(x.shape[0], -1))


def test_hand_computed_counts():
    rows = {r.path: r for r in summary.layer_table(Tiny())}
    # conv: 8*8*4 outputs, each 3*3*2 multiply-adds + 1 bias add; 3*3*2*4 + 4 parameters.
    assert rows["conv"].macs == 8 * 8 * 4 * 18 and rows["conv"].bias_adds == 256
    assert rows["conv"].params == 76 and rows["conv"].kind == "conv"
    # grouped: each output sees 3*3*(4/2) inputs.
    assert rows["grouped"].macs == 8 * 8 * 4 * 18 and rows["grouped"].params == 72
    assert rows["fc"].macs == 256 * 3 and rows["fc"].params == 256 * 3 + 3
    t = summary.totals(list(rows.values()))
    assert t.params == 76 + 72 + 771
    assert t.macs == 4608 + 256 + 4608 + 768 + 3
    assert summary.totals(list(rows.values()), fc_biases=False).params == 76 + 72 + 768


def test_alexnet_reproduces_the_lecture_table():
    rows = summary.layer_table(get_model("alexnet"))
    assert [r.output_shape[0] for r in rows if r.path.startswith(("conv", "pool"))] == \
        [55, 27, 27, 13, 13, 13, 13, 6]
    full, lecture = summary.totals(rows), summary.totals(rows, fc_biases=False)
    assert full.params == 62_378_344
    assert lecture.params == 62_369_152
    assert lecture.macs == 1_135_906_176
    assert 0.055 < full.conv_params / full.params < 0.065  # conv ~ 6% of parameters
    assert 0.94 < full.conv_macs / full.macs < 0.96  # ... and ~ 95% of compute


def test_cli_prints_the_table(capsys):
    assert summary.main(["alexnet"]) == 0
    out = capsys.readouterr().out
    assert "62,369,152" in out and "1,135,906,176" in out and "fc8" in out


@pytest.mark.parametrize("argv,needle", [(["alexnett"], "unknown model"),
                                         (["alexnet", "--size", "224"], "227"),
                                         (["alexnet", "--set", "num_class=3"], "no field")])
def test_cli_errors_are_one_line(capsys, argv, needle):
    assert summary.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
