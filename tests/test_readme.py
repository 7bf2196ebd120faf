"""The README opens with the two commands, and CI runs the second one verbatim."""

import json
import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())[:2]


def test_readme_opens_with_two_commands():
    main, tests = readme_commands()
    assert main.endswith("python -m experiments.alexnet")
    assert tests.endswith("python -m pytest")


def test_ci_runs_the_readme_test_command():
    _, tests = readme_commands()
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def test_gradient_table_is_rendered_from_its_json():
    from experiments.reproductions import rewrite
    from tools import gradient_report

    data = json.loads((ROOT / "docs" / "gradients.json").read_text())
    assert set(data["results"]) == set(gradient_report.tg.SPECS)  # every family measured ...
    for name, entry in data["results"].items():  # ... on the batch and verdict the tests use today
        today = gradient_report.batch_record(name)
        assert {k: entry.get(k) for k in today} == today, f"{name}: rerun python -m tools.gradient_report"
    readme = ROOT / "README.md"
    assert rewrite(readme, gradient_report.render(data), gradient_report.BEGIN, gradient_report.END) == readme.read_text()


def test_default_runs_table_is_rendered_from_its_json():
    """The default runs' numbers come from `python -m tools.default_runs`, never typed."""
    from experiments.reproductions import rewrite
    from tools import default_runs

    data = json.loads((ROOT / "docs" / "default_runs.json").read_text())
    assert list(data["results"]) == list(default_runs.EXPERIMENTS)  # every default experiment ...
    assert all(len(e["runs"]) == default_runs.SEEDS for e in data["results"].values())  # ... at every seed
    compared = [(o["machine"], e) for o in default_runs.others(data) for e in o["results"].items()]
    for where, (name, entry) in [("the table", e) for e in data["results"].items()] + compared:
        today = default_runs.describe(name)  # ... as the experiment trains today, here and on the machines
        recorded = {k: today[k] for k in entry["config"]}  # compared (an older entry may lack a later key)
        assert recorded == entry["config"], f"{name} in {where}: rerun python -m tools.default_runs"
    entries = [*data["results"].values(), *(e for _, (_, e) in compared)]
    assert all(sorted(r["seed"] for r in e["runs"]) == list(range(default_runs.SEEDS)) for e in entries)
    readme = ROOT / "README.md"
    assert rewrite(readme, default_runs.render(data), default_runs.BEGIN, default_runs.END) == readme.read_text()


def test_default_runs_keep_only_comparable_results_elsewhere():
    """A rerun on another machine adds the old table to the comparison (and keeps the machines
    it held, but this one), even when stopped early; rerunning some experiments here with
    other results (their code changed: here a run repeats digit for digit) drops theirs."""
    from tools import default_runs

    here, there = default_runs.machine(), "another machine, 2099-01-01"
    results = {n: {"runs": [n]} for n in default_runs.EXPERIMENTS}
    old_there = {"machine": there, "results": results}
    assert default_runs.elsewhere(old_there, list(default_runs.EXPERIMENTS)) == [old_there]
    assert default_runs.elsewhere(old_there, ["alexnet"]) == [old_there]  # a rerun stopped after its first
    third, this_one = ({"machine": m, "results": {"vgg": {"runs": ["vgg"]}}} for m in ("a third machine, 2099-01-02", here))
    assert default_runs.elsewhere({**old_there, "elsewhere": [third, this_one]}, ["alexnet"]) == [old_there, third]
    stopped = {"machine": here, "results": {"alexnet": {"runs": ["alexnet here"]}}, "elsewhere": [old_there]}
    assert default_runs.elsewhere(stopped, list(default_runs.EXPERIMENTS), {"alexnet"}) == [old_there]  # resumed
    old_here = {"machine": here, "results": results, "elsewhere": old_there}  # an older file's one machine
    [kept] = default_runs.elsewhere(old_here, ["resnet", "vgg"])
    assert kept["machine"] == there and set(kept["results"]) == {"alexnet", "lenet", "googlenet"}
    assert default_runs.elsewhere(old_here, list(default_runs.EXPERIMENTS)) == []
    assert default_runs.elsewhere({**old_here, "elsewhere": [old_there, third]}, ["vgg"]) == [
        {"machine": there, "results": {n: r for n, r in results.items() if n != "vgg"}}]


