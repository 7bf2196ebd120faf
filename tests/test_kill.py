"""SIGKILL at random moments, inside checkpoint writes too: the resumed run ends bit-identical
to an uninterrupted one (`tools/kill_resume.py`; 20 kills under `pytest -m slow`)."""

import json

import pytest

from cnn_jax.writers import _drop_unfinished_line
from tools import kill_resume


@pytest.mark.parametrize("content,want", [
    (b'{"a": 1}\n{"b', b'{"a": 1}\n'),  # killed mid-line: the fragment goes
    (b'{"a": 1}\n', b'{"a": 1}\n'),  # complete: untouched
    (b'{"a', b""),
    (b'{"a": 1}\n' + b"x" * 50, b'{"a": 1}\n'),  # a fragment longer than the chunk read
    (b"", b""),
])
def test_a_fragment_left_by_a_killed_writer_is_dropped(tmp_path, content, want):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(content)
    _drop_unfinished_line(path, chunk=7)
    assert path.read_bytes() == want


def _check(tmp_path, kills):
    made, problems = kill_resume.run(kills, seed=0, root=tmp_path, report=lambda line: None)
    assert all(k.killed for k in made), made
    assert any(k.unfinished for k in made), "no kill landed inside a checkpoint write"
    assert problems == []
    return made


@pytest.mark.slow
def test_three_kills_then_resume_end_identical_to_an_uninterrupted_run(tmp_path):
    _check(tmp_path, kills=3)
    # the comparison can fail: one changed loss in the killed run's log is reported
    log = tmp_path / "killed" / "metrics.jsonl"
    lines = log.read_text().splitlines()
    entry = json.loads(lines[5])
    entry["train/loss"] += 1e-6
    log.write_text("\n".join([*lines[:5], json.dumps(entry), *lines[6:]]) + "\n")
    assert [p for p in kill_resume.compare(tmp_path / "uninterrupted", tmp_path / "killed")
            if "train/loss" in p] != []


@pytest.mark.slow
def test_twenty_kills_then_resume_end_identical_to_an_uninterrupted_run(tmp_path):
    made = _check(tmp_path, kills=20)
    assert sum(bool(k.unfinished) for k in made) >= 3  # several writes cut short, not one by luck
