"""The settings schema and its errors: one line in Python's words, the same line in flags."""

import pickle

import pytest

from cnn_jax import config as config_lib, workdir
from cnn_jax.config import ConfigError, Set, SettingError
from experiments._run import FLAGS


def test_an_error_names_its_key_and_settings_in_either_notation():
    err = ConfigError("must be a multiple of 4: use {0} or {1}", Set("mesh", (4, 2)), Set("batch_size", 28),
                      key="batch_size", value=30)
    assert str(err) == "config.batch_size=30: must be a multiple of 4: use config.mesh=(4, 2) or config.batch_size=28"
    assert err.render(FLAGS) == ("--config.batch_size=30: must be a multiple of 4: use "
                                                   "--config.mesh='(4, 2)' or --config.batch_size=28")


def test_shell_quoting_keeps_a_value_one_word():
    assert Set("freeze", "^conv").render(FLAGS) == "--config.freeze=^conv"
    assert Set("freeze", "it's (x)").render(FLAGS) == "--config.freeze='it'\\''s (x)'"
    assert Set("classes", (5,)).render() == "config.classes=(5,)"
    assert Set("data_dir").render(FLAGS) == "--config.data_dir"
    assert Set("workdir", "runs/a b", argument=True).render(FLAGS) == "--workdir='runs/a b'"
    assert Set("workdir", "runs/x", argument=True).render() == "workdir=runs/x"


def test_text_without_settings_keeps_its_braces():
    assert str(SettingError("keys {'a': 1} differ")) == "keys {'a': 1} differ"


def test_errors_survive_pickling_with_their_parts():  # raised in worker processes
    err = pickle.loads(pickle.dumps(ConfigError("use {0}", Set("mesh", (2, 1)), key="mesh", value=(3, 1))))
    assert type(err) is ConfigError and err.key == "mesh" and str(err) == "config.mesh=(3, 1): use config.mesh=(2, 1)"


def test_the_resume_rules_name_only_keys_of_the_schema():
    keys = set(config_lib.defaults().keys())
    for group in (config_lib.WATCHING, config_lib.LENGTH, config_lib.NOT_RECORDED):
        assert group <= keys, group - keys


# Keys whose rules need more than their own value (the model, the data, the devices, another
# key, a module's own list of names), checked by the modules that use them.
CHECKED_ELSEWHERE = {"model_name", "model", "data_dir", "normalize", "store_format", "classes", "init_from", "freeze",
                     "optimizer", "decay_mask", "schedule", "step_boundaries", "parallel", "mesh",
                     "coordinator_address", "compilation_cache", "distributed", "process_id"}


def test_every_key_has_a_plain_rule_or_is_checked_elsewhere():
    """A rule for a key `defaults()` lacks would fail every run, one its default breaks every
    run that keeps the default, and a key in neither list is not checked at all."""
    c = config_lib.defaults()
    assert set(config_lib.RULES) | CHECKED_ELSEWHERE == set(c.keys())
    assert not set(config_lib.RULES) & CHECKED_ELSEWHERE
    config_lib.check_plain(c)


@pytest.mark.parametrize("key, bad, said", [("learning_rate", 0.0, "must be a finite number > 0"),
                                            ("momentum", 1.0, "in [0, 1)"), ("lr_drop_factor", 0.0, "in (0, 1]"),
                                            ("num_epochs", float("nan"), ">= 0"), ("seed", -1, "integer >= 0"),
                                            ("batch_size", 2.0, "positive integer"), ("flip", 1, "True or False"),
                                            ("channels", 2, "choose one of 1, 3"),
                                            ("dataset", "", "non-empty name"),
                                            ("learning_rate", float("inf"), "finite number > 0"),
                                            ("batch_size", True, "positive integer")])
def test_a_plain_rule_names_its_key_value_and_range(key, bad, said):
    c = config_lib.defaults()
    with c.ignore_type():
        c[key] = bad
    with pytest.raises(ConfigError) as caught:
        config_lib.check_plain(c)
    assert caught.value.key == key and str(caught.value).startswith(f"config.{key}={bad}: ")
    assert said in str(caught.value)


def test_a_new_key_changes_what_is_trained_until_said_otherwise(tmp_path):
    """A key the resume rules do not list is refused on change: silently resuming a run with a
    changed setting would be the worse mistake."""
    saved = {"brand_new": 1, "log_every_steps": 10, "experiment.seeds": 3}
    now = {"brand_new": 2, "log_every_steps": 5, "experiment.seeds": 5}
    training, harmless = workdir.compare_configs(saved, now)
    assert training == ["brand_new: 1 -> 2"]
    assert harmless == ["experiment.seeds: 3 -> 5", "log_every_steps: 10 -> 5"]


def test_a_users_value_with_braces_is_shown_as_it_is():
    """A freeze pattern or a path may hold '{1}': it is text, never a setting's placeholder."""
    from cnn_jax.config import literal

    err = ConfigError(f"the pattern {literal('^conv_{1}x')} matches nothing: set {{0}}", Set("freeze"))
    assert str(err) == "the pattern ^conv_{1}x matches nothing: set config.freeze"
    assert str(ConfigError("no setting {3} here")) == "no setting {3} here"  # not a crash either
