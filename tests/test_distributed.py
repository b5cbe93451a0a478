"""torchrun with 2 CPU processes (gloo): the DDP path of the same file."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import SCRIPT, check_ok, read_jsonl, subprocess_env


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
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
               f"--model_name={tiny_bart_dir}", f"--train_file={train_file}", f"--validation_file={validation_file}",
               "--max_steps=2", "--batch_size=2", "--group_size=4", "--micro_batch_size=4", "--max_new_tokens=8",
               "--max_source_length=64", "--eval_every=2", "--eval_samples=5", "--save_every=2", "--sft_steps=1",
               "--learning_rate=1e-3", f"--output_dir={output_dir}", "--device=cpu"]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=240)
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
    resumed = subprocess.run([*command, "--max_steps=4", "--resume=True"],
                             env=subprocess_env(), capture_output=True, text=True, timeout=240)
    check_ok(resumed)
    assert "resumed from" in resumed.stderr and "weights identical on all 2 processes" in resumed.stderr
    metrics = read_jsonl(output_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
