"""Command-line parsing, config validation and main()'s exit codes for bad flags."""

import dataclasses

import pytest

from conftest import ROOT

import grpo_encoder_decoder_summarization as grpo


# --------------------------------------------------------------------------------------------------
# parse_args
# --------------------------------------------------------------------------------------------------
def test_parse_args_defaults():
    """No flags: exactly Config()'s defaults (read from Config, so editing a default needs no test change)."""
    config, given = grpo.parse_args([])
    assert given == set()
    assert config == grpo.Config()


def test_parse_args_int():
    config, given = grpo.parse_args(["--group_size=4"])
    assert config.group_size == 4 and type(config.group_size) is int
    assert given == {"group_size"}


def test_parse_args_float():
    config, _ = grpo.parse_args(["--beta=0.1"])
    assert config.beta == 0.1 and type(config.beta) is float
    config, _ = grpo.parse_args(["--beta=1e-3"])
    assert config.beta == 0.001


@pytest.mark.parametrize("argv, expected", [
    (["--resume=True"], True),
    (["--resume=true"], True),
    (["--resume=1"], True),
    (["--resume=yes"], True),
    (["--resume"], True),
    (["--resume=False"], False),
    (["--resume=0"], False),
    (["--resume=no"], False),
])
def test_parse_args_bool(argv, expected):
    config, given = grpo.parse_args(argv)
    assert config.resume is expected
    assert given == {"resume"}


def test_parse_args_optional_float():
    assert grpo.parse_args(["--epsilon_high=none"])[0].epsilon_high is None
    assert grpo.parse_args(["--epsilon_high=None"])[0].epsilon_high is None
    config, _ = grpo.parse_args(["--epsilon_high=0.3"])
    assert config.epsilon_high == 0.3 and type(config.epsilon_high) is float


def test_parse_args_string_keeps_equals_signs_and_spaces():
    config, _ = grpo.parse_args(["--source_prefix=summarize: ", "--model_name=a=b"])
    assert config.source_prefix == "summarize: "
    assert config.model_name == "a=b"


@pytest.mark.parametrize("argv, name", [
    (["--bogus=1"], "bogus"),
    (["--bogus"], "bogus"),
    (["--group_size=4", "--learning-rate=1e-5"], "learning-rate"),
    (["group_size=4"], "group_size=4"),  # no leading --
])
def test_parse_args_unknown_option_raises_config_error(argv, name):
    with pytest.raises(grpo.ConfigError, match="unknown option") as info:
        grpo.parse_args(argv)
    assert name in str(info.value)
    assert info.value.exit_code == 2


@pytest.mark.parametrize("arg, flag, kind", [
    ("--group_size=abc", "--group_size", "int"),
    ("--group_size=4.0", "--group_size", "int"),
    ("--beta=x", "--beta", "float"),
    ("--epsilon_high=high", "--epsilon_high", "float"),
    ("--resume=maybe", "--resume", "bool"),
])
def test_parse_args_wrong_type_names_flag_and_type(arg, flag, kind):
    with pytest.raises(grpo.ConfigError) as info:
        grpo.parse_args([arg])
    message = str(info.value)
    assert flag in message and kind in message


def test_parse_args_non_bool_flag_without_value_raises():
    with pytest.raises(grpo.ConfigError, match="--group_size"):
        grpo.parse_args(["--group_size"])


def test_parse_args_demo_applies_demo_config():
    config, given = grpo.parse_args(["--demo"])
    assert given == {"demo"}
    assert config.demo is True
    defaults = grpo.Config()
    for field in dataclasses.fields(grpo.Config):
        if field.name in grpo.DEMO_CONFIG:
            assert getattr(config, field.name) == grpo.DEMO_CONFIG[field.name], field.name
        elif field.name != "demo":  # fields DEMO_CONFIG does not name keep their defaults
            assert getattr(config, field.name) == getattr(defaults, field.name), field.name
    assert config.output_dir != defaults.output_dir and config.sft_steps > 0  # the demo's own folder; SFT first


def test_parse_args_demo_keeps_flags_given_explicitly():
    config, given = grpo.parse_args(["--max_steps=7", "--demo", "--group_size=4", "--output_dir=/tmp/x"])
    assert given == {"demo", "max_steps", "group_size", "output_dir"}
    assert config.max_steps == 7 and config.group_size == 4 and config.output_dir == "/tmp/x"
    for name in ("sft_steps", "batch_size", "beta", "learning_rate"):  # the rest from DEMO_CONFIG
        assert getattr(config, name) == grpo.DEMO_CONFIG[name], name
    # a flag given explicitly with its default value still wins over the demo value
    defaults = grpo.Config()
    name, default = next((name, getattr(defaults, name)) for name, value in grpo.DEMO_CONFIG.items()
                         if value != getattr(defaults, name) and not isinstance(value, bool))
    config, _ = grpo.parse_args(["--demo", f"--{name}={default}"])
    assert getattr(config, name) == default, name


# --------------------------------------------------------------------------------------------------
# validate_config
# --------------------------------------------------------------------------------------------------
def test_validate_config_passes_for_defaults_and_demo():
    grpo.validate_config(grpo.Config())
    grpo.validate_config(grpo.parse_args(["--demo"])[0])


