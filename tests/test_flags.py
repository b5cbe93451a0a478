"""The flags: parse_args, --help, validate_config, and one clear error line (and the right exit code, never a
traceback) for every bad input: a bad flag or flag combination, a missing optional package, a bad data file, a
missing or unsuitable model, an unwritable output dir, lengths beyond the model's positions; and flags typed as
--name value."""

import dataclasses
import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import POSITIONS, TINY, data_args, error_lines, needs_peft, read_jsonl

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


@pytest.mark.parametrize("arg, suggestion", [("--lerning_rate=1e-4", "--learning_rate"),
                                             ("--learning-rate=1e-4", "--learning_rate"), ("--grop_size=4", "--group_size")])
def test_a_misspelt_flag_names_the_closest_one(arg, suggestion):
    with pytest.raises(grpo.ConfigError, match="unknown option") as info:
        grpo.parse_args([arg])
    assert f"did you mean {suggestion}?" in str(info.value)


# --------------------------------------------------------------------------------------------------
# --help: every Config field, grouped, with its default and its one-line comment
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_flag_grouped_with_its_default_and_comment_and_exits_0(flag, capsys):
    """--help is the reference of the flags (README has no table of them): every Config field, in Config's order
    under its group heading, as --name=default followed by its one-line comment from the source, which no field
    may lack."""
    assert grpo.main(["--group_size=3", flag]) == 0  # help wins over everything else, even a bad value
    out = capsys.readouterr().out
    groups = grpo.config_groups()
    fields = [field for _, group in groups for field in group]
    assert [name for name, _, _ in fields] == [f.name for f in dataclasses.fields(grpo.Config)]  # each field once
    position = -1
    for heading, group in groups:  # in Config's order, under its group heading
        assert out.index(f"\n{heading}:\n") > position
        for name, default, comment in group:
            assert comment.strip() and "\n" not in comment, f"--{name} has no one-line comment"
            lines = [line for line in out.splitlines() if line.lstrip().startswith(f"--{name}=")]
            assert len(lines) == 1, (name, lines)
            line = lines[0]
            assert line.split()[0] == f"--{name}={default}" and line.endswith(comment), line
            assert out.index(line) > position
            position = out.index(line)
    defaults = grpo.Config()
    for name, default, _ in fields:  # the default shown is the dataclass's own
        assert grpo.parse_value(name, default.strip('"'), grpo.typing.get_type_hints(grpo.Config)[name]) \
            == getattr(defaults, name), name


# --------------------------------------------------------------------------------------------------
# validate_config: each bad value or combination names its flag
# --------------------------------------------------------------------------------------------------
def test_validate_config_passes_for_defaults_and_demo():
    grpo.validate_config(grpo.Config())
    grpo.validate_config(grpo.parse_args(["--demo"])[0])


