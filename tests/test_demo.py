"""The offline demo and the benchmark, shortened: the same code path as the full runs, fewer steps."""

from __future__ import annotations

import json

from conftest import check_ok, read_jsonl, run_script

SHORT_DEMO = ["--demo", "--sft_steps=15", "--sft_batch_size=8", "--max_steps=3", "--batch_size=2", "--group_size=4",
              "--micro_batch_size=8", "--eval_every=2", "--eval_samples=6", "--save_every=2", "--max_new_tokens=12",
              "--sft_eval_every=5"]


def untimed_metrics(output_dir) -> list[dict]:
    """metrics.jsonl without the wall-clock fields (time_*, seconds), which differ between two equal runs."""
    return [{k: v for k, v in m.items() if not k.startswith("time_") and k != "seconds"}
            for m in read_jsonl(output_dir / "metrics.jsonl")]


def test_short_demo_runs_the_whole_pipeline_and_is_deterministic(tmp_path):
    first = run_script(*SHORT_DEMO, f"--output_dir={tmp_path / 'a'}", timeout=300)
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
    for row in ("start", "control", "grpo"):
        for key in ("rouge1", "rouge2", "rougeL", "rougeLsum", "gen_length", "ref_length", "distinct_fraction",
                    "entity_recall", "repeated_trigrams", "trailing_punctuation", "top_summary_share"):
            assert isinstance(comparison[row][key], float), (row, key)
    assert first.stdout.count("example ") == 3 and "reference:" in first.stdout

    second = run_script(*SHORT_DEMO, f"--output_dir={tmp_path / 'b'}", timeout=300)
    check_ok(second)
    assert read_jsonl(tmp_path / "b" / "eval.jsonl") == evaluations  # same seed, same numbers
    assert json.loads((tmp_path / "b" / "comparison.json").read_text()) == comparison  # the control's too
    assert untimed_metrics(output) == untimed_metrics(tmp_path / "b")
    sft_curve = read_jsonl(output / "sft_eval.jsonl")  # held-out scores along SFT, before the start
    assert [r["sft_step"] for r in sft_curve] == [5, 10] and read_jsonl(tmp_path / "b" / "sft_eval.jsonl") == sft_curve


def test_benchmark_prints_and_writes_every_phase(tmp_path):
    result = run_script("--benchmark", "--max_steps=1", "--batch_size=2", "--group_size=4", "--micro_batch_size=8",
                        "--max_new_tokens=6", "--eval_samples=4", f"--output_dir={tmp_path}", timeout=300)
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
