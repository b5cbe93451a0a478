"""The demo's comparison of start / control (more SFT) / GRPO, and the summary quality measures behind it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import read_jsonl, run_script


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
# the demo world: maximum likelihood's most likely phrasing is not the ROUGE-best one
# --------------------------------------------------------------------------------------------------
def test_demo_world_most_frequent_phrasing_is_not_the_rouge_best(grpo, monkeypatch):
    def corpus(weights):
        monkeypatch.setattr(grpo, "DEMO_PHRASING_WEIGHTS", weights)
        return [row["highlights"] for row in grpo.make_synthetic_corpus(120, seed=3)]

    weights = grpo.DEMO_PHRASING_WEIGHTS
    assert weights[0] == max(weights) and weights[0] < sum(weights[1:])  # the mode, yet a minority
    references = corpus(weights)
    vague, factual = corpus((1, 0, 0, 0)), corpus((0, 1, 0, 0))  # same articles (same draws), phrasing forced
    rouge_vague = np.mean(grpo.rouge_f1(vague, references)["rougeL"])
    rouge_factual = np.mean(grpo.rouge_f1(factual, references)["rougeL"])
    assert rouge_factual > rouge_vague + 0.05


# --------------------------------------------------------------------------------------------------
# the comparison pipeline, shortened (no score thresholds)
# --------------------------------------------------------------------------------------------------
SHORT = ["--demo", "--sft_steps=6", "--sft_batch_size=4", "--max_steps=2", "--batch_size=2", "--group_size=4",
         "--micro_batch_size=8", "--eval_every=2", "--eval_samples=4", "--save_every=2", "--max_new_tokens=8"]


def test_demo_seeds_writes_each_comparison_and_the_table_over_seeds(grpo, tmp_path):
    flags = (*SHORT, "--demo_seeds=2", "--seed=4", f"--output_dir={tmp_path}", "--sft_eval_every=4", "--max_steps=4")
    result = run_script(*flags, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = ("start", "control", "grpo")
    for seed in (4, 5):
        comparison = json.loads((tmp_path / f"seed_{seed}" / "comparison.json").read_text())
        assert comparison["steps"] == 4 and comparison["seed"] == seed
        for row in rows:
            assert set(grpo.COMPARISON_KEYS) <= set(comparison[row]), row
        evaluations = read_jsonl(tmp_path / f"seed_{seed}" / "eval.jsonl")  # start and grpo are the run's evaluations
        assert comparison["start"]["rougeL"] == evaluations[0]["rougeL"]
        assert comparison["grpo"]["rougeL"] == evaluations[-1]["rougeL"]
        # the curves: SFT evaluated at step 4 of 6, then the start; control and GRPO every 2 of their 4 steps
        sft_evaluations = read_jsonl(tmp_path / f"seed_{seed}" / "sft_eval.jsonl")
        assert [r["sft_step"] for r in sft_evaluations] == [4]
        curves = comparison["curves"]
        assert [p["step"] for p in curves["sft"]] == [4, 6]
        assert curves["sft"][0]["rougeL"] == sft_evaluations[0]["rougeL"]
        assert curves["sft"][-1]["rougeL"] == comparison["start"]["rougeL"] == curves["control"][0]["rougeL"]
        assert [p["step"] for p in curves["control"]] == [p["step"] for p in curves["grpo"]] == [0, 2, 4]
        assert curves["control"][-1]["rougeL"] == comparison["control"]["rougeL"]
        assert [p["rougeL"] for p in curves["grpo"]] == [e["rougeL"] for e in evaluations]
        assert (tmp_path / f"seed_{seed}" / "comparison.png").stat().st_size > 0
        best_sft = max(p["rougeL"] for p in curves["sft"] + curves["control"])
        assert comparison["best_sft_rougeL"] == best_sft >= comparison["control"]["rougeL"]
        assert comparison["grpo_minus_best_sft_rougeL"] == pytest.approx(comparison["grpo"]["rougeL"] - best_sft)
        control_predictions = read_jsonl(tmp_path / f"seed_{seed}" / "control_predictions.jsonl")  # to audit it
        assert np.mean([r["rougeL"] for r in control_predictions]) == pytest.approx(comparison["control"]["rougeL"])
        for name, before, after in [("grpo_minus_control", "control", "grpo"), ("grpo_minus_start", "start", "grpo"),
                                    ("control_minus_start", "start", "control")]:  # paired: mean of the differences
            change = comparison[name]
            assert change["rougeL_change"] == pytest.approx(comparison[after]["rougeL"] - comparison[before]["rougeL"])
            assert change["rougeL_change_ci_low"] <= change["rougeL_change"] <= change["rougeL_change_ci_high"]
    summary = json.loads((tmp_path / "comparison_seeds.json").read_text())
    assert summary["seeds"] == [4, 5]
    for row in rows:
        values = summary[row]["rougeL"]["values"]
        assert len(values) == 2 and summary[row]["rougeL"]["mean"] == pytest.approx(np.mean(values))
    assert "rougeL grpo - control" in result.stdout and "+-" in result.stdout
    assert result.stdout.count("entity_recall") == 3  # the table of each seed and the table over seeds
    assert [f"seed {seed}: rougeL, paired 95% CI: grpo - control" in result.stdout for seed in (4, 5)] == [True, True]
    assert len(summary["control_minus_start"]) == 2 and "rougeL_change_ci_high" in summary["control_minus_start"][1]
    assert len(summary["grpo_minus_best_sft_rougeL"]) == 2 and "rougeL grpo - best SFT" in result.stdout
    assert len(summary["grpo_minus_control"]) == 2 and "rougeL_change_ci_low" in summary["grpo_minus_control"][0]

    # --resume=True (what a stopped run prints): finished seeds are read back, not trained again
    (tmp_path / "seed_5" / "comparison.json").unlink()  # as if stopped after seed 5's GRPO steps, before its report
    resumed = run_script(*flags, "--resume=True", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("entity_recall") == 2  # seed 5's report and the table over seeds; seed 4 read back
    assert json.loads((tmp_path / "comparison_seeds.json").read_text())["grpo"] == summary["grpo"]

    # a finished seed is read back only if it ran with the same flags and this script wrote its report
    changed = run_script(*flags, "--resume=True", "--temperature=0.9", timeout=300)
    lines = changed.stderr.strip().splitlines()
    assert changed.returncode == 2 and "seed_4" in lines[-1] and "--temperature: 0.7 -> 0.9" in lines[-1], lines
    longer = run_script(*flags, "--resume=True", "--max_steps=5", timeout=300)  # N of the comparison: not mixed
    assert longer.returncode == 2 and "--max_steps: 4 -> 5" in longer.stderr.strip().splitlines()[-1]
    older = json.loads((tmp_path / "seed_4" / "comparison.json").read_text())
    del older["curves"], older["grpo"]["invented_summaries"]  # as an older version of the script wrote it
    (tmp_path / "seed_4" / "comparison.json").write_text(json.dumps(older))
    stale = run_script(*flags, "--resume=True", timeout=300)
    lines = stale.stderr.strip().splitlines()
    assert stale.returncode == 2 and "lacks curves, grpo.invented_summaries" in lines[-1], lines
    assert "--overwrite_output_dir" in lines[-1]
    # a fresh --demo_seeds run into the same folder would replace comparison_seeds.json: refused, nothing written
    before = (tmp_path / "comparison_seeds.json").read_bytes()
    fresh = run_script(*SHORT, "--demo_seeds=2", "--seed=6", f"--output_dir={tmp_path}", timeout=300)
    assert fresh.returncode == 2 and "comparison_seeds.json" in fresh.stderr.strip().splitlines()[-1]
    assert (tmp_path / "comparison_seeds.json").read_bytes() == before and not (tmp_path / "seed_6").exists()


@pytest.mark.parametrize("argv", [["--demo", "--demo_seeds=0"], ["--demo_seeds=3"]])
def test_bad_demo_seeds_is_one_error_line(grpo, capsys, argv):
    assert grpo.main(argv) == 2  # a count below 1, or seeds without --demo (never silently ignored)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--demo_seeds" in lines[0]


@pytest.mark.parametrize("argv, flag", [
    (["--demo", "--sft_steps=0"], "--sft_steps"),  # no start to compare from
    (["--demo", "--max_steps=0"], "--max_steps"),
    (["--demo", "--num_examples=0"], "--num_examples"),
    (["--demo", "--benchmark", "--demo_seeds=2"], "--demo_seeds"),
])
def test_demo_flags_that_cannot_make_the_comparison_are_one_error_line(grpo, capsys, argv, flag):
    assert grpo.main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and flag in lines[0], lines


def test_demo_under_torchrun_is_one_error_line(grpo, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert grpo.main(["--demo"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "torchrun" in lines[0], lines


# --------------------------------------------------------------------------------------------------
# SFT: its schedule, and the held-out curve that shows whether more SFT still helps
# --------------------------------------------------------------------------------------------------
def test_sft_curve_scores_every_n_steps_and_changes_nothing_in_the_training(grpo, tiny_bart_dir, data_files,
                                                                             monkeypatch):
    import torch
    import transformers

    train_file, validation_file = data_files
    config = grpo.Config(model_name=str(tiny_bart_dir), train_file=str(train_file),
                         validation_file=str(validation_file),
                         max_new_tokens=8, max_source_length=64, eval_samples=4, eval_batch_size=4, sft_steps=5,
                         sft_batch_size=4, sft_learning_rate=1e-2, sft_lr_scheduler="constant_with_warmup",
                         warmup_steps=1, device="cpu")
    device, dist = torch.device("cpu"), grpo.Distributed()
    schedules = []
    real_get_scheduler = transformers.get_scheduler
    monkeypatch.setattr(transformers, "get_scheduler",
                        lambda name, *args, **kw: schedules.append(name) or real_get_scheduler(name, *args, **kw))

    def train(sft_eval_every):
        torch.manual_seed(0)
        run_config = grpo.dataclasses.replace(config, sft_eval_every=sft_eval_every)
        train_rows, held_out = grpo.load_data(run_config, log=lambda message: None)
        policy, tokenizer = grpo.load_policy_and_tokenizer(run_config, device)
        modes = {True: [], False: []}  # train/eval mode of each encoder call: SFT steps (with gradients), scoring
        policy.get_encoder().register_forward_pre_hook(
            lambda module, args: modes[torch.is_grad_enabled()].append(module.training))
        curve = grpo.sft_warmup(grpo.GroupedSeq2Seq(policy), policy, tokenizer, train_rows, run_config, device, dist,
                                lambda message: None, held_out)
        assert modes[True] == [True] * run_config.sft_steps  # SFT steps in train mode, also after scoring
        assert len(modes[False]) == (2 if sft_eval_every else 0) and not any(modes[False])  # scoring in eval mode
        return policy, curve, torch.get_rng_state()

    plain, no_curve, plain_rng = train(sft_eval_every=0)
    scored, curve, scored_rng = train(sft_eval_every=2)
    assert torch.equal(plain_rng, scored_rng)  # scoring drew no random numbers (dropout masks would differ)
    assert schedules == ["constant_with_warmup"] * 2
    assert no_curve == [] and [r["sft_step"] for r in curve] == [2, 4]  # before the last step: the caller scores it
    assert all(0 <= r["rougeL"] <= 1 and r["loss"] > 0 and "entity_recall" in r for r in curve)
    assert not scored.training  # back in GRPO mode after SFT
    for a, b in zip(plain.state_dict().values(), scored.state_dict().values()):  # scoring moved no weight
        assert torch.equal(a, b)
