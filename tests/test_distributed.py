"""torchrun with 2 CPU processes (gloo): the DDP path of the same file."""

from __future__ import annotations

import re

from conftest import TORCHRUN_ARGS, check_ok, read_jsonl, run_torchrun


def test_batch_indices_give_each_process_its_own_articles(grpo):
    """Within a step the two ranks' rows are disjoint, and together they are the global batch."""
    for step in range(5):
        rank0 = grpo.batch_indices(step, 4, 30, seed=0, rank=0, world_size=2)
        rank1 = grpo.batch_indices(step, 4, 30, seed=0, rank=1, world_size=2)
        assert not set(rank0) & set(rank1)
        assert rank0 + rank1 == grpo.batch_indices(step, 8, 30, seed=0)


def test_torchrun_two_processes(tiny_bart_dir, data_files, tmp_path):
    train_file, validation_file = data_files
    output_dir = tmp_path / "ddp"
    flags = (f"--model_name={tiny_bart_dir}", f"--train_file={train_file}", f"--validation_file={validation_file}",
             *TORCHRUN_ARGS, "--learning_rate=1e-3", f"--output_dir={output_dir}")
    result = run_torchrun(*flags)
    check_ok(result)
    match = re.search(r"weights identical on all 2 processes \(checksum (\S+)\)", result.stderr)
    assert match, result.stderr[-3000:]
    metrics = read_jsonl(output_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]  # rank 0 alone writes, one line per step
    assert all(m["articles"] == 2 * 2 for m in metrics)  # 2 processes x batch_size
    evaluations = read_jsonl(output_dir / "eval.jsonl")
    assert [e["step"] for e in evaluations] == [0, 2]
    assert (output_dir / "final" / "config.json").exists()

    # resume under DDP: two more steps from the step-2 checkpoint (a repeated flag: the last one wins)
    resumed = run_torchrun(*flags, "--max_steps=4", "--resume=True")
    check_ok(resumed)
    assert "resumed from" in resumed.stderr and "weights identical on all 2 processes" in resumed.stderr
    metrics = read_jsonl(output_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