def record(machine: str, top1: list[float], names=("lenet",), **fields) -> str:
    """A default runs file: `names` each with LeNet-5's columns and runs ending at `top1`."""
    config = {"model": "lenet5", "input": 32, "channels": 1, "epochs": 10.0, "batch": 32}
    return json.dumps({"machine": machine, "results": {n: {"config": config, "runs": runs_of(top1), **fields}
                                                       for n in names}})


def runs_of(top1: list[float], seconds: float = 9.0) -> list[dict]:
    """Seeds 0, 1, ...'s records as `tools.default_runs.run_one` writes them, each final error
    also its run's best evaluation."""
    return [{"seed": s, "seconds": seconds, "top1_error": e, "top5_error": 0.0, "best_top1_error": e}
            for s, e in enumerate(top1)]


def test_a_rerun_that_repeats_its_results_keeps_them_elsewhere():
    """Rerun here with the same results, digit for digit, an experiment's code did not change:
    its results on other machines still compare."""
    from tools import default_runs

    there = {"machine": "another machine, 2099-01-01", "results": {"alexnet": {"runs": runs_of([0.05, 0.04])}}}
    old = {"machine": default_runs.machine(), "results": {"alexnet": {"runs": runs_of([0.05, 0.06])}}, "elsewhere": there}
    again, other = runs_of([0.05, 0.06]), runs_of([0.05, 0.0633])
    assert default_runs.repeats(old, "alexnet", [{**r, "seconds": 1.0} for r in reversed(again)])
    assert not default_runs.repeats(old, "alexnet", other) and not default_runs.repeats(old, "lenet", again)
    assert not default_runs.repeats({**old, "machine": there["machine"]}, "alexnet", again)  # measured elsewhere
    assert default_runs.elsewhere(old, ["alexnet"], {"alexnet"}) == [there]
    assert default_runs.elsewhere(old, ["alexnet"], set()) == []


def test_another_machines_runs_are_compared_with_the_tables_range():
    """`--compare`: each experiment's seeds elsewhere are counted against the table's range
    (ends included), a machine's second comparison replaces its first (others stay), and runs
    that do not compare (the table's own machine, other seeds, another recipe) or are not
    runs records are refused."""
    from tools import default_runs

    def entry(top1, batch=32, **recorded):  # `recorded`: a key recorded later (older entries lack it)
        return {"config": {"batch": batch, **recorded}, "runs": runs_of(top1, seconds=120.0)}

    table = {"machine": "machine A, 2 cores, 2099-01-01",
             "results": {"lenet": entry([0.04, 0.05, 1 / 30]), "resnet": entry([0.01, 0.02, 0.03])}}
    there = {"machine": "machine B, 2 cores, 2099-01-02",
             "results": {"lenet": entry([0.0333333333, 0.06, 0.045], schedule="step"),
                         "resnet": entry([0.005, 0.02, 0.03])}}
    data = default_runs.compare(table, there)
    assert data == {**table, "elsewhere": [there]}
    line = default_runs.render({**data, "results": {n: {**e, "config": {"model": n, "input": 32, "channels": 1,
                                                                         "epochs": 1}}
                                                    for n, e in data["results"].items()}}).splitlines()[-1]
    assert line == ("The same seeds on machine B, 2 cores, 2099-01-02, top-1 error and mean time: "
                    "`lenet` 4.6% [3.3%–6.0%] (2 of 3 seeds inside the range above), 2 min 0 s; "
                    "`resnet` 1.8% [0.5%–3.0%] (2 of 3 seeds inside the range above), 2 min 0 s.")
    again = {**there, "machine": "machine B, 2 cores, 2099-01-03"}
    assert default_runs.compare(data, again)["elsewhere"] == [again]
    same_digits = {**there, "machine": "machine C, 2 cores, 2099-01-01"}  # another CPU may repeat B's digits
    assert default_runs.compare({**table, "elsewhere": same_digits}, again)["elsewhere"] == [same_digits, again]
    for wrong, why in [({**there, "machine": "machine A, 2 cores, 2099-01-05"}, "the table's own machine"),
                       ({**there, "results": {"lenet": entry([0.04, 0.05])}}, "not the table's seeds"),
                       ({**there, "results": {"lenet": entry([0.04, 0.05, 0.03], batch=16)}}, "another recipe"),
                       ({**there, "results": {"vgg": entry([0.04, 0.05, 0.03])}}, "which the table does not"),
                       ({**there, "results": {}}, "holds no experiments"), ({**there, "machine": 5}, "names no machine"),
                       ({**there, "results": {"lenet": {"runs": []}}}, "no config"),
                       ({**there, "results": {"lenet": {**entry([0.04]), "runs": [{"seed": 0}]}}}, "a run without"),
                       ({**there, "results": {"lenet": entry([0.04, float("nan"), 0.03])}}, "a run without"),
                       ({**there, "results": {"lenet": {**entry([0.04]), "runs": [{**entry([0.04])["runs"][0],
                                                                                   "seed": True}]}}}, "a run without")]:
        with pytest.raises(ValueError, match=why):
            default_runs.compare(table, wrong)


