"""The training loop of `train_step`'s docstring runs as written: a researcher's own loop."""

import doctest

from cnn_jax import train


def test_the_docstring_loop_trains():
    finder = doctest.DocTestFinder()
    [example] = finder.find(train.train_step, "train_step", globs={})
    result = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS).run(example)
    assert example.examples and result.failed == 0 and result.attempted == len(example.examples)
