"""`python -m benchmarks.device` runs end to end on the CPU devices, its JSON holds what its
definitions say, and its Markdown lands in its own section of the results file (speed itself
is measured in `benchmarks/`, never asserted here)."""

import json

import pytest

from benchmarks import device, device_report, train_loop


def test_a_small_run_measures_every_case_and_reports_what_it_measured(tmp_path):
    """One small run on the 8 simulated devices: LeNet-5 in both dtypes, its loop, its first
    step cold and warm (the larger models' cases are the same code at another size)."""
    run = small_run(tmp_path)
    every_case_is_measured(run)
    derived_numbers_follow_their_definitions(run)
    markdown_shows_the_json_and_keeps_the_rest_of_the_file(run)


def small_run(tmp):
    results = tmp / "RESULTS.md"
    results.write_text("# Benchmark results\n\nWritten by hand; kept.\n")
    argv = ["--models", "lenet5", "--batches", "8", "--loop-models", "lenet5",
            "--first-step-models", "lenet5", "--budget", "900", "--out", str(tmp / "device.json"),
            "--results", str(results)]
    assert device.main(argv) == 0
    return json.loads((tmp / "device.json").read_text()), results.read_text()


def every_case_is_measured(run):
    report, _ = run
    cases = {(r["model"], r["dtype"], r["batch"]) for r in report["steps"]}
    assert cases == {("lenet5", d, 8) for d in ("float32", "bfloat16")}
    assert report["skipped"] == []
    for r in report["steps"]:
        assert len(r["all"]) == 2 and all(x > 0 for x in r["all"])  # the CPU profile's two timings
        assert r["first_step_s"] > 0 and r["peak_bytes"] > 0
    assert [(r["model"], r["store"]) for r in report["loops"]] == [("lenet5", "raw"), ("lenet5", "jpeg")]
    first = report["first_steps"][0]
    assert first["model"] == "lenet5" and first["cold_s"] > 0 and first["warm_s"] > 0


def derived_numbers_follow_their_definitions(run):
    report, _ = run
    lenet = [r for r in report["steps"] if r["model"] == "lenet5"]
    # LeNet-5's forward multiply-adds by hand (as in test_benchmarks), and MFU on a CPU: of the
    # matrix-product rate measured in the same run
    by_hand = 28 * 28 * 6 * 26 + 14 * 14 * 6 + 10 * 10 * 1516 + 5 * 5 * 16 + 120 * 401 + 84 * 121
    assert all(r["forward_macs_per_image"] == by_hand for r in lenet)
    for r in report["steps"]:  # 6 x the forward multiply-adds (backward ~ twice the forward) per image
        assert "measured in this run" in r["mfu_of"] and 0 < r["mfu"] < 1
        assert r["mfu"] == pytest.approx(6 * by_hand * r["images_per_s"] / r["peak_flops"])
    for loop in report["loops"]:
        assert loop["loop_over_step"] == pytest.approx(loop["loop_images_per_s"] / loop["step_images_per_s"])
        assert 0 <= loop["data_wait"] <= 1
    needed = report["host"]["cores_needed"]["lenet5"]
    assert needed["step_images_per_s"] == max(r["images_per_s"] for r in lenet)
    per_core = report["host"]["per_core"][needed["store"]]
    assert needed["store"] == "36x36x1"  # LeNet-5's 32x32 grey input, stored 4 pixels larger
    assert needed["cores_jpeg"] == pytest.approx(needed["step_images_per_s"] / per_core["jpeg"])


def markdown_shows_the_json_and_keeps_the_rest_of_the_file(run):
    report, text = run
    assert text.startswith("# Benchmark results\n\nWritten by hand; kept.\n")
    assert text.count(device_report.HEADING) == 1
    assert "<!-- benchmarks.device: 8 x cpu -->" in text
    for r in report["steps"]:
        assert f"| `{r['model']}` | {r['dtype']} | 8 | {device_report._rate(r['images_per_s'])} |" in text
    assert "Goals:" not in text  # they are set for H100/H200 runs


