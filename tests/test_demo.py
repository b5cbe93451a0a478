"""The offline demo and the benchmark, shortened (the same code path as the full runs, fewer steps): the demo
world, whose most likely phrasing is not the ROUGE-best one, the whole pipeline, and the comparison of start /
control (more SFT) / GRPO over several seeds, and a finished demo resumed."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from conftest import check_ok, main_in_process, read_jsonl, run_script

SHORT_DEMO = ["--demo", "--sft_steps=15", "--sft_batch_size=8", "--max_steps=3", "--batch_size=2", "--group_size=4",
              "--micro_batch_size=8", "--eval_every=2", "--eval_samples=6", "--save_every=2", "--max_new_tokens=12",
              "--sft_eval_every=5"]


def untimed_metrics(output_dir) -> list[dict]:
    """metrics.jsonl without the wall-clock fields (time_*, seconds), which differ between two equal runs."""
    return [{k: v for k, v in m.items() if not k.startswith("time_") and k != "seconds"}
            for m in read_jsonl(output_dir / "metrics.jsonl")]


def test_short_demo_runs_the_whole_pipeline_and_is_deterministic(grpo, tmp_path):
    first = run_script(*SHORT_DEMO, f"--output_dir={tmp_path / 'a'}")
    check_ok(first)
    output = tmp_path / "a"
    # the synthetic data goes through the local-file path, the tiny model through from_pretrained
    for name in ("demo/train.jsonl", "demo/validation.jsonl", "demo/model/config.json", "demo/model/tokenizer.json",
                 "reference/config.json", "final/config.json", "best/config.json", "curves.png"):
        assert (output / name).exists(), name
    train = {row["article"] for row in read_jsonl(output / "demo/train.jsonl")}
    held_out = {row["article"] for row in read_jsonl(output / "demo/validation.jsonl")}
    assert train and held_out and not train & held_out
    evaluations = read_jsonl(output / "eval.jsonl")
    assert [e["step"] for e in evaluations] == [0, 2, 3]  # first: the SFT checkpoint GRPO starts from; last: final
    assert [m["step"] for m in read_jsonl(output / "metrics.jsonl")] == [1, 2, 3]
    # the start / control / grpo table and three examples are printed, and the table is written as JSON
    assert "control" in first.stdout and "rougeL grpo - control" in first.stdout
    assert "before GRPO" in first.stdout and "after GRPO" in first.stdout
    comparison = json.loads((output / "comparison.json").read_text())
    assert comparison["steps"] == 3
    assert comparison["start"]["rougeL"] == evaluations[0]["rougeL"]
    assert comparison["grpo"]["rougeL"] == evaluations[-1]["rougeL"]
    # the fourth row: the same start and GRPO steps with --invented_fact_penalty, run in fact_penalty/
    penalized = read_jsonl(output / grpo.FACT_PENALTY_DIR / "eval.jsonl")
    assert [e["step"] for e in penalized] == [0, 2, 3] and penalized[0]["rougeL"] == comparison["start"]["rougeL"]
    assert comparison["grpo_fact_penalty"]["rougeL"] == penalized[-1]["rougeL"]
    saved = json.loads((output / grpo.FACT_PENALTY_DIR / "run_config.json").read_text())
    assert saved["invented_fact_penalty"] == comparison["invented_fact_penalty"] == grpo.DEMO_FACT_PENALTY > 0
    assert saved["model_name"] == str(output / "reference") and saved["sft_steps"] == 0 and saved["seed"] == 0
    assert "rougeL fact_penalty - control" in first.stdout and first.stdout.count("with penalty:") == 3
    for row in grpo.DEMO_ROWS:
        for key in ("rouge1", "rouge2", "rougeL", "rougeLsum", "gen_length", "ref_length", "distinct_fraction",
                    "entity_recall", "repeated_trigrams", "trailing_punctuation", "top_summary_share"):
            assert isinstance(comparison[row][key], float), (row, key)
    assert first.stdout.count("example ") == 3 and "reference:" in first.stdout

    second = main_in_process(grpo, *SHORT_DEMO, f"--output_dir={tmp_path / 'b'}", child_threads=True)
    check_ok(second)
    assert read_jsonl(tmp_path / "b" / "eval.jsonl") == evaluations  # same seed, same numbers
    assert json.loads((tmp_path / "b" / "comparison.json").read_text()) == comparison  # the control's too
    assert untimed_metrics(output) == untimed_metrics(tmp_path / "b")
    sft_curve = read_jsonl(output / "sft_eval.jsonl")  # held-out scores along SFT, before the start
    assert [r["sft_step"] for r in sft_curve] == [5, 10] and read_jsonl(tmp_path / "b" / "sft_eval.jsonl") == sft_curve


def test_benchmark_prints_and_writes_every_phase(tmp_path):
    result = run_script("--benchmark", "--max_steps=1", "--batch_size=2", "--group_size=4", "--micro_batch_size=8",
                        "--max_new_tokens=6", "--eval_samples=4", f"--output_dir={tmp_path}")
    check_ok(result)
    numbers = json.loads((tmp_path / "benchmark.json").read_text())
    for key in ("steps_per_second", "articles_per_second", "generated_tokens_per_second", "share_generate",
                "share_reward", "share_reference", "share_forward", "share_backward", "share_optimizer",
                "peak_cpu_memory_mib", "score_encoder_once_ms", "score_encoder_per_sample_ms", "rouge_ms",
                "rouge_score_ms"):
        assert numbers[key] > 0, key
        assert key in result.stdout
    assert 0.5 < sum(v for k, v in numbers.items() if k.startswith("share_")) <= 1.0 + 1e-9


def test_demo_files_follow_the_seed_and_are_kept_on_resume(grpo, tmp_path):
    """A fresh --demo run rewrites the synthetic data for its own seed; a resumed one keeps what the run used."""
    import dataclasses

    def train_text(seed: int, resume: bool) -> str:
        config = dataclasses.replace(grpo.Config(demo=True), output_dir=str(tmp_path), seed=seed, resume=resume,
                                     eval_samples=4)
        prepared = grpo.prepare_demo(config, grpo.Distributed(), log=lambda message: None)
        assert prepared.model_name == str(tmp_path / "demo" / "model")
        return (tmp_path / "demo" / "train.jsonl").read_text()

    seed_0 = train_text(seed=0, resume=False)
    seed_1 = train_text(seed=1, resume=False)
    assert seed_0 != seed_1
    assert train_text(seed=0, resume=True) == seed_1  # resuming the seed-1 run keeps its data
    assert train_text(seed=0, resume=False) == seed_0  # and the same seed gives the same data again


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
# the comparison over seeds, shortened (no score thresholds); what --resume may read back
# --------------------------------------------------------------------------------------------------
SHORT = ["--demo", "--sft_steps=6", "--sft_batch_size=4", "--max_steps=2", "--batch_size=2", "--group_size=4",
         "--micro_batch_size=8", "--eval_every=2", "--eval_samples=4", "--save_every=2", "--max_new_tokens=8"]


def test_demo_seeds_writes_each_comparison_and_the_table_over_seeds(grpo, tmp_path, capsys):
    flags = (*SHORT, "--demo_seeds=2", "--seed=4", f"--output_dir={tmp_path}", "--sft_eval_every=4", "--max_steps=4")
    result = run_script(*flags)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = grpo.DEMO_ROWS
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
        assert [p["step"] for p in curves["grpo_fact_penalty"]] == [0, 2, 4]
        assert curves["control"][-1]["rougeL"] == comparison["control"]["rougeL"]
        assert [p["rougeL"] for p in curves["grpo"]] == [e["rougeL"] for e in evaluations]
        assert (tmp_path / f"seed_{seed}" / "comparison.png").stat().st_size > 0
        best_sft = max(p["rougeL"] for p in curves["sft"] + curves["control"])
        assert comparison["best_sft_rougeL"] == best_sft >= comparison["control"]["rougeL"]
        assert comparison["grpo_minus_best_sft_rougeL"] == pytest.approx(comparison["grpo"]["rougeL"] - best_sft)
        control_predictions = read_jsonl(tmp_path / f"seed_{seed}" / "control_predictions.jsonl")  # to audit it
        assert np.mean([r["rougeL"] for r in control_predictions]) == pytest.approx(comparison["control"]["rougeL"])
        for name, before, after in [("grpo_minus_control", "control", "grpo"), ("grpo_minus_start", "start", "grpo"),
                                    ("control_minus_start", "start", "control"),
                                    ("grpo_fact_penalty_minus_grpo", "grpo", "grpo_fact_penalty"),
                                    ("grpo_fact_penalty_minus_control", "control", "grpo_fact_penalty")]:  # paired
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
    assert len(summary["grpo_fact_penalty_minus_grpo"]) == len(summary["grpo_fact_penalty_minus_control"]) == 2
    assert "grpo_fact_penalty - grpo" in result.stdout and "rougeL fact_penalty - control" in result.stdout

    # --resume=True (what a stopped run prints): finished seeds are read back, not trained again
    (tmp_path / "seed_5" / "comparison.json").unlink()  # as if stopped after seed 5's GRPO steps, before its report
    resumed = main_in_process(grpo, *flags, "--resume=True", child_threads=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("entity_recall") == 2  # seed 5's report and the table over seeds; seed 4 read back
    resumed_summary = json.loads((tmp_path / "comparison_seeds.json").read_text())
    assert [resumed_summary[row] for row in rows] == [summary[row] for row in rows]

    # a finished seed is read back only if it ran with the same flags and this script wrote its report; the
    # refusals come before any training, so main() runs them in this process
    def refused(*extra: str) -> str:
        code = grpo.main([*flags, "--resume=True", *extra])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and lines, lines
        return lines[-1]

    line = refused("--temperature=0.9")
    assert "seed_4" in line and "--temperature: 0.7 -> 0.9" in line, line
    assert "--max_steps: 4 -> 5" in refused("--max_steps=5")  # N of the comparison: not mixed
    older = json.loads((tmp_path / "seed_4" / "comparison.json").read_text())
    del older["curves"], older["grpo"]["invented_summaries"]  # as an older version of the script wrote it
    (tmp_path / "seed_4" / "comparison.json").write_text(json.dumps(older))
    line = refused()
    assert "lacks curves, grpo.invented_summaries" in line and "--overwrite_output_dir" in line, line
    other = json.loads((tmp_path / "seed_5" / "comparison.json").read_text())
    other["invented_fact_penalty"] = grpo.DEMO_FACT_PENALTY * 2  # a fourth row made with another lambda: not mixed in
    (tmp_path / "seed_5" / "comparison.json").write_text(json.dumps(other))
    (tmp_path / "seed_4" / "comparison.json").unlink()
    line = refused()
    assert "seed_5" in line and "grpo_fact_penalty row's lambda" in line, line
    # a fresh --demo_seeds run into the same folder would replace comparison_seeds.json: refused, nothing written
    before = (tmp_path / "comparison_seeds.json").read_bytes()
    assert grpo.main([*SHORT, "--demo_seeds=2", "--seed=6", f"--output_dir={tmp_path}"]) == 2
    assert "comparison_seeds.json" in capsys.readouterr().err.strip().splitlines()[-1]
    assert (tmp_path / "comparison_seeds.json").read_bytes() == before and not (tmp_path / "seed_6").exists()


# --------------------------------------------------------------------------------------------------
# a finished demo resumed: one line, exit 0, the files named
# --------------------------------------------------------------------------------------------------
def test_resuming_a_finished_demo_names_its_files_and_trains_nothing(grpo, tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    out.mkdir()
    config, given = grpo.parse_args(["--demo", f"--output_dir={out}"])
    (out / "run_config.json").write_text(json.dumps(dataclasses.asdict(grpo.pointed_at_demo_files(config, given))))
    comparison = {key: 0 for key in grpo.DEMO_REPORT_KEYS} | {"invented_fact_penalty": grpo.DEMO_FACT_PENALTY}
    comparison.update({row: {key: 0.0 for key in grpo.COMPARISON_KEYS} for row in grpo.DEMO_ROWS})
    (out / "comparison.json").write_text(json.dumps(comparison))
    monkeypatch.setattr(grpo, "train", lambda *args: pytest.fail("a finished demo must not train again"))
    assert grpo.main(["--demo", f"--output_dir={out}", "--resume=True"]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{out}/comparison.json" in lines[0] and f"{out}/comparison.png" in lines[0], lines
    # other flags than the finished run's: refused, as for the seeds of --demo_seeds
    assert grpo.main(["--demo", f"--output_dir={out}", "--resume=True", "--max_steps=7"]) == 2
    assert "--overwrite_output_dir=True" in capsys.readouterr().err