@pytest.mark.parametrize("changes, message", [
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
    (dict(invented_fact_penalty=-0.1), "--invented_fact_penalty"),
    (dict(invented_fact_penalty=float("nan")), "--invented_fact_penalty"),
    (dict(invented_fact_penalty=float("inf")), "--invented_fact_penalty"),
    (dict(invented_fact_penalty=0.5, demo=True, sft_steps=10, num_examples=1), "--invented_fact_penalty and --demo"),
    (dict(sft_lr_scheduler="cosin"), "--sft_lr_scheduler=cosin"),
    (dict(sft_eval_every=-1), "--sft_eval_every"),
    (dict(sft_eval_every=100, sft_steps=0), "--sft_eval_every"),  # no SFT to evaluate: never silently ignored
    (dict(sft_eval_every=100, sft_steps=500, eval_samples=0), "--sft_eval_every"),  # no held-out articles
    (dict(scale_rewards="True"), "--scale_rewards must be one of group, batch, none"),
    (dict(scale_rewards="sequence"), "--scale_rewards must be one of group, batch, none"),
    (dict(report_to="wandbb"), "--report_to must be none or a comma-separated list of wandb"),
    (dict(report_to="tensorboard,mlflow"), "--report_to must be none or a comma-separated list of wandb"),
    (dict(report_to="none,wandb"), "--report_to must be none or a comma-separated list of wandb"),
    (dict(log_completions_every=-1), "--log_completions_every"),
    (dict(lora_r=-1), "--lora_r"),
    (dict(lora_r=8, lora_alpha=0), "--lora_alpha"),
    (dict(lora_r=8, lora_dropout=0.05), "--lora_dropout must be 0"),
    (dict(lora_r=8, lora_dropout=0.1), "--lora_dropout must be 0"),
    (dict(lora_r=8, lora_target_modules=","), "--lora_target_modules"),
    (dict(eval_split="train"), "--eval_split"),
    (dict(eval_decoding="beam"), "--eval_decoding"),
    (dict(eval_samples=-1), "--eval_samples"),
    (dict(eval_split="test"), "--eval_split=test"),  # only with --eval_only
    (dict(test_file="t.jsonl"), "--test_file"),
    (dict(eval_only=True, test_file="t.jsonl"), "--test_file"),  # eval_split is validation
    (dict(eval_only=True, eval_split="test", validation_file="v.jsonl"), "--validation_file"),
    (dict(eval_only=True, train_file="t.jsonl"), "--eval_only"),
    (dict(eval_only=True, eval_samples=0), "--eval_samples"),
    (dict(eval_only=True, resume=True), "--eval_only"),
    (dict(demo=True, eval_samples=0), "--demo"),
])
def test_validate_config_rejects(changes, message):
    with pytest.raises(grpo.ConfigError) as info:
        grpo.validate_config(dataclasses.replace(grpo.Config(), **changes))
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("changes", [
    dict(top_p=1.0), dict(top_p=0.9), dict(beta=0.0), dict(invented_fact_penalty=0.5), dict(group_size=4, micro_batch_size=4),
    dict(group_size=8, micro_batch_size=64), dict(epsilon_high=0.28), dict(loss_type="gspo"), dict(device="cuda:1"),
    dict(sft_lr_scheduler="cosine"), dict(sft_steps=500, sft_eval_every=100), dict(scale_rewards="batch"),
    dict(scale_rewards="none"), dict(eval_samples=0), dict(eval_decoding="checkpoint"),
    dict(eval_only=True, eval_split="test"), dict(eval_only=True, eval_split="test", test_file="t.jsonl"),
    dict(eval_only=True, validation_file="v.jsonl"),
])
def test_validate_config_accepts(changes):
    grpo.validate_config(dataclasses.replace(grpo.Config(), **changes))


@pytest.mark.parametrize("argv", [["--demo", "--sft_steps=15"], ["--sft_eval_every=0"],
                                  ["--benchmark", "--sft_eval_every=0"], ["--scale_rewards=batch"]])
def test_validate_config_accepts_these_command_lines(argv):
    """The demo's own --sft_eval_every may exceed a shortened --sft_steps; 0 (off) may be given explicitly."""
    grpo.validate_config(*grpo.parse_args(argv))