def test_default_runs_name_the_day_each_experiment_ran():
    """A partial rerun keeps the others' days (an old file's own date where its results have none)."""
    from tools import default_runs

    old = {"machine": f"{default_runs.machine(dated=False)}, 2099-01-01",
           "results": {n: {"runs": [n]} for n in default_runs.EXPERIMENTS}}
    kept = default_runs._kept(old, ["resnet", "vgg"])
    assert default_runs._kept({**old, "machine": default_runs.machine(dated=False)}, []) is None  # no day: not ours
    assert {n: e["date"] for n, e in kept.items()} == {n: "2099-01-01" for n in ("alexnet", "lenet", "googlenet")}
    data = {"machine": "a machine, 2 cores, 2099-01-02",
            "results": {**kept, "resnet": {"date": "2099-01-02"}, "vgg": {"date": "2099-01-02"}}}
    assert default_runs._dated(data) == ("a machine, 2 cores, on 2099-01-01 (`alexnet`, `lenet`, `googlenet`) "
                                         "and 2099-01-02 (`resnet`, `vgg`)")
    assert default_runs._dated({**data, "results": kept}) == "a machine, 2 cores, 2099-01-01"


def test_default_runs_go_through_several_experiments_and_write_each(tmp_path, monkeypatch, capsys):
    """The runner's loop over experiments and seeds (each run stood in for by a record, which
    `run_one` reads from a real run): every experiment's seeds land in the file, in order."""
    from tools import default_runs

    def run_one(name, seed, workdir):
        error = 0.01 * (seed + 1)
        return {"seed": seed, "seconds": 1.0, "top1_error": error, "top5_error": 0.0, "best_top1_error": error,
                "evaluations": [error]}

    monkeypatch.setattr(default_runs, "run_one", run_one)
    out = tmp_path / "runs.json"
    assert default_runs.main(["--experiments", "lenet,resnet", "--seeds", "2", "--out", str(out),
                              "--runs", str(tmp_path)]) == 0
    data = json.loads(out.read_text())
    assert list(data["results"]) == ["lenet", "resnet"] and "elsewhere" not in data
    assert [[r["seed"] for r in e["runs"]] for e in data["results"].values()] == [[0, 1], [0, 1]]
    assert "[4/4] experiments.resnet --config.seed=1 ... top-1 2.0% (best 2.0%)" in capsys.readouterr().out


