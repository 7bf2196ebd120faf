"""python -m experiments.alexnet: the paper's AlexNet (summary table until training lands)."""

import sys

from cnn_jax import summary

if __name__ == "__main__":
    sys.exit(summary.main(["alexnet"]))
