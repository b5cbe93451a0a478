"""Evaluation for papers: bootstrap confidence intervals, the paired before/after test, --eval_only with the
checkpoint's own decoding or greedy, local validation/test splits, --eval_samples=0, and summary_quality (the
entity recall, invented facts and collapse measures of the demo's comparison). Also the training command plus
--eval_only=True, checkpoint decoding without a length, and degenerate (empty, special-token-only) summaries.

Everything runs offline on a tiny BART "summarizer" whose generation_config holds beam-search settings.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import check_ok, read_jsonl, run_script

ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum")
# The checkpoint's own decoding: every field differs from greedy evaluation, so a test can see which one ran.
BEAM_SETTINGS = dict(num_beams=3, length_penalty=2.0, no_repeat_ngram_size=3, min_length=5, max_length=12,
                     early_stopping=True)


# --------------------------------------------------------------------------------------------------
# Bootstrap intervals: pure functions
# --------------------------------------------------------------------------------------------------
def test_bootstrap_ci_hand_case(grpo):
    # Constant scores: every resample has the same mean, so the interval is that point.
    assert grpo.bootstrap_ci([0.3] * 7, seed=0) == pytest.approx((0.3, 0.3))
    # Two articles scoring 0 and 1: a resample mean is 0 (p 1/4), 0.5 (p 1/2) or 1 (p 1/4); with 1000
    # resamples the 2.5th percentile is 0 and the 97.5th is 1.
    assert grpo.bootstrap_ci([0.0, 1.0], seed=0) == (0.0, 1.0)


def test_bootstrap_ci_contains_the_mean_and_shrinks_with_more_articles(grpo):
    rng = np.random.default_rng(1)
    widths = []
    for n in (20, 200, 2000):
        scores = rng.beta(2, 5, size=n)  # ROUGE-like scores in [0, 1]
        low, high = grpo.bootstrap_ci(scores, seed=0)
        assert low < scores.mean() < high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    # the standard error shrinks as 1/sqrt(n): 10x the articles, about 1/sqrt(10) the width
    assert widths[2] / widths[1] == pytest.approx(10 ** -0.5, rel=0.25)


def test_bootstrap_ci_is_seeded(grpo):
    scores = np.random.default_rng(2).random(50)
    assert grpo.bootstrap_ci(scores, seed=3) == grpo.bootstrap_ci(list(scores), seed=3)
    assert grpo.bootstrap_ci(scores, seed=3) != grpo.bootstrap_ci(scores, seed=4)


def test_bootstrap_ci_chunking_does_not_change_the_numbers(grpo):
    """More articles than one chunk of resamples holds: the interval is the one of the unchunked formula."""
    scores = np.random.default_rng(5).random(30_000)  # 2M / 30k = 66 resamples per chunk
    generator = np.random.default_rng(0)
    means = scores[generator.integers(0, scores.size, size=(200, scores.size))].mean(axis=1)
    expected = tuple(np.percentile(means, [2.5, 97.5]))
    assert grpo.bootstrap_ci(scores, seed=0, num_resamples=200) == pytest.approx(expected, abs=1e-15)


def test_paired_bootstrap_of_identical_scores_is_zero(grpo):
    scores = np.random.default_rng(0).random(40)
    assert grpo.paired_bootstrap(scores, scores.copy(), seed=0) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_constant_shift_and_pairing(grpo):
    before = np.random.default_rng(0).random(100)
    mean, low, high = grpo.paired_bootstrap(before, before + 0.1, seed=0)
    assert (mean, low, high) == pytest.approx((0.1, 0.1, 0.1))
    # Pairing removes the article-to-article variation: a small consistent gain is significant when paired,
    # while the unpaired intervals of the two means overlap.
    after = before + 0.01 + np.random.default_rng(1).normal(0, 0.005, size=100)
    mean, low, high = grpo.paired_bootstrap(before, after, seed=0)
    assert mean == pytest.approx(np.mean(after - before)) and 0 < low < mean < high
    assert grpo.bootstrap_ci(after, seed=0)[0] < grpo.bootstrap_ci(before, seed=0)[1]
    with pytest.raises(ValueError):
        grpo.paired_bootstrap(before, before[:-1], seed=0)


def test_paired_change_reads_per_article_records(grpo):
    before = [{"index": i, "rouge1": 0.2, "rouge2": 0.1, "rougeL": 0.2, "rougeLsum": 0.2} for i in range(5)]
    after = [{**r, "rougeL": 0.3} for r in before]
    change = grpo.paired_change(before, after, seed=0)
    assert change["rougeL_change"] == pytest.approx(0.1)
    assert change["rougeL_change_ci_low"] == pytest.approx(0.1) and change["rougeL_change_ci_high"] == pytest.approx(0.1)
    assert change["rouge1_change"] == change["rouge1_change_ci_low"] == change["rouge1_change_ci_high"] == 0.0
    with pytest.raises(ValueError):
        grpo.paired_change(before, after[::-1], seed=0)


def test_score_summaries_gives_every_metric_its_interval(grpo):
    predictions = ["the cat sat on the mat.", "a dog ran home.", "nothing here", "the bird sang."]
    references = ["the cat sat.", "the dog ran home fast.", "a fish swam.", "a bird sang loudly."]
    metrics, scores = grpo.score_summaries(predictions, references, seed=0)
    for key in ROUGE:
        assert metrics[key] == pytest.approx(np.mean(scores[key]))
        assert metrics[f"{key}_ci_low"] <= metrics[key] <= metrics[f"{key}_ci_high"]


# --------------------------------------------------------------------------------------------------
# A tiny local "summarizer" checkpoint with beam settings in its generation_config
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def summarizer_dir(tiny_bart_dir, tmp_path_factory) -> Path:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig

    directory = tmp_path_factory.mktemp("summarizer")
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_bart_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bart_dir)
    model.generation_config = GenerationConfig(
        **BEAM_SETTINGS, decoder_start_token_id=model.config.decoder_start_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        forced_bos_token_id=tokenizer.bos_token_id, forced_eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def local_test_split(data_files, tmp_path_factory) -> Path:
    """A local test split: 5 rows, distinct from the validation rows."""
    train, _ = data_files
    rows = read_jsonl(train)[-5:]
    path = tmp_path_factory.mktemp("test_split") / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


EVAL_ARGS = ("--eval_only=True", "--max_source_length=64", "--eval_batch_size=3", "--device=cpu")
GREEDY_ARGS = ("--eval_decoding=greedy", "--max_new_tokens=8")


@pytest.mark.parametrize("decoding", ["checkpoint", "greedy"])
def test_eval_only_decoding_reaches_generate(decoding, grpo, summarizer_dir, data_files, tmp_path, monkeypatch):
    """checkpoint: generate() gets the checkpoint's beams, length penalty, n-gram blocking and lengths, and the
    summaries are exactly what model.generate() gives with the model's generation_config; greedy: 1 beam,
    max_new_tokens, none of the checkpoint's settings. No reference model and no optimizer are built."""
    import torch
    import transformers
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen, original = [], transformers.GenerationMixin.generate

    def spy(self, *args, **kwargs):
        seen.append(kwargs["generation_config"])
        return original(self, *args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("eval-only must not build a reference model or an optimizer")

    monkeypatch.setattr(transformers.GenerationMixin, "generate", spy)
    monkeypatch.setattr(grpo, "frozen_copy", forbidden)
    monkeypatch.setattr(torch.optim, "AdamW", forbidden)
    _, validation = data_files
    out = tmp_path / "eval"
    assert grpo.main([*EVAL_ARGS, f"--model_name={summarizer_dir}", f"--validation_file={validation}",
                      *(("--eval_decoding=checkpoint",) if decoding == "checkpoint" else GREEDY_ARGS),
                      f"--output_dir={out}"]) == 0
    monkeypatch.undo()

    assert len(seen) == 3  # 8 articles in batches of 3
    for settings in seen:
        if decoding == "checkpoint":
            for name, value in BEAM_SETTINGS.items():
                assert getattr(settings, name) == value, name
        else:
            assert settings.num_beams == 1 and settings.do_sample is False and settings.max_new_tokens == 8
            assert settings.no_repeat_ngram_size in (None, 0) and settings.length_penalty in (None, 1.0)
            assert settings.min_length in (None, 0)

    (record,) = read_jsonl(out / "eval.jsonl")
    predictions = read_jsonl(out / "eval_predictions.jsonl")
    rows = read_jsonl(validation)
    assert record["articles"] == len(predictions) == len(rows) == 8  # all articles: --eval_samples not given
    assert record["eval_decoding"] == decoding and record["generation"]["num_beams"] == seen[0].num_beams
    assert [p["index"] for p in predictions] == list(range(8))
    assert [p["reference"] for p in predictions] == [r["highlights"] for r in rows]

    # The same summaries from plain transformers calls, batch by batch.
    model = AutoModelForSeq2SeqLM.from_pretrained(summarizer_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(summarizer_dir)
    expected = []
    for start in range(0, 8, 3):
        encoded = tokenizer([r["article"] for r in rows[start:start + 3]], max_length=64, truncation=True,
                            padding=True, return_tensors="pt")
        with torch.no_grad():
            output = (model.generate(**encoded) if decoding == "checkpoint" else  # the model's generation_config
                      model.generate(**encoded, num_beams=1, do_sample=False, max_new_tokens=8, min_length=0,
                                     no_repeat_ngram_size=0, length_penalty=1.0, forced_eos_token_id=None))
        expected += tokenizer.batch_decode(output, skip_special_tokens=True)
    assert [p["prediction"] for p in predictions] == expected
    if decoding == "checkpoint":  # min_length 5 and max_length 12 tokens, counted with the start token
        assert all(5 <= len(tokenizer(p)["input_ids"]) <= 12 for p in expected)
    scores = grpo.rouge_f1(expected, [r["highlights"] for r in rows])
    for key in ROUGE:
        assert [p[key] for p in predictions] == scores[key]
        assert record[key] == pytest.approx(np.mean(scores[key]))
        assert (record[f"{key}_ci_low"], record[f"{key}_ci_high"]) == grpo.bootstrap_ci(scores[key], seed=0)


def test_eval_only_reads_the_local_test_split_and_never_overwrites(grpo, summarizer_dir, local_test_split, tmp_path,
                                                                   monkeypatch, capsys):
    out = tmp_path / "eval"
    result = run_script(*EVAL_ARGS, f"--model_name={summarizer_dir}", "--eval_split=test",
                        f"--test_file={local_test_split}",
                        "--eval_decoding=checkpoint", f"--output_dir={out}", cwd=tmp_path)
    check_ok(result)
    (record,) = read_jsonl(out / "eval.jsonl")
    assert record["eval_split"] == "test" and record["data"] == str(local_test_split) and record["articles"] == 5
    assert record["sentence_splitter"] in ("punkt_tab", "regex")
    predictions = read_jsonl(out / "eval_predictions.jsonl")
    assert [p["reference"] for p in predictions] == [r["highlights"] for r in read_jsonl(local_test_split)]
    assert "eval-only" in result.stderr and "rougeL=" in result.stderr

    # A second evaluation into the same folder is refused with one line; the first one's files stay as they were.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = (out / "eval_predictions.jsonl").read_bytes(), (out / "eval.jsonl").read_bytes()
    capsys.readouterr()
    assert grpo.main([*EVAL_ARGS, f"--model_name={summarizer_dir}", "--eval_split=test",
                      f"--test_file={local_test_split}",
                      "--eval_samples=2", *GREEDY_ARGS, f"--output_dir={out}"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and len(error.splitlines()) == 1
    assert "eval_predictions.jsonl" in error and "--output_dir" in error and "--overwrite_output_dir=True" in error
    assert ((out / "eval_predictions.jsonl").read_bytes(), (out / "eval.jsonl").read_bytes()) == before
    # ... unless asked to: the predictions are replaced, and eval.jsonl gains a line
    assert grpo.main([*EVAL_ARGS, f"--model_name={summarizer_dir}", "--eval_split=test",
                      f"--test_file={local_test_split}",
                      "--eval_samples=2", *GREEDY_ARGS, f"--output_dir={out}", "--overwrite_output_dir=True"]) == 0
    assert [p["index"] for p in read_jsonl(out / "eval_predictions.jsonl")] == [0, 1]
    assert [r["articles"] for r in read_jsonl(out / "eval.jsonl")] == [5, 2]

    # --eval_samples given: the first eval_samples articles of the split.
    assert grpo.main([*EVAL_ARGS, f"--model_name={summarizer_dir}", "--eval_split=test",
                      f"--test_file={local_test_split}",
                      "--eval_samples=2", *GREEDY_ARGS, f"--output_dir={tmp_path / 'two'}"]) == 0
    assert [p["index"] for p in read_jsonl(tmp_path / "two" / "eval_predictions.jsonl")] == [0, 1]
    assert read_jsonl(tmp_path / "two" / "eval.jsonl")[0]["articles"] == 2


def test_eval_split_from_an_unreachable_hub_names_the_local_flags(grpo, monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    config = dataclasses.replace(grpo.Config(), eval_only=True, eval_split="test")
    with pytest.raises(grpo.UserError) as info:
        grpo.load_eval_split(config, set(), print)
    message = str(info.value)
    assert "test split" in message and "--test_file" in message and len(message.splitlines()) == 1


# --------------------------------------------------------------------------------------------------
# Training runs: intervals and the paired before/after test in eval.jsonl; --eval_samples=0
# --------------------------------------------------------------------------------------------------
TRAIN_ARGS = ("--max_steps=2", "--batch_size=2", "--group_size=2", "--micro_batch_size=4", "--max_new_tokens=6",
              "--max_source_length=48", "--eval_every=1", "--eval_samples=5", "--save_every=2", "--device=cpu",
              "--learning_rate=1e-3")


def test_training_writes_intervals_predictions_and_the_paired_change(grpo, tiny_bart_dir, data_files, tmp_path,
                                                                      monkeypatch, capfd):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    train, validation = data_files
    out = tmp_path / "run"
    assert grpo.main([f"--model_name={tiny_bart_dir}", f"--train_file={train}", f"--validation_file={validation}",
                      *TRAIN_ARGS, f"--output_dir={out}"]) == 0
    stderr = capfd.readouterr().err
    evals = read_jsonl(out / "eval.jsonl")
    predictions = read_jsonl(out / "eval_predictions.jsonl")
    assert [e["step"] for e in evals] == [0, 1, 2]
    for e in evals:
        for key in ROUGE:
            assert e[f"{key}_ci_low"] <= e[key] <= e[f"{key}_ci_high"]
        assert e["sentence_splitter"] in ("punkt_tab", "regex") and e["eval_decoding"] == "greedy"
        rows = [p for p in predictions if p["step"] == e["step"]]
        assert [p["index"] for p in rows] == list(range(5)) and e["articles"] == 5
        assert e["rougeL"] == pytest.approx(np.mean([p["rougeL"] for p in rows]))
    assert not any(key.endswith("_change") for key in evals[0]) and not any(k.endswith("_change") for k in evals[1])
    last = evals[-1]
    assert last["change_from_step"] == 0
    for key in ROUGE:
        before = [p[key] for p in predictions if p["step"] == 0]
        after = [p[key] for p in predictions if p["step"] == 2]
        assert (last[f"{key}_change"], last[f"{key}_change_ci_low"], last[f"{key}_change_ci_high"]) == \
            pytest.approx(grpo.paired_bootstrap(before, after, seed=0))
    assert "after GRPO minus before" in stderr and "Traceback" not in stderr

    # Evaluation only on the run's final/ gives the run's own last evaluation: same articles, same greedy summaries.
    assert grpo.main(["--eval_only=True", f"--model_name={out / 'final'}", f"--validation_file={validation}",
                      "--eval_samples=5", "--max_new_tokens=6", "--max_source_length=48", "--device=cpu",
                      f"--output_dir={tmp_path / 'final_eval'}"]) == 0
    (record,) = read_jsonl(tmp_path / "final_eval" / "eval.jsonl")
    assert [p["prediction"] for p in read_jsonl(tmp_path / "final_eval" / "eval_predictions.jsonl")] == \
        [p["prediction"] for p in predictions if p["step"] == 2]
    for key in ROUGE:
        assert (record[key], record[f"{key}_ci_low"], record[f"{key}_ci_high"]) == \
            (last[key], last[f"{key}_ci_low"], last[f"{key}_ci_high"])


def test_eval_samples_zero_turns_evaluation_off(grpo, tiny_bart_dir, data_files, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    train, validation = data_files
    out = tmp_path / "run"
    assert grpo.main([f"--model_name={tiny_bart_dir}", f"--train_file={train}", *TRAIN_ARGS, "--eval_samples=0",
                      f"--output_dir={out}"]) == 0
    stderr = capfd.readouterr().err
    assert len(read_jsonl(out / "metrics.jsonl")) == 2
    for name in ("eval.jsonl", "eval_predictions.jsonl", "eval_examples.jsonl", "best"):
        assert not (out / name).exists(), name
    assert (out / "final" / "config.json").is_file()
    assert "holding out" not in stderr and "Traceback" not in stderr  # every training row is used for training


# --------------------------------------------------------------------------------------------------
# summary_quality: hand-computed cases
# --------------------------------------------------------------------------------------------------
def test_summary_entities_are_numbers_and_capitalised_words_inside_sentences(grpo):
    text = "Sales up 4 percent, said Dax Dale.\nCorvane says 20 thousand. The Mill closed."
    # "Sales", "Corvane" and "The" start a sentence or line and are left out; "Mill" is inside one
    assert grpo.summary_entities(text) == {"4", "dax", "dale", "20", "mill"}
    assert grpo.summary_entities("no names here at all") == set()


def test_summary_quality_hand_computed(grpo):
    predictions = ["dax dale wins 4 . . . .", "the the the the"]
    references = ["Sales up 4 percent, said Dax Dale.", "Hello to Bob"]
    articles = ["Dax Dale 4 wins", "nothing"]
    quality = grpo.summary_quality(predictions, references, articles)
    expected = {
        "entity_recall": (3 / 3 + 0 / 1) / 2,  # {4, dax, dale} all found; {bob} missing
        "invented_entities": 0.0,  # summary 1's entities: 4, dax, dale (names by the reference's casing), all in
        "invented_summaries": 0.0,  # its article
        "repeated_trigrams": (0 / 2 + 1 / 2) / 2,  # "the the the" twice among 2 trigrams
        "punctuation_fraction": (4 / 8 + 0 / 4) / 2,
        "trailing_punctuation": (3 + 0) / 2,  # 4 trailing "." minus the one a sentence ends with
        "top_summary_share": 1 / 2,
    }
    assert quality == pytest.approx(expected)


def test_summary_quality_flags_invented_numbers_and_names_and_collapse(grpo):
    quality = grpo.summary_quality(["Mayor Cora Brask won 61 percent.", "x", "x", "x"], ["Cora won."] * 4,
                                   ["Cora Brask won 55 percent."] * 4)
    # the cased summary's entities: cora, brask, 61; 61 is not in the article
    assert quality["invented_entities"] == pytest.approx((1 / 3) / 4)
    assert quality["invented_summaries"] == pytest.approx(1 / 4)
    assert quality["top_summary_share"] == pytest.approx(3 / 4)
    assert quality["entity_recall"] is None  # "Cora" starts the reference: no entity to recall, left out of the mean
    quality = grpo.summary_quality(["a . b ."], ["A said Bo."], ["Bo"])
    assert quality["entity_recall"] == 0.0 and quality["trailing_punctuation"] == 0.0


def test_invented_names_are_caught_in_lowercased_summaries(grpo):
    articles = ["Mayor Dax Dale won 4 votes.", "Mayor Cora Hale lost.", "He met The Survey team in the hall."]
    references = ["Mayor Dax Dale won.", "Mayor Cora Hale lost.", "They met The Survey team."]
    predictions = ["dax hale won the 4 votes.", "cora hale lost.", "the survey met."]
    # names: capitalised inside a sentence of an article or reference, never in lowercase there: dax, dale, cora,
    # hale, survey ("the" is written in lowercase too); summary 1 names hale, whom its article does not mention
    quality = grpo.summary_quality(predictions, references, articles)
    assert quality["invented_entities"] == pytest.approx((1 / 3 + 0 + 0) / 3)  # {dax, hale, 4}: hale invented
    assert quality["invented_summaries"] == pytest.approx(1 / 3)


def test_summary_quality_of_nothing_is_zero_not_an_error(grpo):
    assert grpo.summary_quality([""], ["Ref 12."], ["12"])["punctuation_fraction"] == 0.0
    assert grpo.summary_quality([], [], [])["top_summary_share"] == 0.0


# --------------------------------------------------------------------------------------------------
# Evaluation the Hugging Face way: the training command plus --eval_only=True; what eval-only refuses
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
# --eval_decoding=checkpoint on a generation_config without a length
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
# Degenerate summaries: empty ones, special tokens only, entity recall, punctuation runs
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