def test_compare_writes_its_file_or_names_the_problem_in_one_line(tmp_path, monkeypatch, capsys):
    """`python -m tools.default_runs --compare FILE --out TABLE`: TABLE gains FILE's machine
    (the README is rewritten only for the default TABLE with every experiment); a FILE that
    does not compare, a TABLE edited by hand, or a flag with no use is a one-line error (exit 2)
    that leaves TABLE as it was."""
    from tools import default_runs

    table, there = tmp_path / "table.json", tmp_path / "there.json"
    good_table = record("machine A, 2 cores, 2099-01-01", [0.04, 0.05])
    good_there = record("machine B, 2 cores, 2099-01-02", [0.045, 0.06])
    for table_text, there_text, argv, why in [
            (good_table, "{}", [], "holds no default runs"),
            (good_table, record("machine B, 2 cores, 2099-01-02", [0.06]), [], "not the table's seeds"),
            (good_table, good_there, ["--seeds", "2"], "--seeds has no use"),
            (good_table, good_there, ["--runs", str(tmp_path)], "--runs has no use"),
            (record("machine A, 2 cores, 2099-01-01", [0.04, 0.05], config={"batch": 32}), good_there, [],
             "is not a default runs file (KeyError 'model')"),
            (good_table.replace('"seconds": 9.0', '"seconds": Infinity', 1), good_there, [],
             "is not a default runs file (ValueError its 'lenet' has no runs, or a run without numbers"),
            (json.dumps({**json.loads(good_table), "elsewhere": [json.loads(good_there.replace(
                '"seconds": 9.0', '"seconds": Infinity', 1))]}), good_there, [],
             "(ValueError its comparison with 'machine B, 2 cores, 2099-01-02': its 'lenet' has no runs"),
            (good_table.replace('"top1_error": 0.04', '"top1_error": 1' + '0' * 400, 1), good_there, [],
             "is not a default runs file (ValueError its 'lenet' has no runs, or a run without numbers")]:
        table.write_text(table_text)
        there.write_text(there_text)
        with pytest.raises(SystemExit) as exit_:
            default_runs.main(["--compare", str(there), "--out", str(table), *argv])
        assert exit_.value.code == 2 and why in capsys.readouterr().err and table.read_text() == table_text
    table.write_text(good_table)
    assert default_runs.main(["--compare", str(there), "--out", str(table)]) == 0
    assert [o["machine"] for o in json.loads(table.read_text())["elsewhere"]] == ["machine B, 2 cores, 2099-01-02"]
    assert "`lenet` 5.2% [4.5%–6.0%] (1 of 2 seeds inside the range above), 9 s." in capsys.readouterr().out
    rewritten = []
    monkeypatch.setattr(default_runs, "DEFAULT_OUT", table)  # the default TABLE, but with one experiment
    monkeypatch.setattr(default_runs, "README", readme_copy(tmp_path))
    monkeypatch.setattr(default_runs, "write_readme", rewritten.append)
    assert default_runs.main(["--compare", str(there), "--out", str(table)]) == 0 and rewritten == []
    full = {**json.loads(table.read_text()), "results": {n: json.loads(good_table)["results"]["lenet"]
                                                         for n in default_runs.EXPERIMENTS}}
    table.write_text(json.dumps(full))  # every experiment in the default TABLE: the README is rewritten
    assert default_runs.main(["--compare", str(there), "--out", str(table)]) == 0
    assert rewritten == [default_runs.render(json.loads(table.read_text()))]


def readme_copy(folder: pathlib.Path) -> pathlib.Path:
    """The README, where a tool may check or rewrite it without touching the repository's."""
    copy = folder / "README.md"
    copy.write_bytes((ROOT / "README.md").read_bytes())
    return copy