@pytest.mark.parametrize("changes, flag", [
    (dict(group_size=1), "--group_size"),
    (dict(batch_size=0), "--batch_size"),
    (dict(beta=-1.0), "--beta"),
    (dict(epsilon=0.0), "--epsilon"),
    (dict(top_p=0.0), "--top_p"),
    (dict(top_p=1.5), "--top_p"),
    (dict(group_size=8, micro_batch_size=12), "--micro_batch_size"),  # not a multiple of G
    (dict(group_size=8, micro_batch_size=4), "--micro_batch_size"),  # fewer than one group
    (dict(group_size=3, micro_batch_size=16), "--micro_batch_size"),
    (dict(loss_type="ppo"), "--loss_type"),
    (dict(epsilon_high=0.0), "--epsilon_high"),
    (dict(best_metric="bleu"), "--best_metric"),
    (dict(device="gpu"), "--device"),
    (dict(rouge1_weight=0.0, rouge2_weight=0.0, rougeL_weight=0.0, rougeLsum_weight=0.0), "rouge*_weight"),
    (dict(sft_lr_scheduler="cosin"), "--sft_lr_scheduler=cosin"),
    (dict(sft_eval_every=-1), "--sft_eval_every"),
    (dict(sft_eval_every=100, sft_steps=0), "--sft_eval_every"),  # no SFT to evaluate: never silently ignored
    (dict(sft_eval_every=100, sft_steps=500, eval_samples=0), "--sft_eval_every"),  # no held-out articles
])
def test_validate_config_rejects(changes, flag):
    with pytest.raises(grpo.ConfigError) as info:
        grpo.validate_config(dataclasses.replace(grpo.Config(), **changes))
    assert flag in str(info.value)


@pytest.mark.parametrize("changes", [
    dict(top_p=1.0), dict(top_p=0.9), dict(beta=0.0), dict(group_size=4, micro_batch_size=4),
    dict(group_size=8, micro_batch_size=64), dict(epsilon_high=0.28), dict(loss_type="gspo"), dict(device="cuda:1"),
    dict(sft_lr_scheduler="cosine"), dict(sft_steps=500, sft_eval_every=100),
])
def test_validate_config_accepts(changes):
    grpo.validate_config(dataclasses.replace(grpo.Config(), **changes))


# --------------------------------------------------------------------------------------------------
# main: a bad flag is one line on stderr and exit code 2, before any training starts
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--sft_steps=300", "--sft_eval_every=300"],
                                  ["--sft_steps=300", "--sft_eval_every=500"]])
def test_sft_eval_every_that_would_score_nothing_is_one_error_line(capsys, argv):
    assert grpo.main(argv) == 2  # given explicitly; the demo's own 200 may exceed a shortened --sft_steps
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "--sft_eval_every" in lines[0] and "smaller" in lines[0], lines
    for accepted in (["--demo", "--sft_steps=15"], ["--sft_eval_every=0"], ["--benchmark", "--sft_eval_every=0"]):
        grpo.validate_config(*grpo.parse_args(accepted))  # the demo's own value; 0 (off) given explicitly


def test_main_unknown_flag_returns_2_with_one_error_line(capsys):
    assert grpo.main(["--bogus=1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "bogus" in lines[0]


def test_main_invalid_value_returns_2(capsys):
    assert grpo.main(["--group_size=1"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--group_size" in lines[0]


def test_main_wrong_type_returns_2(capsys):
    assert grpo.main(["--group_size=abc"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")


def test_readme_lists_every_flag_with_its_default_and_comment():
    """README's configuration table is the Config dataclass: every field, its default and its one-line comment
    (as config_groups reads them from the source, which --help prints too)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    fields = [field for _, group in grpo.config_groups() for field in group]
    assert len(fields) == len(grpo.dataclasses.fields(grpo.Config))  # every field has a one-line comment
    for name, default, comment in fields:
        assert f"| `--{name}` | `{default}` | {comment} |" in readme, name


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_flag_grouped_with_its_default_and_comment_and_exits_0(flag, capsys):
    assert grpo.main(["--group_size=3", flag]) == 0  # help wins over everything else, even a bad value
    out = capsys.readouterr().out
    groups = grpo.config_groups()
    fields = [field for _, group in groups for field in group]
    assert [name for name, _, _ in fields] == [f.name for f in dataclasses.fields(grpo.Config)]
    position = -1
    for heading, group in groups:  # in Config's order, under its group heading
        assert out.index(f"\n{heading}:\n") > position
        for name, default, comment in group:
            line = next(line for line in out.splitlines() if line.lstrip().startswith(f"--{name}="))
            assert line.split()[0] == f"--{name}={default}" and line.endswith(comment), line
            assert out.index(line) > position
            position = out.index(line)
    defaults = grpo.Config()
    for name, default, _ in fields:  # the default shown is the dataclass's own
        assert grpo.parse_value(name, default.strip('"'), grpo.typing.get_type_hints(grpo.Config)[name]) \
            == getattr(defaults, name), name


@pytest.mark.parametrize("arg, suggestion", [("--lerning_rate=1e-4", "--learning_rate"),
                                             ("--learning-rate=1e-4", "--learning_rate"), ("--grop_size=4", "--group_size")])
def test_a_misspelt_flag_names_the_closest_one(arg, suggestion):
    with pytest.raises(grpo.ConfigError, match="unknown option") as info:
        grpo.parse_args([arg])
    assert f"did you mean {suggestion}?" in str(info.value)