# --------------------------------------------------------------------------------------------------
# main: a bad flag is one line on stderr and exit code 2, before any training starts
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, words", [
    (["--bogus=1"], ["bogus"]),
    (["--group_size=1"], ["--group_size"]),
    (["--group_size=abc"], ["--group_size", "int"]),
    # given explicitly, an --sft_eval_every that would score nothing (the demo's own 200 may exceed --sft_steps)
    (["--sft_steps=300", "--sft_eval_every=300"], ["--sft_eval_every", "smaller"]),
    (["--sft_steps=300", "--sft_eval_every=500"], ["--sft_eval_every", "smaller"]),
    (["--demo", "--demo_seeds=0"], ["--demo_seeds"]),  # a count below 1
    (["--demo_seeds=3"], ["--demo_seeds"]),  # seeds without --demo: never silently ignored
    (["--demo", "--sft_steps=0"], ["--sft_steps"]),  # the demo's comparison needs a start to compare from
    (["--demo", "--max_steps=0"], ["--max_steps"]),
    (["--demo", "--num_examples=0"], ["--num_examples"]),
    (["--demo", "--benchmark", "--demo_seeds=2"], ["--demo_seeds"]),
    # the checkpoint's generation_config sets the length: a --max_new_tokens that would be ignored is refused
    (["--eval_only=True", "--eval_decoding=checkpoint", "--max_new_tokens=8"], ["--max_new_tokens"]),
], ids=lambda value: " ".join(value) if isinstance(value, list) and value[0].startswith("-") else None)
def test_main_bad_flag_is_one_error_line_and_exit_2(capsys, argv, words):
    assert grpo.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_demo_under_torchrun_is_one_error_line(grpo, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert grpo.main(["--demo"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "torchrun" in lines[0], lines


@pytest.mark.parametrize("flag, package, named", [("--report_to=wandb", "wandb", "--report_to=wandb"),
                                                  ("--report_to=tensorboard", "tensorboard", "--report_to=tensorboard"),
                                                  ("--lora_r=8", "peft", "--lora_r > 0")])
def test_missing_optional_package_is_one_error_line(grpo, flag, package, named, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == package else real_find_spec(name, *args))
    assert grpo.main([flag]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"error: {named} needs the {package} package, which is not installed: pip install {package}"


def test_compile_sampler_without_cuda_is_one_clear_error(grpo, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: tests/test_cuda.py runs --compile_sampler")
    assert grpo.main(["--compile_sampler=True", f"--output_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --compile_sampler captures CUDA graphs and needs a CUDA "
                                               "device; drop it on this machine")


# --------------------------------------------------------------------------------------------------
# bad data, models and output dirs: one error line from main() on a good tiny setup plus one bad flag
# --------------------------------------------------------------------------------------------------
def bad_main(grpo, capsys, tmp_path, tiny_bart_dir, data_files, *flags) -> tuple[int, str]:
    """main() on a good tiny setup plus `flags` (later flags win); returns (exit code, its single error line)."""
    code = grpo.main([f"--model_name={tiny_bart_dir}", *data_args(data_files), *TINY, "--max_steps=1",
                      f"--output_dir={tmp_path / 'out'}", *flags])
    stderr = capsys.readouterr().err
    errors = error_lines(stderr)
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return code, errors[0]


def test_non_utf8_jsonl_names_line_and_byte(grpo, capsys, tmp_path, tiny_bart_dir, data_files):
    train = tmp_path / "train.jsonl"
    train.write_bytes(data_files[0].read_bytes().splitlines(keepends=True)[0]
                      + b'{"article": "caf\xe9 au lait", "highlights": "x"}\n')
    code, error = bad_main(grpo, capsys, tmp_path, tiny_bart_dir, data_files, f"--train_file={train}")
    assert code == 1 and "line 2" in error and "byte 17" in error and "UTF-8" in error, error
    assert grpo.earlier_run_files(str(tmp_path / "out")) == []  # a run that failed on its data is no earlier run


def test_non_utf8_csv(grpo, capsys, tmp_path, tiny_bart_dir, data_files):
    train = tmp_path / "train.csv"
    train.write_bytes(b"article,highlights\nfirst article,first summary\nna\xefve text,summary\n")
    code, error = bad_main(grpo, capsys, tmp_path, tiny_bart_dir, data_files, f"--train_file={train}")
    assert code == 1 and "line 3" in error and "re-save" in error and "UTF-8" in error, error


def test_json_object_of_column_lists_explains_the_layouts(grpo, capsys, tmp_path, tiny_bart_dir, data_files):
    rows = read_jsonl(data_files[0])
    train = tmp_path / "train.json"
    train.write_text(json.dumps({"article": [r["article"] for r in rows], "highlights": [r["highlights"] for r in rows]}))
    code, error = bad_main(grpo, capsys, tmp_path, tiny_bart_dir, data_files, f"--train_file={train}")
    assert code == 1 and "object of column lists" in error and "JSON Lines" in error, error
    listed = tmp_path / "list.json"  # the accepted layout: a list of row objects
    listed.write_text(json.dumps(rows))
    assert len(grpo.load_local_file(str(listed), ("article", "highlights"))) == len(rows)


def test_unknown_lr_scheduler_lists_the_valid_names(grpo, capsys, tmp_path, tiny_bart_dir, data_files):
    code, error = bad_main(grpo, capsys, tmp_path, tiny_bart_dir, data_files, "--lr_scheduler=cosin")
    assert code == 2 and "--lr_scheduler=cosin" in error and "cosine" in error and "linear" in error, error
    assert not (tmp_path / "out").exists()  # stopped with the other flags, before anything was written


def test_text_column_equal_to_summary_column(grpo, capsys, tmp_path, tiny_bart_dir, data_files):
    code, error = bad_main(grpo, capsys, tmp_path, tiny_bart_dir, data_files, "--summary_column=article")
    assert code == 2 and "--text_column" in error and "--summary_column" in error, error


@pytest.mark.parametrize("name", ["/no/such/model_dir", "./no_such_dir", "~/no_such_dir_7f3a", "runs/x/final"])
def test_missing_local_model_directory(grpo, capsys, tmp_path, tiny_bart_dir, data_files, name):
    code, error = bad_main(grpo, capsys, tmp_path, tiny_bart_dir, data_files, f"--model_name={name}")
    assert code == 1 and "does not exist" in error and name in error, error
    assert not grpo.looks_like_local_path("facebook/bart-base") and not grpo.looks_like_local_path("t5-small")


def test_group_size_three_with_the_default_micro_batch_size(grpo, capsys, tmp_path, tiny_bart_dir, data_files):
    default = grpo.Config().micro_batch_size
    code, error = bad_main(grpo, capsys, tmp_path, tiny_bart_dir, data_files, "--group_size=3",
                           f"--micro_batch_size={default}")
    assert code == 2 and f"--micro_batch_size={default}" in error and "--group_size=3" in error, error
    suggestion = int(re.search(r"use e\.g\. --micro_batch_size=(\d+)", error).group(1))
    grpo.validate_config(dataclasses.replace(grpo.Config(), group_size=3, micro_batch_size=suggestion))


@needs_peft
def test_unknown_target_module_is_a_user_error(grpo, tiny_bart_dir):
    config = grpo.Config(model_name=str(tiny_bart_dir), lora_r=4, lora_target_modules="no_such_layer", device="cpu")
    policy, _ = grpo.load_policy_and_tokenizer(config, torch.device("cpu"))
    with pytest.raises(grpo.UserError) as info:
        grpo.add_lora(policy, config)
    message = str(info.value)
    assert message.startswith("--lora_target_modules=no_such_layer: ") and "\n" not in message, message


# --------------------------------------------------------------------------------------------------
# the same from a fresh interpreter: a non-zero exit and one "error:" line on stderr, never a traceback
# --------------------------------------------------------------------------------------------------
SMALL_RUN = ("--max_steps=1", "--batch_size=2", "--group_size=2", "--micro_batch_size=2", "--max_new_tokens=4",
             "--max_source_length=32", "--eval_samples=2", "--device=cpu")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def case_unknown_flag(tmp_path, models, data):
    return ["--no_such_flag=3"], 2, ["--no_such_flag"]


def case_missing_text_column(tmp_path, models, data):
    train = write_lines(tmp_path / "train.jsonl", [json.dumps({"text": "a b c", "highlights": "a"})] * 3)
    return [f"--train_file={train}"], 1, ["'article'", "'text'", "'highlights'"]


def case_empty_train_file(tmp_path, models, data):
    train = tmp_path / "train.jsonl"
    train.write_text("")
    return [f"--train_file={train}"], 1, [str(train), "empty"]


def case_train_file_does_not_exist(tmp_path, models, data):
    train = tmp_path / "nowhere" / "train.jsonl"
    return [f"--train_file={train}"], 1, [str(train), "does not exist"]


def case_invalid_json_line(tmp_path, models, data):
    good = json.dumps({"article": "a b c", "highlights": "a"})
    train = write_lines(tmp_path / "train.jsonl", [good, good, '{"article": "a b", "highlights": oops}', good])
    return [f"--train_file={train}"], 1, [str(train), "line 3"]


def case_number_article(tmp_path, models, data):
    train = write_lines(tmp_path / "train.jsonl", [json.dumps({"article": "a b c", "highlights": "a"}),
                                                   json.dumps({"article": 42, "highlights": "a"})])
    return [f"--train_file={train}"], 1, ["line 2", "'article'", "string"]


def model_without_tokenizer(tmp_path, model_dir):
    bare = tmp_path / "bare_model"
    bare.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):  # the weights, no tokenizer files
        shutil.copy(Path(model_dir) / name, bare / name)
    return [f"--model_name={bare}"], 1, ["tokenizer", str(bare)]


def case_bart_without_tokenizer(tmp_path, models, data):
    return model_without_tokenizer(tmp_path, models["bart"])


def case_t5_without_tokenizer(tmp_path, models, data):
    return model_without_tokenizer(tmp_path, models["t5"])


def case_encoder_only_model(tmp_path, models, data):
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertModel(config).save_pretrained(bert)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a working tokenizer beside it
        shutil.copy(Path(models["bart"]) / name, bert / name)
    return [f"--model_name={bert}"], 1, ["encoder-decoder", "bert"]


def case_decoder_only_model(tmp_path, models, data):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=64)).save_pretrained(gpt2)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a working tokenizer beside it
        shutil.copy(Path(models["bart"]) / name, gpt2 / name)
    return [f"--model_name={gpt2}"], 1, ["encoder-decoder", "gpt2"]


def case_unreachable_hub_model(tmp_path, models, data):
    name = "no-such-org-7f3a/no-such-summarizer-7f3a"
    return [f"--model_name={name}"], 1, [name, "HF_ENDPOINT"]


def case_unwritable_output_dir(tmp_path, models, data):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    return [f"--output_dir={blocker / 'run'}"], 1, ["--output_dir", str(blocker / "run")]


BAD_INPUTS = [case_unknown_flag, case_missing_text_column, case_empty_train_file, case_train_file_does_not_exist,
              case_invalid_json_line, case_number_article, case_bart_without_tokenizer, case_t5_without_tokenizer,
              case_encoder_only_model, case_decoder_only_model, case_unreachable_hub_model, case_unwritable_output_dir]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.__name__.removeprefix("case_") for c in BAD_INPUTS])
def test_bad_input_gives_one_error_line(case, grpo, tiny_bart_dir, tiny_t5_dir, data_files, tmp_path, capsys,
                                        monkeypatch):
    """In process (main() as the command line calls it): an uncaught exception would fail the test."""
    bad_args, exit_code, must_mention = case(tmp_path, {"bart": tiny_bart_dir, "t5": tiny_t5_dir}, data_files)
    # Later flags win, so each case's own flag replaces the good default given before it.
    args = [f"--model_name={tiny_bart_dir}", *data_args(data_files), *SMALL_RUN, f"--output_dir={tmp_path / 'out'}",
            *bad_args]
    monkeypatch.chdir(tmp_path)
    code = grpo.main([str(arg) for arg in args])
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"exit {code}, stderr:\n{stderr}"
    assert code == exit_code, f"exit {code}, stderr:\n{stderr}"
    for text in must_mention:
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"


# --------------------------------------------------------------------------------------------------
# lengths beyond the model's positions: one line at the start, nothing written; defaults lowered with a note
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--max_source_length=100", "--max_new_tokens=100"])
def test_length_beyond_positions_is_refused_before_anything_is_written(flag, grpo, short_bart_dir, data_files,
                                                                       tmp_path, capsys):
    out = tmp_path / "run"
    train, validation = data_files
    code = grpo.main([f"--model_name={short_bart_dir}", f"--train_file={train}", f"--validation_file={validation}",
                      f"--output_dir={out}", "--device=cpu", flag])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1, error
    assert flag.split("=")[0] in error and f"{POSITIONS} positions" in error and f"={POSITIONS} or less" in error
    assert not out.exists()


def test_eval_only_max_new_tokens_beyond_positions_is_refused(grpo, short_bart_dir, data_files, tmp_path, capsys):
    out = tmp_path / "eval"
    code = grpo.main(["--eval_only=True", f"--model_name={short_bart_dir}", f"--validation_file={data_files[1]}",
                      f"--output_dir={out}", "--device=cpu", "--max_new_tokens=2000"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "--max_new_tokens=2000" in error and f"{POSITIONS} positions" in error, error
    assert not out.exists()


def test_default_lengths_are_lowered_to_the_positions_with_a_note(grpo, capsys):
    from transformers import BartConfig, LEDConfig, T5Config

    config = grpo.Config(max_source_length=1024, max_new_tokens=142)
    fitted = grpo.fit_lengths(config, BartConfig(max_position_embeddings=POSITIONS), given=set())
    assert (fitted.max_source_length, fitted.max_new_tokens) == (POSITIONS, POSITIONS)
    assert capsys.readouterr().err.count("note: --max_") == 2
    assert grpo.position_limits(T5Config()) == (None, None)  # relative positions: no limit
    assert grpo.position_limits(LEDConfig()) == (16384, 1024)  # one limit per side
    assert grpo.fit_lengths(config, T5Config(), given=None) is config


# --------------------------------------------------------------------------------------------------
# flags the way people type them: --name value
# --------------------------------------------------------------------------------------------------
def test_name_space_value_is_accepted_for_every_kind_of_flag(grpo):
    config, given = grpo.parse_args(["--max_steps", "5", "--learning_rate", "3e-6", "--source_prefix", "summarize: ",
                                     "--resume", "True", "--demo", "--epsilon_high", "None", "--seed=4",
                                     "--overwrite_output_dir", "--beta", "-0.5"])
    assert (config.max_steps, config.learning_rate, config.source_prefix, config.resume, config.demo) == (
        5, 3e-6, "summarize: ", True, True)
    assert config.epsilon_high is None and config.seed == 4 and config.overwrite_output_dir and config.beta == -0.5
    assert given == {"max_steps", "learning_rate", "source_prefix", "resume", "demo", "epsilon_high", "seed",
                     "overwrite_output_dir", "beta"}
    assert grpo.parse_args(["--resume", "false"])[0].resume is False
    with pytest.raises(grpo.ConfigError, match="unknown option 'somewhere'"):  # a bool takes only a bool word
        grpo.parse_args(["--demo", "somewhere"])
    with pytest.raises(grpo.ConfigError, match="--max_steps needs a value"):
        grpo.parse_args(["--max_steps", "--seed=1"])