def test_a_broken_table_is_refused_before_any_run(tmp_path, monkeypatch, capsys):
    """A README table file edited by hand (a time of Infinity, a config without the table's
    columns) is a one-line error before the first run, not a traceback when the table is
    rendered after them."""
    from tools import default_runs

    table = tmp_path / "table.json"
    monkeypatch.setattr(default_runs, "DEFAULT_OUT", table)
    monkeypatch.setattr(default_runs, "README", readme_copy(tmp_path))
    monkeypatch.setattr(default_runs, "run_one", lambda *_: pytest.fail("a run started"))
    for runs, why in [(runs_of([0.04], seconds=float("inf")), "ValueError its 'lenet' has no runs"),
                      (runs_of([0.04]), "KeyError 'model'")]:  # a config without the table's columns
        table.write_text(json.dumps({"machine": "machine A, 2 cores, 2099-01-01",
                                     "results": {"lenet": {"config": {}, "runs": runs}}}))
        with pytest.raises(SystemExit) as exit_:
            default_runs.main(["--out", str(table), "--experiments", "lenet"])
        assert exit_.value.code == 2 and f"is not a default runs file ({why}" in capsys.readouterr().err


def test_an_unwritable_out_is_refused_before_any_run(tmp_path, monkeypatch, capsys):
    """`--out` that is a folder, under a file (through a symbolic link too), a pipe, a loop of
    links or where no file can be made is a one-line error (exit 2) before the first run, not an
    OSError traceback after all of them; the check makes, changes and leaves behind nothing (an
    existing file, a link, a folder still to be made), and a run then writes the file it checked,
    through a link into a folder still to be made, too."""
    from tools import default_runs, gradient_report, outputs

    monkeypatch.setattr(default_runs, "run_one", lambda *_: pytest.fail("a run started"))
    monkeypatch.setattr(gradient_report, "measure", lambda *_: pytest.fail("a measurement started"))
    area = tmp_path / "area"
    area.mkdir()
    (area / "a_file").write_text("")
    (area / "into_a_file.json").symlink_to(area / "a_file" / "x.json")
    (area / "loop.json").symlink_to(area / "loop.json")
    os.mkfifo(area / "pipe")
    cases = [(area, "is a folder"), (area / "a_file" / "runs.json", "a file, not a folder"),
             (area / "into_a_file.json", "a file, not a folder"), (area / "pipe", "is not a regular file"),
             (area / "loop.json", "cannot be written"), (area / "loop.json" / "x.json", "cannot be written"),
             (area / ("x" * 300), "cannot be written (File name too long)")]
    if pathlib.Path("/proc/self").exists():  # Linux: no file can be made there, even by root
        cases.append((pathlib.Path("/proc/cnn_jax_runs.json"), "cannot be written"))
    for out, why in cases:
        with pytest.raises(SystemExit) as exit_:
            default_runs.main(["--experiments", "lenet", "--seeds", "1", "--out", str(out)])
        assert exit_.value.code == 2 and why in capsys.readouterr().err, out
    for out, why in ((area, "is a folder"), (area / "loop.json", "cannot be written")):
        with pytest.raises(SystemExit) as exit_:  # the gradient report asks the same before measuring
            gradient_report.main(["--families", "lenet5", "--out", str(out)])
        assert exit_.value.code == 2 and why in capsys.readouterr().err

    table = area / "table.json"
    table.write_text('{"results": {}}')
    before = table.read_bytes(), table.stat().st_mtime_ns
    link = area / "link.json"
    link.symlink_to(area / "elsewhere.json")  # dangling: the file it names is written later
    listing = sorted(p.name for p in area.iterdir())
    for fine in (table, link, area / "new" / "deeper" / "r.json"):
        assert outputs.unwritable(fine) is None
    assert (table.read_bytes(), table.stat().st_mtime_ns) == before and link.is_symlink()
    assert sorted(p.name for p in area.iterdir()) == listing  # no probe left, no folder made

    monkeypatch.setattr(default_runs, "run_one", lambda name, seed, workdir: {
        "seed": seed, "seconds": 1.0, "top1_error": 0.01, "top5_error": 0.0, "best_top1_error": 0.01})
    into_new = tmp_path / "into_new.json"
    into_new.symlink_to(tmp_path / "new" / "r.json")  # a link into a folder the run makes
    assert default_runs.main(["--experiments", "lenet", "--seeds", "1", "--out", str(into_new),
                              "--runs", str(tmp_path)]) == 0
    assert json.loads(into_new.read_text())["results"]["lenet"]["runs"][0]["seed"] == 0 and into_new.is_symlink()


