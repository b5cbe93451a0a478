"""The first hour of a new user on their own data (issue 20): lengths beyond the model's positions, non-Latin text,
truncation counted at the start, evaluation the Hugging Face way, checkpoint decoding without a length, the demo's
resume and files, degenerate summaries, flags typed with a space, and the small things.

Everything runs offline on tiny models built from a config and on data the tests write.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from conftest import check_ok, read_jsonl, run_script

POSITIONS = 64  # the positions of the short BART below


@pytest.fixture(scope="module")
def short_bart_dir(tmp_path_factory, grpo) -> Path:
    """The demo's tiny BART (word tokenizer), shrunk, with only 64 positions in encoder and decoder."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    directory = tmp_path_factory.mktemp("short_bart")
    rows = grpo.make_synthetic_corpus(200, seed=0)
    tokenizer = grpo.build_word_tokenizer([r["article"] for r in rows] + [r["highlights"] for r in rows],
                                          str(directory), "bart")
    grpo.build_demo_model(str(directory), tokenizer, seed=0)
    config = BartConfig.from_pretrained(directory)
    config.update(dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, dropout=0.0,
                       max_position_embeddings=POSITIONS))
    torch.manual_seed(0)
    BartForConditionalGeneration(config).save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------------------------------
# 1. Lengths beyond the model's positions: one line at the start, nothing written
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


def test_a_run_at_exactly_the_positions_trains(short_bart_dir, data_files, tmp_path):
    """The untrained model samples up to max_new_tokens = the decoder's positions, articles are cut to the
    encoder's: the run ends without an index error (the limit is not off by one)."""
    train, validation = data_files
    result = run_script(f"--model_name={short_bart_dir}", f"--train_file={train}", f"--validation_file={validation}",
                        f"--output_dir={tmp_path / 'run'}", "--device=cpu", f"--max_source_length={POSITIONS}",
                        f"--max_new_tokens={POSITIONS}", "--max_steps=1", "--batch_size=2", "--group_size=2",
                        "--micro_batch_size=4", "--eval_samples=2", "--sft_steps=1", "--sft_batch_size=2",
                        timeout=300)
    check_ok(result)
    lengths = result.stderr.index("lengths: --max_source_length=64 cuts ")  # item 3: said first
    assert lengths < result.stderr.index("sft: 1 steps") < result.stderr.index("eval step 0")


# --------------------------------------------------------------------------------------------------
# 2. Non-Latin text: refused at the start under rouge_score's tokenizer, scored with --rouge_tokenizer=unicode
# --------------------------------------------------------------------------------------------------
CYRILLIC = ["Привет мир как дела", "Совет города одобрил новый мост через реку", "Команда выиграла матч в субботу"]