def test_a_device_kinds_section_is_replaced_and_others_kept(tmp_path):
    path = tmp_path / "RESULTS.md"
    device_report.replace_section(path, "1 x A", "first A\n")
    device_report.replace_section(path, "1 x B", "only B\n")
    device_report.replace_section(path, "1 x A", "second A\n")
    text = path.read_text()
    assert "second A" in text and "first A" not in text and "only B" in text
    assert text.count(device_report.HEADING) == 1 and text.index("second A") < text.index("only B")


def test_out_of_budget_cases_are_listed_not_guessed():
    budget = device.Budget(0)
    assert not budget.allows("alexnet float32 batch 128")
    roomy = device.Budget(3600)
    assert roomy.allows("the loop", 0.5) and not roomy.allows("a phase whose share has passed", 0.0)
    with roomy.failures("resnet50 bfloat16 batch 256"):
        raise MemoryError("RESOURCE_EXHAUSTED: out of memory\nallocating 1.2 GiB")
    assert budget.skipped == ["alexnet float32 batch 128"]
    assert roomy.skipped == ["a phase whose share has passed",
                             "resnet50 bfloat16 batch 256 failed (MemoryError: RESOURCE_EXHAUSTED: out of memory)"]


@pytest.mark.parametrize("argv, message", [
    (["--models", "alexnet,lenet7"], "unknown model(s) ['lenet7']"),
    (["--models", ","], "--models names none"),
    (["--loop-models", "vgg16"], "--loop-models: unknown model(s) ['vgg16']"),
    (["--batches", "128,x"], "must be comma-separated integers"),
    (["--batches", "0"], "--batches must be positive"),
    (["--budget", "-1"], "--budget at least 0"),
    (["--dtypes", "float16,"], "unknown dtype(s) ['float16']"),
    (["--results", "benchmarks"], "--results benchmarks: not a writable file"),
    (["--results", "no/such/folder/R.md"], "not a writable file in an existing folder"),
])
def test_bad_arguments_are_one_line_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        device.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()  # argparse: its usage, then one line of ours
    assert exit_.value.code == 2 and lines[0].startswith("usage:") and message in lines[-1], lines
    assert sum("error:" in line for line in lines) == 1


def test_peak_rates_per_chip_and_machine():
    """The data sheets' dense peaks, the most specific name first (an H100 NVL is not an SXM
    H100), times the device count; a CPU's is the measured matrix-product rate."""
    assert device.peak_flops("NVIDIA H100 80GB HBM3", "gpu", "bfloat16", None, 8)[0] == 8 * 989.4e12
    assert device.peak_flops("NVIDIA H100 NVL", "gpu", "float32", None, 1)[0] == 417.5e12
    assert device.peak_flops("NVIDIA H100 PCIe", "gpu", "bfloat16", None, 1)[0] == 756e12
    assert device.peak_flops("NVIDIA H200", "gpu", "float32", None, 1)[0] == 494.7e12
    assert device.peak_flops("cpu", "cpu", "float32", 93e9, 1) == (93e9, "the matrix-product rate measured in this run")
    assert device.peak_flops("Some New Chip", "gpu", "float32", None, 1)[0] is None


def test_host_rates_name_each_store_format(data_dir):
    rates = train_loop.host_rates(str(data_dir), size=36, channels=1, batch=8, batches=2)
    assert set(rates) == {"raw", "jpeg"} and all(r > 0 for r in rates.values())


def test_a_loop_of_another_model_keeps_only_the_fields_its_family_shares(tmp_path):
    """ResNet-50's loop starts from experiments.resnet, whose shortcut='A' makes its own
    CIFAR net: the benchmark's model keeps its option B, as the command line would build it."""
    config = device.loop_config("resnet50", "bfloat16", "raw", device.PROFILES["cpu"], str(tmp_path))
    assert config.model_name == "resnet50" and "shortcut" not in config.model
    assert config.model.dtype == "bfloat16"