def test_a_readme_that_cannot_take_the_table_is_refused_before_any_run(tmp_path, monkeypatch, capsys):
    """With the default --out both tools rewrite the README's table at the end: no README, one
    without the table's markers or with them out of order, or one that is not UTF-8 is a
    one-line error (exit 2) before the first run or measurement, not a traceback after them, and
    the README is left as it was; one gone by the end is one line that names the results' file."""
    from tools import default_runs, gradient_report

    monkeypatch.setattr(default_runs, "run_one", lambda *_: pytest.fail("a run started"))
    monkeypatch.setattr(gradient_report, "measure", lambda *_: pytest.fail("a measurement started"))
    readme, there = tmp_path / "README.md", tmp_path / "there.json"
    (tmp_path / "runs.json").write_text(record("machine A, 2 cores, 2099-01-01", [0.04], default_runs.EXPERIMENTS))
    there.write_text(record("machine B, 2 cores, 2099-01-02", [0.04], default_runs.EXPERIMENTS))
    for tool, out in ((default_runs, "runs.json"), (gradient_report, "gradients.json")):
        monkeypatch.setattr(tool, "DEFAULT_OUT", tmp_path / out)
        monkeypatch.setattr(tool, "README", readme)
    calls = [lambda: default_runs.main([]), lambda: default_runs.main(["--compare", str(there)]),
             lambda: gradient_report.main([])]
    begin, end = default_runs.BEGIN, default_runs.END
    for text, why in [(None, "README.md cannot take the table (No such file or directory)"),
                      (b"# cnn_jax\n\nno table here\n", "README.md has no <!-- "),
                      (f"{end}\nold\n{begin}\n".encode(), "README.md has no <!-- "),  # out of order
                      (b"# cnn_jax \xff\n", "can't decode byte 0xff")]:
        if text is not None:
            readme.write_bytes(text)
        for call in calls:
            with pytest.raises(SystemExit) as exit_:
                call()
            assert exit_.value.code == 2 and why in capsys.readouterr().err
            assert (readme.read_bytes() if readme.exists() else None) == text  # made or changed nothing
    readme.write_text(f"# cnn_jax\n{begin}\nold\n{end}\n")  # markers: the table goes in
    assert default_runs.main(["--compare", str(there)]) == 0
    assert default_runs.render(json.loads((tmp_path / "runs.json").read_text())) in readme.read_text()
    readme.unlink()  # gone after the check: one line that says where the results are, no traceback
    with pytest.raises(SystemExit, match=f"README.md was not rewritten .+ kept in {tmp_path / 'runs.json'}$"):
        default_runs.write_readme("table")


def test_compare_checks_its_out_after_reading_it(tmp_path, monkeypatch, capsys):
    """`--compare FILE --out TABLE`: a TABLE that cannot be written (stood in for: these tests
    run as root) is refused in one line and left as it was; a pipe is not read, not waited on."""
    from tools import default_runs

    table, there = tmp_path / "table.json", tmp_path / "there.json"
    for path, machine in ((table, "machine A, 2 cores, 2099-01-01"), (there, "machine B, 2 cores, 2099-01-02")):
        path.write_text(record(machine, [0.04]))
    before = table.read_text()
    monkeypatch.setattr(default_runs, "refusal", lambda out, *_: f"--out {out} cannot be written (stand-in)")
    with pytest.raises(SystemExit) as exit_:
        default_runs.main(["--compare", str(there), "--out", str(table)])
    assert exit_.value.code == 2 and "cannot be written (stand-in)" in capsys.readouterr().err
    assert table.read_text() == before
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(SystemExit) as exit_:
        default_runs.main(["--compare", str(there), "--out", str(tmp_path / "pipe")])
    assert exit_.value.code == 2 and "holds no default runs" in capsys.readouterr().err