@pytest.fixture(scope="module")
def cyrillic_files(tmp_path_factory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("cyrillic")
    paths = []
    for name, count in (("train.jsonl", 12), ("validation.jsonl", 4)):
        rows = [{"article": f"{CYRILLIC[i % 3]}. {CYRILLIC[(i + 1) % 3]}. Номер {i}.", "highlights": CYRILLIC[i % 3]}
                for i in range(count)]
        (directory / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        paths.append(directory / name)
    return paths[0], paths[1]


def test_unicode_rouge_scores_cyrillic_and_leaves_english_unchanged(grpo):
    assert grpo.rouge_f1(["Привет мир как дела"], ["Привет мир"])["rouge1"] == [0.0]  # rouge_score keeps [a-z0-9]
    scores = grpo.rouge_f1(["Привет мир как дела"], ["Привет мир"], "unicode")
    assert scores["rouge1"] == [pytest.approx(2 / 3)] and scores["rouge2"] == [pytest.approx(1 / 2)]  # P 1/2, R 1; 1/3, 1
    assert grpo.rouge_tokens("Ça coûte 3,5 € — naïve_test", "unicode") == ["ça", "coûte", "3", "5", "naïve", "test"]
    rows = grpo.make_synthetic_corpus(6, seed=1)
    predictions, references = [r["article"] for r in rows], [r["highlights"] for r in rows]
    assert grpo.rouge_f1(predictions, references, "unicode") == grpo.rouge_f1(predictions, references)
    config = grpo.Config(rouge_tokenizer="unicode", rouge2_weight=0.0, rougeLsum_weight=0.0)
    assert grpo.compute_rewards(["Привет мир"], ["Привет мир"], ["a"], config) == [1.0]  # the reward uses it too
    assert grpo.score_summaries(["Привет мир"], ["Привет мир"], 0, "unicode")[0]["rougeL"] == 1.0


def test_cyrillic_corpus_is_refused_at_start_then_trains_with_unicode_rouge(grpo, tiny_t5_dir, cyrillic_files,
                                                                           tmp_path, capsys):
    train, validation = cyrillic_files
    out = tmp_path / "run"
    args = [f"--model_name={tiny_t5_dir}", f"--train_file={train}", f"--validation_file={validation}",
            f"--output_dir={out}", "--device=cpu", "--max_source_length=64", "--max_new_tokens=8", "--max_steps=1",
            "--batch_size=2", "--group_size=2", "--micro_batch_size=4", "--eval_samples=2", "--eval_batch_size=2"]
    assert grpo.main(args) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and "--rouge_tokenizer=unicode" in error and "14 of 14" in error, error
    assert not (out / "run_config.json").exists()
    result = run_script(*args, "--rouge_tokenizer=unicode", timeout=300)
    check_ok(result)
    assert {e["rouge_tokenizer"] for e in read_jsonl(out / "eval.jsonl")} == {"unicode"}


def test_equal_rewards_for_several_steps_are_warned_once(grpo, tmp_path):
    import types

    messages = []
    run = types.SimpleNamespace(config=grpo.Config(output_dir=str(tmp_path), group_size=4), dist=grpo.Distributed(),
                                state=grpo.TrainerState(), log=messages.append,
                                scheduler=types.SimpleNamespace(get_last_lr=lambda: [0.1]),
                                trackers=types.SimpleNamespace(log=lambda *args: None))

    def step(number, zero_std_groups):
        numbers = dict(samples=[], nonfinite_updates=0, articles_truncated=0.0, reward_mean=0.0,
                       zero_std_groups=zero_std_groups)
        grpo.log_step(run, number, [0], {"article": ["a"]}, numbers)

    for number in range(1, grpo.EQUAL_REWARD_STEPS):
        step(number, 1.0)
    step(grpo.EQUAL_REWARD_STEPS, 0.5)  # one group with a signal ends the stretch
    assert not messages
    for number in range(grpo.EQUAL_REWARD_STEPS + 1, 3 * grpo.EQUAL_REWARD_STEPS + 1):
        step(number, 1.0)
    assert len(messages) == 1 and "no learning signal" in messages[0], messages


# --------------------------------------------------------------------------------------------------
# 3. Truncation counted over the data at the start
# --------------------------------------------------------------------------------------------------
def test_lengths_are_counted_over_both_splits_at_the_start(grpo, tiny_bart_dir):
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bart_dir)  # one token per word, plus <s> and </s>
    assert len(tokenizer("a b c")["input_ids"]) == 5 and len(tokenizer(text_target="a b c")["input_ids"]) == 5
    words = lambda n: " ".join(["town"] * n)  # noqa: E731
    train = datasets.Dataset.from_list([{"article": words(n), "highlights": words(s)} for n, s in ((3, 3), (10, 4), (20, 1))])
    held_out = datasets.Dataset.from_list([{"article": words(5), "highlights": words(9)}])
    messages = []
    config = grpo.Config(max_source_length=6, max_new_tokens=5)
    grpo.log_lengths(config, tokenizer, messages.append, {"training": train, "held-out": held_out})
    # articles of 5, 12, 22 tokens: two cut, by 6 and 16; held out 7 tokens: cut by 1; summaries of 5, 6, 3, 11 tokens
    assert messages == ["lengths: --max_source_length=6 cuts 2 of 3 training articles by 11 tokens on average (at most "
                        "16); 1 of 1 held-out articles by 1 tokens on average (at most 1); 2 of 4 reference summaries "
                        "are longer than --max_new_tokens=5 tokens"]
    grpo.log_lengths(dataclasses.replace(config, source_prefix="summarize: "), tokenizer, messages.append,
                     {"training": train.select([0])})  # the prefix counts: 2 more words
    assert messages[-1].startswith("lengths: --max_source_length=6 cuts 1 of 1 training articles by 1 tokens")


# --------------------------------------------------------------------------------------------------
# 4. Evaluation the Hugging Face way: the training command plus --eval_only=True
# --------------------------------------------------------------------------------------------------
def test_the_training_command_plus_eval_only_scores_the_runs_best_model(grpo, tiny_bart_dir, data_files, tmp_path,
                                                                       capsys):
    train, validation = data_files
    out = tmp_path / "run"
    command = [f"--model_name={tiny_bart_dir}", f"--train_file={train}", f"--validation_file={validation}",
               f"--output_dir={out}", "--device=cpu", "--max_source_length=64", "--max_new_tokens=8", "--max_steps=1",
               "--batch_size=2", "--group_size=2", "--micro_batch_size=4", "--eval_samples=4", "--learning_rate=1e-5"]
    result = run_script(*command, timeout=300)
    check_ok(result)
    assert result.stderr.strip().splitlines()[-1].startswith(f"open: {out}/curves.png")  # item 6: the files to open
    assert grpo.main([*command, "--eval_only=True"]) == 0
    err = capsys.readouterr().err
    target = out / "eval_best_validation"
    assert f"scoring its best/ (the best held-out rougeL of training) into {target}" in err
    notes = [line for line in err.splitlines() if "does not read" in line]
    assert notes == ["note: --eval_only=True does not read --batch_size, --group_size, --learning_rate, --max_steps, "
                     "--micro_batch_size, --train_file (training flags)"]
    record = read_jsonl(target / "eval.jsonl")[-1]
    assert record["model"] == str(out / "best") and record["articles"] == 4 and record["source_prefix"] == ""
    assert len(read_jsonl(target / "eval_predictions.jsonl")) == 4
    assert "trained with --source_prefix" not in err  # trained and scored with the same (empty) prefix
    # the model scored with a prefix it was not trained with: one warning line
    assert grpo.main(["--eval_only=True", f"--model_name={out / 'final'}", f"--validation_file={validation}",
                      f"--output_dir={tmp_path / 'other'}", "--device=cpu", "--max_source_length=64",
                      "--max_new_tokens=8", "--source_prefix=summarize: "]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "trained with --source_prefix" in line]
    assert len(warnings) == 1 and "--source_prefix=''" in warnings[0], warnings
    assert read_jsonl(tmp_path / "other" / "eval.jsonl")[-1]["source_prefix"] == "summarize: "


def test_eval_only_refuses_only_what_would_score_other_articles(grpo, tmp_path, capsys):
    # --train_file alone: training held out some of its rows, which eval-only cannot know; name the flag to use
    assert grpo.main(["--eval_only=True", f"--train_file={tmp_path / 't.jsonl'}"]) == 2
    error = capsys.readouterr().err
    assert "--train_file" in error and "--validation_file" in error and len(error.splitlines()) == 1
    # an --output_dir holding a training run of another model
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run_config.json").write_text(json.dumps({"model_name": "base"}), encoding="utf-8")
    assert grpo.main(["--eval_only=True", f"--output_dir={tmp_path / 'run'}", "--model_name=other",
                      f"--validation_file={tmp_path / 'v.jsonl'}"]) == 2
    assert "pass an --output_dir of its own" in capsys.readouterr().err
    # the run's own model, but it has not saved one yet
    assert grpo.main(["--eval_only=True", f"--output_dir={tmp_path / 'run'}", "--model_name=base",
                      f"--validation_file={tmp_path / 'v.jsonl'}"]) == 1
    assert "no best/ or final/ model yet" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# 5. --eval_decoding=checkpoint on a generation_config without a length
# --------------------------------------------------------------------------------------------------
def test_checkpoint_decoding_without_a_length_uses_max_new_tokens(grpo, tiny_bart_dir, data_files, tmp_path, capsys):
    import shutil

    from transformers import AutoTokenizer, GenerationConfig

    model = tmp_path / "model"
    shutil.copytree(tiny_bart_dir, model)
    settings = GenerationConfig.from_pretrained(model)
    settings.num_beams, settings.max_length, settings.max_new_tokens = 2, None, None
    settings.save_pretrained(model)
    assert not grpo.checkpoint_sets_length(grpo.Config(model_name=str(model)))
    out = tmp_path / "eval"
    assert grpo.main(["--eval_only=True", f"--model_name={model}", f"--validation_file={data_files[1]}",
                      f"--output_dir={out}", "--device=cpu", "--max_source_length=64", "--eval_decoding=checkpoint",
                      "--max_new_tokens=30", "--eval_samples=3"]) == 0, capsys.readouterr().err
    record = read_jsonl(out / "eval.jsonl")[-1]
    assert record["generation"]["max_new_tokens"] == 30 and record["generation"]["num_beams"] == 2
    tokenizer = AutoTokenizer.from_pretrained(model)  # the untrained model rarely ends early: past 20 tokens
    lengths = [len(tokenizer(r["prediction"])["input_ids"]) for r in read_jsonl(out / "eval_predictions.jsonl")]
    assert max(lengths) > 22, lengths
    # a generation_config that sets a length keeps refusing --max_new_tokens, before anything is written
    settings.max_length = 12
    settings.save_pretrained(model)
    assert grpo.main(["--eval_only=True", f"--model_name={model}", f"--validation_file={data_files[1]}",
                      f"--output_dir={tmp_path / 'eval2'}", "--eval_decoding=checkpoint", "--max_new_tokens=30"]) == 2
    assert "drop --max_new_tokens" in capsys.readouterr().err and not (tmp_path / "eval2").exists()


# --------------------------------------------------------------------------------------------------
# 6. A finished demo resumed: one line, exit 0, the files named
# --------------------------------------------------------------------------------------------------
def test_resuming_a_finished_demo_names_its_files_and_trains_nothing(grpo, tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    out.mkdir()
    config, given = grpo.parse_args(["--demo", f"--output_dir={out}"])
    (out / "run_config.json").write_text(json.dumps(dataclasses.asdict(grpo.pointed_at_demo_files(config, given))))
    comparison = {key: 0 for key in grpo.DEMO_REPORT_KEYS}
    comparison.update({row: {key: 0.0 for key in grpo.COMPARISON_KEYS} for row in ("start", "control", "grpo")})
    (out / "comparison.json").write_text(json.dumps(comparison))
    monkeypatch.setattr(grpo, "train", lambda *args: pytest.fail("a finished demo must not train again"))
    assert grpo.main(["--demo", f"--output_dir={out}", "--resume=True"]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{out}/comparison.json" in lines[0] and f"{out}/comparison.png" in lines[0], lines
    # other flags than the finished run's: refused, as for the seeds of --demo_seeds
    assert grpo.main(["--demo", f"--output_dir={out}", "--resume=True", "--max_steps=7"]) == 2
    assert "--overwrite_output_dir=True" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# 7. Degenerate summaries: empty ones, special tokens only, entity recall, punctuation runs
# --------------------------------------------------------------------------------------------------
def test_a_model_emitting_only_special_tokens_is_reported(grpo, tiny_bart_dir, data_files):
    import datasets
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_bart_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bart_dir)
    with torch.no_grad():
        model.final_logits_bias[0, tokenizer.unk_token_id] = 1e4  # every step: the unknown token
    held_out = datasets.Dataset.from_list(read_jsonl(data_files[1])[:3])
    config = grpo.Config(max_source_length=64, max_new_tokens=6, eval_batch_size=2, num_examples=1)
    metrics, examples, _ = grpo.evaluate(model, tokenizer, held_out, config, torch.device("cpu"), grpo.Distributed())
    assert metrics["empty_summaries"] == metrics["special_token_summaries"] == 1.0
    assert metrics["gen_length"] == 0.0 and examples[0]["prediction"] == ""
    assert metrics["entity_recall"] == 0.0  # every synthetic reference names people or numbers
    messages = []
    grpo.warn_empty_summaries(metrics, 3, messages.append)
    assert messages == ["warning: 3 of 3 held-out summaries are empty (3 made only of special tokens): ROUGE, "
                        "gen_length and the examples show nothing for them"]
    grpo.warn_empty_summaries({"empty_summaries": 0.0, "special_token_summaries": 0.0}, 3, messages.append)
    assert len(messages) == 1
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    start = model.config.decoder_start_token_id
    rows = torch.tensor([[start, eos, pad, pad], [start, tokenizer.unk_token_id, eos, pad]])
    assert grpo.special_token_summaries(model, tokenizer, rows) == [False, True]  # empty, but no special token


def test_entity_recall_of_empty_summaries_and_punctuation_runs_hand_cases(grpo):
    # an empty summary: recall 0 where the reference has entities, left out of the mean where it has none
    quality = grpo.summary_quality(["", ""], ["Sales up 4 percent.", "sales rose."], ["a", "b"])
    assert quality["entity_recall"] == 0.0
    assert grpo.summary_quality(["", "x"], ["sales rose.", "no names"], ["a", "b"])["entity_recall"] is None
    quality = grpo.summary_quality(["said 4", ""], ["Sales up 4 percent.", "Ann said so, said Bo."], ["a", "b"])
    assert quality["entity_recall"] == pytest.approx((1 + 0) / 2)

    def trailing(text):
        return grpo.summary_quality([text], ["r"], ["a"])["trailing_punctuation"]

    assert trailing("It is done...") == 0  # one run: the sentence's end
    assert trailing("Profit rose 3.5%.") == 0  # "%." is one run
    assert trailing("It is done . . . .") == 3  # four runs, one of them the sentence's end
    assert trailing("Done!! ??") == 1 and trailing("no end") == 0 and trailing("...") == 0
    assert grpo.summary_quality(["a ... b"], ["r"], ["x"])["punctuation_fraction"] == pytest.approx(1 / 3)


# --------------------------------------------------------------------------------------------------
# 8. Flags the way people type them; no minute of retries when the hub is unreachable
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


def test_an_unreachable_hub_switches_to_offline_mode_at_once(grpo, monkeypatch, capsys):
    import socket

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy",
                 "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    calls = []

    def refused(address, timeout):
        calls.append((address, timeout))
        raise OSError("no route to host")

    monkeypatch.setattr(socket, "create_connection", refused)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    grpo.go_offline_if_hub_unreachable(grpo.Config())  # the hub model and dataset
    assert calls == [(("huggingface.co", 443), grpo.HUB_PROBE_SECONDS)]
    assert grpo.hub_offline() and huggingface_hub.constants.HF_HUB_OFFLINE is True
    assert "unreachable" in capsys.readouterr().err
    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls.clear()
    grpo.go_offline_if_hub_unreachable(grpo.Config(demo=True))  # the demo needs no hub: no probe
    assert calls == [] and not grpo.hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# --------------------------------------------------------------------------------------------------
# 9. An architecture that loads but cannot sample: one line at the start
# --------------------------------------------------------------------------------------------------
def test_switch_transformers_fail_in_one_line_at_the_start(grpo, tmp_path, data_files, capsys):
    import torch
    from transformers import ByT5Tokenizer, SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    model_dir = tmp_path / "switch"
    tokenizer = ByT5Tokenizer()
    config = SwitchTransformersConfig(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                      num_heads=2, num_experts=2, expert_capacity=4, decoder_start_token_id=0,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    SwitchTransformersForConditionalGeneration(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    train, validation = data_files
    out = tmp_path / "run"
    assert grpo.main([f"--model_name={model_dir}", f"--train_file={train}", f"--validation_file={validation}",
                      f"--output_dir={out}", "--device=cpu", "--max_source_length=64", "--max_new_tokens=8"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: switch_transformers models load but cannot run") and "router_logits" in error
    assert not (out / "run_config.json").exists()


def test_the_start_check_keeps_the_random_state(grpo, tiny_t5_dir):
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model, tokenizer = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir), AutoTokenizer.from_pretrained(tiny_t5_dir)
    model.train()
    torch.manual_seed(3)
    grpo.check_model_runs(model, tokenizer, torch.device("cpu"))
    after = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(3)) and model.training  # same draws after it; the mode restored


# --------------------------------------------------------------------------------------------------
# 10. Smaller: the punkt note on rank 0 only, "1 training row", UTF-8 JSONL, --max_steps=0's last lines
# --------------------------------------------------------------------------------------------------
def test_punkt_note_is_printed_by_the_first_process_only(grpo, monkeypatch, capsys):
    import nltk

    def missing(*args, **kwargs):
        raise LookupError("no punkt_tab")

    monkeypatch.setattr(nltk.data, "find", missing)
    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        grpo.have_punkt.cache_clear()
        assert grpo.have_punkt() is False
        assert ("punkt_tab is not installed" in capsys.readouterr().err) is printed
    grpo.have_punkt.cache_clear()


def test_one_held_out_row_is_singular_and_jsonl_is_utf8(grpo, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"article": f"статья {i}", "highlights": "итог"}) + "\n" for i in range(5)),
                     encoding="utf-8")
    messages = []
    grpo.load_data(grpo.Config(train_file=str(train)), messages.append)
    assert "no --validation_file: holding out 1 training row for evaluation" in messages
    path = tmp_path / "out.jsonl"
    grpo.append_jsonl(str(path), {"prediction": "Привет мир"})
    grpo.write_jsonl_atomic(str(tmp_path / "all.jsonl"), [{"prediction": "Привет"}])
    assert "Привет мир" in path.read_text(encoding="utf-8") and "Привет" in (tmp_path / "all.jsonl").read_text("utf-8")


def test_max_steps_0_names_only_files_that_exist(tiny_t5_dir, data_files, tmp_path):
    train, validation = data_files
    out = tmp_path / "run"
    result = run_script(f"--model_name={tiny_t5_dir}", f"--train_file={train}", f"--validation_file={validation}",
                        f"--output_dir={out}", "--device=cpu", "--max_source_length=64", "--max_new_tokens=8",
                        "--max_steps=0", "--eval_samples=2", timeout=300)
    check_ok(result)
    assert "metrics.jsonl" not in result.stderr and not (out / "metrics.jsonl").exists()
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"open: {out}/final (the model), {out}/eval.jsonl (held-out scores)"
    assert (out / "final").is_dir() and (out / "eval.jsonl").exists()
