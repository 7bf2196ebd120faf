"""SIGTERM / SIGINT at any phase of the loop: the run saves, stops, and resumes exactly."""

import os
import signal

import chex
import pytest

from cnn_jax import builders, train
from cnn_jax.checkpoint import Checkpointer
from helpers import tiny_config

STEPS = 6


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    return workdir, train.train_and_evaluate(tiny_config(data_dir, num_train_steps=STEPS), workdir)


def _signal_once(monkeypatch, owner, name, signum):
    """Wraps owner.name so that its first call ends with the process signalling itself."""
    original, fired = getattr(owner, name), []

    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        if not fired:
            fired.append(True)
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(owner, name, wrapped)


PHASES = {  # where the signal lands: (object, method)
    "inside_a_step": (builders, "train_step"),  # while the first step is traced
    "evaluation": (train.Run, "evaluate"),
    "plateau_update": (train, "_after_eval"),
    "checkpoint_save": (Checkpointer, "save"),
}


# SIGTERM in every phase; SIGINT takes the same path, and one phase checks it. The default run
# covers a step and an evaluation; the other phases are slow (about a minute each).
CASES = [pytest.param(phase, signum, id=f"{phase}-{signal.Signals(signum).name}",
                      marks=() if (phase, signum) in (("inside_a_step", signal.SIGTERM), ("evaluation", signal.SIGINT))
                      else pytest.mark.slow)
         for phase, signum in [(p, signal.SIGTERM) for p in sorted(PHASES)] + [("evaluation", signal.SIGINT)]]


@pytest.mark.parametrize("phase,signum", CASES)
def test_a_signal_in_any_phase_saves_and_the_resumed_run_is_identical(data_dir, tmp_path, monkeypatch,
                                                                      straight, phase, signum):
    owner, name = PHASES[phase]
    with monkeypatch.context() as patch:
        _signal_once(patch, owner, name, signum)
        with pytest.raises(train.RunStopped) as stopped:
            train.train_and_evaluate(tiny_config(data_dir, num_train_steps=STEPS), tmp_path)
    assert stopped.value.signum == signum
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] < STEPS
    result = train.train_and_evaluate(tiny_config(data_dir, num_train_steps=STEPS), tmp_path)
    straight_dir, straight_result = straight
    assert result["step"] == STEPS
    # Everything: parameters, momentum, the plateau schedule's state and the learning-rate scale
    chex.assert_trees_all_equal(restored_state(straight_dir), restored_state(tmp_path))  # bit for bit on CPU
    assert result["top1_error"] == pytest.approx(straight_result["top1_error"])
    assert eval_log(straight_dir) == eval_log(tmp_path)


def restored_state(workdir):
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(STEPS) / "state")


def eval_log(workdir):
    import json

    entries = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: round(e["eval/top1_error"], 6) for e in entries if "eval/top1_error" in e}
