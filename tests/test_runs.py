"""Whole runs of the script on the tiny models: every file a run writes (and README's lists of them), checkpoints
(atomic, rotated, best/), exact resume (after a finished run, after SIGKILL, with LoRA), Ctrl-C and SIGTERM, the
saved config and what a resume may change, output dirs that are never lost, messy data files, and the trackers.
Also pre-emption in every phase (SFT, rollout, update, evaluation) with an exact resume, the resume checks (process
count, --max_steps below the checkpoint, fewer GPUs), the continue command pasted as is, and the start checks
(lengths, truncation counts, an unreachable hub, models that cannot sample, the punkt note, UTF-8 JSONL).

Everything runs offline on the tiny models of conftest.py. A test of a child process never depends on when a signal
lands or how fast the machine is: the child runs the script's main() with one function wrapped so that it stops at
a chosen step until the test lets it go on (HOOKED_RUN), and the test sends its signal while the child waits there.
Deadlines only turn a hung child into a failure, and nothing asserts on timing.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import (HANG_TIMEOUT, POSITIONS, ROOT, SCRIPT, TINY, assert_resumed_run_matches, check_ok,
                      main_in_process,
                      checkpoint_names, data_args, good_rows, needs_peft, one_error, read_jsonl, run_script,
                      subprocess_env)

POLL_DEADLINE = HANG_TIMEOUT  # seconds; only a hung child gets near this (a shared CPU can be slow)


def checkpoint_steps(output_dir: Path) -> list[int]:
    directory = output_dir / "checkpoints"
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := re.fullmatch(r"step_(\d+)\.pt", p.name)))


# The script's main() in a child process with one module-level function wrapped: when a call of it is at step
# `at_step` (its `step` argument, or the step of its TrainerState argument), the child writes the file `reached` and
# waits, before the call, until the file `release` exists, which only the test creates (or until the test process
# is gone). The script looks its functions up at call time, as the in-process tests that monkeypatch them rely on.
HOOKED_RUN = r'''
import inspect, os, sys, time
root, name, at_step, reached, release, script, *flags = sys.argv[1:]
sys.path.insert(0, root)
import grpo_encoder_decoder_summarization as grpo

real, parent = getattr(grpo, name), os.getppid()
signature = inspect.signature(real)


def hooked(*args, **kwargs):
    arguments = signature.bind_partial(*args, **kwargs).arguments
    step = arguments["step"] if "step" in arguments else arguments["state"].step
    if step == int(at_step) and not os.path.exists(reached):
        open(reached, "w").close()
        while not os.path.exists(release):
            if os.getppid() != parent:  # the test is gone: never wait forever
                os._exit(3)
            time.sleep(0.01)
    return real(*args, **kwargs)


setattr(grpo, name, hooked)
sys.argv = [script, *flags]
sys.exit(grpo.main())
'''


def popen_hooked(*args: str, hook: str, at_step: int, directory: Path):
    """Start the script with `hook` stopping at `at_step` (see HOOKED_RUN); stdout and stderr go to files (no pipe
    can fill up and block it). Returns (process, stderr path, reached file, release file)."""
    driver, reached, release = directory / "hooked_run.py", directory / "reached", directory / "release"
    driver.write_text(HOOKED_RUN)
    stdout_path, stderr_path = directory / "stdout.txt", directory / "stderr.txt"
    with open(stdout_path, "w") as stdout, open(stderr_path, "w") as stderr:
        process = subprocess.Popen([sys.executable, str(driver), str(ROOT), hook, str(at_step), str(reached),
                                    str(release), str(SCRIPT), *map(str, args)], cwd=directory, env=subprocess_env(),
                                   stdout=stdout, stderr=stderr)
    return process, stderr_path, reached, release


def wait_for(condition, process: subprocess.Popen, what: str, stderr_path: Path) -> None:
    """Poll until condition() holds; fail if the process exits first, or past a deadline only a hung run reaches."""
    deadline = time.monotonic() + POLL_DEADLINE
    while not condition():
        if process.poll() is not None and not condition():
            pytest.fail(f"exit {process.returncode} before {what}; stderr:\n{stderr_path.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {POLL_DEADLINE:.0f} s; stderr:\n{stderr_path.read_text()}")
        time.sleep(0.02)


def stop(process: subprocess.Popen) -> None:
    """Kill the child if it is still running (after a failed assertion), and reap it."""
    if process.poll() is None:
        process.kill()
    process.wait(timeout=POLL_DEADLINE)


# --------------------------------------------------------------------------------------------------
# 1. Whole runs on T5 and on BART: every file, every metric (README lists exactly those), the trackers
# --------------------------------------------------------------------------------------------------
# Small but complete runs: 2 articles x 4 samples per step, 8 new tokens.
RUN_ARGS = ("--max_steps=3", "--batch_size=2", "--group_size=4", "--micro_batch_size=4", "--max_new_tokens=8",
            "--max_source_length=64", "--eval_every=2", "--eval_samples=4", "--save_every=2", "--sft_batch_size=4",
            "--device=cpu")


STEP_KEYS = {"step", "loss", "reward_mean", "reward_std", "kl", "clip_fraction", "completion_length", "lr", "seconds",
             "time_generate", "time_reward", "time_reference", "time_forward", "time_backward", "time_optimizer",
             "time_update"}


EVAL_KEYS = {"step", "rouge1", "rouge2", "rougeL", "rougeLsum", "gen_length"}


@pytest.mark.parametrize("model, extra", [
    ("t5", ()),
    ("bart", ("--sft_steps=2", "--num_iterations=2")),
], ids=["t5", "bart-sft-mu2"])
def test_full_run(model, extra, tiny_t5_dir, tiny_bart_dir, data_files, tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model_dir = {"t5": tiny_t5_dir, "bart": tiny_bart_dir}[model]
    out = tmp_path / "run"
    result = run_script(f"--model_name={model_dir}", *data_args(data_files), *RUN_ARGS, *extra,
                        f"--output_dir={out}", cwd=tmp_path)
    check_ok(result)

    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    expected_keys = STEP_KEYS | ({"time_old"} if "--num_iterations=2" in extra else set())
    for m in metrics:
        assert expected_keys <= m.keys(), f"missing {expected_keys - m.keys()}"
        for key in expected_keys:
            assert isinstance(m[key], (int, float)) and m[key] == m[key], (key, m[key])  # a number, not NaN
        assert 0.0 <= m["reward_mean"] <= 1.0
        assert m["kl"] >= 0.0 and 0.0 <= m["clip_fraction"] <= 1.0
        assert 0 < m["completion_length"] <= 8

    evals = read_jsonl(out / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2, 3]
    for e in evals:
        assert EVAL_KEYS <= e.keys(), f"missing {EVAL_KEYS - e.keys()}"
        for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
            assert 0.0 <= e[key] <= 1.0

    final = out / "final"
    loaded = AutoModelForSeq2SeqLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert loaded.config.is_encoder_decoder
    original = AutoTokenizer.from_pretrained(model_dir)
    text = "The council of Ashgrove voted on Monday."
    assert tokenizer(text)["input_ids"] == original(text)["input_ids"]
    assert (out / "curves.png").is_file() and (out / "curves.png").stat().st_size > 0
    # pi_ref after SFT is kept for a resumed run; without SFT pi_ref is the model in --model_name
    assert (out / "reference" / "config.json").is_file() == ("--sft_steps=2" in extra)
    # RUN_ARGS passes --sft_batch_size: without SFT the run says it has no effect (never silently ignored)
    note = "note: --sft_batch_size: no effect, since --sft_steps=0 leaves the SFT warm-up out"
    assert (note in result.stderr) == ("--sft_steps=2" not in extra)


# An earlier run: 2 steps with mu = 2 (so every phase is timed), articles cut to 8 tokens (so some are truncated).
EARLIER = (*TINY, "--max_steps=2", "--num_iterations=2", "--save_every=1", "--eval_every=2", "--learning_rate=1e-3",
           "--warmup_steps=1", "--max_source_length=8")


@pytest.fixture(scope="module")
def earlier_run(grpo, tiny_bart_dir, data_files, tmp_path_factory):
    """(output_dir, stderr, flags) of a finished 2-step run; tests copy the directory before changing it."""
    directory = tmp_path_factory.mktemp("earlier")
    flags = (f"--model_name={tiny_bart_dir}", *data_args(data_files), *EARLIER)
    result = main_in_process(grpo, *flags, f"--output_dir={directory / 'run'}")
    check_ok(result)
    return directory / "run", result.stderr, flags


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def readme_fields(file_name: str) -> set[str]:
    from grpo_encoder_decoder_summarization import ROUGE_KEYS

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith(f"| `{file_name}` |"))
    names = re.findall(r"`([\w<>]+)`", row.split("|")[2])  # `<metric>_ci_low` stands for each ROUGE key's
    return {name.replace("<metric>", key) for name in names for key in ROUGE_KEYS}


def test_readme_lists_exactly_the_metrics_the_script_writes(earlier_run):
    """Like the configuration table: README's field lists of metrics.jsonl and eval.jsonl are what a run writes
    (a run with mu = 2, so that every phase is timed)."""
    run_dir, _, _ = earlier_run
    written = set().union(*(record.keys() for record in read_jsonl(run_dir / "metrics.jsonl")))
    documented = readme_fields("metrics.jsonl") - {"max_new_tokens"}
    assert documented == written, (sorted(documented - written), sorted(written - documented))
    written = set().union(*(record.keys() for record in read_jsonl(run_dir / "eval.jsonl")))
    assert readme_fields("eval.jsonl") - {"eval_every"} == written


def test_truncated_articles_are_reported_once_on_the_console(earlier_run):
    _, stderr, _ = earlier_run
    lines = [line for line in stderr.splitlines() if "--max_source_length=8 tokens and were truncated" in line]
    assert len(lines) == 1, stderr
    assert re.search(r"\d+ of 4 training articles \(\d+\.\d%\)", lines[0]), lines[0]


def wandb_history(path) -> list[dict]:
    """The history rows of an offline wandb run file (.wandb): a 7-byte header, then LevelDB-log records
    (crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks, each a
    protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    data, position, block, pending, rows = open(path, "rb").read(), 7, 32768, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = struct.unpack("<HB", data[position + 4:position + 7])
        if length == 0 and kind == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_run_logs_completions_metrics_and_trackers(grpo, tiny_bart_dir, data_files, tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = run_script(f"--model_name={tiny_bart_dir}", *data_args(data_files), "--max_steps=3", "--batch_size=3",
                        "--group_size=4", "--micro_batch_size=8", "--max_new_tokens=8", "--max_source_length=64",
                        "--eval_every=2", "--eval_samples=4", "--save_every=3", "--device=cpu", "--temperature=2.0",
                        "--learning_rate=1e-3", "--scale_rewards=batch", "--epsilon_high=0.28",
                        "--loss_type=gspo_token", "--log_completions_every=2", "--report_to=wandb,tensorboard",
                        f"--output_dir={out}", cwd=tmp_path,
                        env=subprocess_env(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_PROJECT="test"))
    check_ok(result)
    metrics, evals = read_jsonl(out / "metrics.jsonl"), read_jsonl(out / "eval.jsonl")
    for m in metrics:
        assert {"clip_fraction_low", "clip_fraction_high", "entropy", "zero_std_groups"} <= m.keys()
        assert m["clip_fraction"] == pytest.approx(m["clip_fraction_low"] + m["clip_fraction_high"], abs=1e-12)
        assert m["entropy"] > 0

    # completions.jsonl: step 2 only, COMPLETION_ARTICLES articles with their G samples, rewards and advantages
    logged = read_jsonl(out / "completions.jsonl")
    assert [c["step"] for c in logged] == [2] * grpo.COMPLETION_ARTICLES
    train_rows = read_jsonl(data_files[0])
    expected_indices = grpo.batch_indices(1, 3, len(train_rows), 0)[:grpo.COMPLETION_ARTICLES]
    assert [c["article_index"] for c in logged] == expected_indices
    for c in logged:
        assert c["article"] == train_rows[c["article_index"]]["article"]
        assert c["reference"] == train_rows[c["article_index"]]["highlights"]
        assert len(c["samples"]) == 4
        summaries = [s["summary"] for s in c["samples"]]
        rewards = grpo.rouge_rewards(summaries, [c["reference"]] * 4)
        assert [s["reward"] for s in c["samples"]] == pytest.approx(rewards, abs=1e-6)
        advantages = [s["advantage"] for s in c["samples"]]
        assert sum(advantages) == pytest.approx(0.0, abs=1e-5)  # centred on the group mean
        if max(rewards) > min(rewards):  # batch scaling: differences keep their order and sign
            assert (advantages[0] - advantages[1]) * (rewards[0] - rewards[1]) >= 0

    # TensorBoard: the same numbers as metrics.jsonl and eval.jsonl
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for key in ("reward_mean", "kl", "entropy", "clip_fraction_high", "loss"):
        scalars = events.Scalars(f"train/{key}")
        assert [s.step for s in scalars] == [1, 2, 3]
        assert [s.value for s in scalars] == pytest.approx([m[key] for m in metrics], rel=1e-6, abs=1e-7)
    scalars = events.Scalars("eval/rougeL")
    assert [s.step for s in scalars] == [e["step"] for e in evals] == [0, 2, 3]
    assert [s.value for s in scalars] == pytest.approx([e["rougeL"] for e in evals], rel=1e-6, abs=1e-7)

    # wandb (offline run file): the same numbers
    (run_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "*.wandb"))
    history = wandb_history(run_file)
    train_rows_logged = [row for row in history if "train/reward_mean" in row]
    assert [row["_step"] for row in train_rows_logged] == [1, 2, 3]
    for row, m in zip(train_rows_logged, metrics):
        for key in ("reward_mean", "kl", "entropy", "loss", "lr"):
            assert row[f"train/{key}"] == pytest.approx(m[key], rel=1e-9, abs=1e-12), key
    eval_rows = [row for row in history if "eval/rougeL" in row]
    assert [row["eval/rougeL"] for row in eval_rows] == pytest.approx([e["rougeL"] for e in evals], rel=1e-9)


# --------------------------------------------------------------------------------------------------
# 2. Exact resume: after a finished run, after SIGKILL, with LoRA
# --------------------------------------------------------------------------------------------------
def test_resume_is_exact(grpo, tiny_bart_dir, data_files, tmp_path):
    # A learning rate large enough that the policy moves, a constant schedule (so max_steps=2 and max_steps=4
    # runs share their learning rates), and an SFT phase with a high rate so pi_ref differs from the base
    # model: a resumed run that rebuilt pi_ref from the base model would show a different KL.
    common = (f"--model_name={tiny_bart_dir}", *data_args(data_files), "--batch_size=2", "--group_size=4",
              "--micro_batch_size=4", "--max_new_tokens=8", "--max_source_length=64", "--eval_every=2",
              "--eval_samples=4", "--save_every=2", "--device=cpu", "--learning_rate=1e-3",
              "--lr_scheduler=constant", "--warmup_steps=0", "--sft_steps=2", "--sft_batch_size=4",
              "--sft_learning_rate=1e-2", "--num_iterations=2", "--seed=3")
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"

    check_ok(main_in_process(grpo, *common, "--max_steps=2", f"--output_dir={resumed}"))
    assert [m["step"] for m in read_jsonl(resumed / "metrics.jsonl")] == [1, 2]
    result = main_in_process(grpo, *common, "--max_steps=4", "--resume=True", f"--output_dir={resumed}")
    check_ok(result)
    assert "resumed from" in result.stderr and "at step 2" in result.stderr, result.stderr
    check_ok(main_in_process(grpo, *common, "--max_steps=4", f"--output_dir={straight}"))

    assert [m["step"] for m in read_jsonl(resumed / "metrics.jsonl")] == [1, 2, 3, 4]
    assert [e["step"] for e in read_jsonl(resumed / "eval.jsonl")] == [0, 2, 4]
    assert_resumed_run_matches(resumed, straight, resumed_at=2)


# A learning rate large enough to move the policy, a linear schedule with one warm-up step (so lr changes
# every step), and an SFT phase so that pi_ref differs from the base model and the rewards are not all zero.
EXACT_ARGS = (*TINY, "--max_steps=6", "--save_every=2", "--eval_every=2", "--learning_rate=1e-3",
              "--lr_scheduler=linear", "--warmup_steps=1", "--sft_steps=2", "--sft_batch_size=4",
              "--sft_learning_rate=1e-2", "--seed=5")


@pytest.fixture(scope="module")
def straight_run(tiny_bart_dir, data_files, tmp_path_factory) -> Path:
    """Run A: six steps, never interrupted, keep_checkpoints=1 (which changes no number)."""
    directory = tmp_path_factory.mktemp("straight")
    out = directory / "run"
    result = run_script(f"--model_name={tiny_bart_dir}", *data_args(data_files), *EXACT_ARGS, "--keep_checkpoints=1",
                        f"--output_dir={out}", cwd=directory)
    check_ok(result)
    return out


def test_resume_after_sigkill_is_exact(straight_run, tiny_bart_dir, data_files, tmp_path):
    """SIGKILL (no handler runs) while the run saves step 4's checkpoint: after steps 3 and 4 and the step-4
    evaluation were logged, so only the step-2 checkpoint is on disk. The child waits in save_checkpoint at step 4
    until it is killed, so the kill lands there however fast the machine is. --resume must start from step 2, drop
    the lines the killed run wrote after it, ignore a half-written .tmp checkpoint, and give the numbers and
    weights of the run that was never stopped."""
    out = tmp_path / "killed"
    args = (f"--model_name={tiny_bart_dir}", *data_args(data_files), *EXACT_ARGS, "--keep_checkpoints=10",
            f"--output_dir={out}")
    process, stderr_path, reached, _ = popen_hooked(*args, hook="save_checkpoint", at_step=4, directory=tmp_path)
    try:
        wait_for(reached.exists, process, "the step-4 save", stderr_path)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=POLL_DEADLINE)
    finally:
        stop(process)
    assert process.returncode == -signal.SIGKILL, stderr_path.read_text()
    assert "Traceback" not in stderr_path.read_text()
    assert checkpoint_steps(out) == [2]
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]  # to be dropped after step 2
    assert [e["step"] for e in read_jsonl(out / "eval.jsonl")] == [0, 2, 4]
    # a save killed half-way leaves a .tmp file: one with a higher step number, full of junk, must be ignored
    (out / "checkpoints" / "step_00000009.pt.tmp").write_bytes(b"half a checkpoint")

    result = run_script(*args, "--resume=True", cwd=tmp_path)
    check_ok(result)
    assert "resumed from" in result.stderr and "step_00000002.pt at step 2" in result.stderr, result.stderr

    resumed = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    assert len({m["lr"] for m in resumed}) > 1, "the schedule never changed: the lr comparison would be vacuous"
    assert [e["step"] for e in read_jsonl(out / "eval.jsonl")] == [0, 2, 4, 6]
    examples = Counter(e["step"] for e in read_jsonl(out / "eval_examples.jsonl"))
    assert set(examples) == {0, 2, 4, 6} and len(set(examples.values())) == 1, examples  # no evaluation twice
    assert_resumed_run_matches(out, straight_run, resumed_at=2)
    # eval_predictions.jsonl: each article once per evaluation after the resume
    assert Counter(p["step"] for p in read_jsonl(out / "eval_predictions.jsonl")) == {0: 4, 2: 4, 4: 4, 6: 4}


def test_run_config_is_saved_in_output_dir_and_every_checkpoint(grpo, earlier_run):
    run_dir, _, _ = earlier_run
    saved = json.loads((run_dir / grpo.RUN_CONFIG_FILE).read_text())
    assert set(saved) == {f.name for f in dataclasses.fields(grpo.Config)}
    assert saved["group_size"] == 4 and saved["num_iterations"] == 2 and saved["max_source_length"] == 8
    for checkpoint in (run_dir / "checkpoints").iterdir():
        payload = torch.load(checkpoint, map_location="cpu", weights_only=False)
        assert payload["config"] == saved


# 2 articles x 4 samples per step, 8 new tokens; a learning rate at which the adapters move in a few steps.
LORA_ARGS = ("--batch_size=2", "--group_size=4", "--micro_batch_size=4", "--max_new_tokens=8",
             "--max_source_length=64", "--eval_every=2", "--eval_samples=4", "--save_every=2", "--device=cpu",
             "--lora_r=4", "--lora_alpha=8", "--learning_rate=5e-2", "--lr_scheduler=constant", "--warmup_steps=0",
             "--seed=3")


@needs_peft
def test_lora_run_resumes_exactly_keeps_sft_and_saves_merged_models(grpo, tiny_bart_dir, data_files, tmp_path):
    """One LoRA run with SFT first and mu = 2, stopped after step 1 and resumed, against the same run never stopped:
    - KL is exactly 0 at step 1 (the lr warm-up makes the first update 0, so both of step 1's passes score the
      policy as GRPO starts): the reference is the post-SFT model, not the base model;
    - the resumed run gives the numbers and the final weights of the run that was never stopped;
    - final/ and best/ are plain merged models, and final/adapter on reference/ (the post-SFT model) gives final/;
    - only the q/v adapters train (the count is worked out below)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSeq2SeqLM

    common = (f"--model_name={tiny_bart_dir}", *data_args(data_files), *LORA_ARGS, "--sft_steps=2",
              "--sft_batch_size=4", "--sft_learning_rate=1e-2", "--num_iterations=2",
              "--lr_scheduler=constant_with_warmup", "--warmup_steps=1", "--save_every=1",
              "--lora_target_modules=q_proj,v_proj")
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    check_ok(main_in_process(grpo, *common, "--max_steps=1", f"--output_dir={resumed}"))
    result = main_in_process(grpo, *common, "--max_steps=2", "--resume=True", f"--output_dir={resumed}")
    check_ok(result)
    assert "resumed from" in result.stderr and "at step 1" in result.stderr, result.stderr
    result = main_in_process(grpo, *common, "--max_steps=2", f"--output_dir={straight}")
    check_ok(result)

    trained = re.search(r"lora: training ([\d,]+) of ([\d,]+) parameters", result.stderr)
    assert trained, result.stderr
    # q and v of the encoder's self-attention and the decoder's self- and cross-attention, d_model 32 -> 32:
    # 3 x 2 adapters of A (r x 32) and B (32 x r), r = 4: 6 x 256 = 1,536
    base = AutoModelForSeq2SeqLM.from_pretrained(tiny_bart_dir)
    assert int(trained.group(1).replace(",", "")) == 3 * 2 * (4 * base.config.d_model + base.config.d_model * 4) == 1536
    assert int(trained.group(2).replace(",", "")) == sum(p.numel() for p in base.parameters()) + 1536

    after_resume, uninterrupted = read_jsonl(resumed / "metrics.jsonl"), read_jsonl(straight / "metrics.jsonl")
    assert [m["step"] for m in after_resume] == [m["step"] for m in uninterrupted] == [1, 2]
    assert uninterrupted[0]["kl"] == 0.0  # pi_ref = the post-SFT model = the policy before its first (lr 0) update
    assert uninterrupted[1]["kl"] > 0, "the adapters never moved: the comparisons would be vacuous"
    for ours, theirs in zip(after_resume, uninterrupted):
        for key in ("reward_mean", "loss", "kl", "entropy", "lr"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-12), (ours["step"], key)
    for directory in ("final", "final/adapter", "reference"):
        name = "adapter_model.safetensors" if directory.endswith("adapter") else "model.safetensors"
        a, b = load_file(resumed / directory / name), load_file(straight / directory / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=f"{directory}: {key}")

    final = AutoModelForSeq2SeqLM.from_pretrained(straight / "final").eval()  # plain, merged
    assert not any("lora" in name for name, _ in final.named_parameters())
    best = AutoModelForSeq2SeqLM.from_pretrained(straight / "best")
    assert not any("lora" in name for name, _ in best.named_parameters())
    assert (straight / "best" / "adapter" / "adapter_config.json").is_file()
    rebuilt = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(straight / "reference"),
                                        straight / "final" / "adapter").eval()
    post_sft = AutoModelForSeq2SeqLM.from_pretrained(straight / "reference").eval()
    inputs = dict(input_ids=torch.tensor([[0, 5, 6, 7, 8, 2]]), decoder_input_ids=torch.tensor([[2, 0, 9, 10, 11]]))
    with torch.no_grad():
        merged_logits, adapter_logits, post_sft_logits = (m(**inputs).logits for m in (final, rebuilt, post_sft))
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(merged_logits, post_sft_logits, atol=1e-4), "training did not change the model"


# --------------------------------------------------------------------------------------------------
# 3. SIGTERM from outside the process: finish the step, save, say how to resume, exit 143 (Ctrl-C, exit 130, is
# sent in process by the tests of section 8, through the same handler)
# --------------------------------------------------------------------------------------------------
def test_a_signal_saves_and_resumes(tiny_bart_dir, data_files, tmp_path):
    """SIGTERM (what SLURM sends before pre-empting a job): stop at the next boundary, save the last
    finished step, say how to resume, exit 128 + the signal number; the resumed run goes on from it. The child waits in
    step 2 (before logging it) until the signal's handler has run, so the signal always lands during step 2: the
    run must stop after step 2 of 4, with no checkpoint due (save_every 1000) but the one the signal asks for."""
    signal_number, exit_code = signal.SIGTERM, 143
    out = tmp_path / "run"
    common = (f"--model_name={tiny_bart_dir}", *data_args(data_files), *TINY, "--eval_every=1000",
              "--save_every=1000", f"--output_dir={out}")
    process, stderr_path, reached, release = popen_hooked(*common, "--max_steps=4", hook="log_step", at_step=2,
                                                          directory=tmp_path)
    name = signal.Signals(signal_number).name
    try:
        wait_for(reached.exists, process, "step 2", stderr_path)
        process.send_signal(signal_number)
        wait_for(lambda: f"{name}: stopping at the next boundary" in stderr_path.read_text(), process,
                 "the signal's handler",
                 stderr_path)
        release.touch()
        returncode = process.wait(timeout=POLL_DEADLINE)
    finally:
        stop(process)
    stderr = stderr_path.read_text()
    assert returncode == exit_code, f"exit {returncode}; stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    assert any("--resume=True" in line for line in stderr.splitlines()), stderr
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert checkpoint_steps(out) == [2]
    assert "stopped at step 2" in stderr, stderr
    assert not (out / "final").exists()  # a stopped run is not a finished one

    result = run_script(*common, "--max_steps=3", "--resume=True", cwd=tmp_path)
    check_ok(result)
    assert "at step 2" in result.stderr, result.stderr
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    assert (out / "final" / "config.json").is_file()


# --------------------------------------------------------------------------------------------------
# 4. Checkpoints: atomic, rotated, best/, another model's; the logs a resume trims
# --------------------------------------------------------------------------------------------------
def test_checkpoint_files_ignores_temporary_and_foreign_files(grpo, tmp_path):
    assert grpo.checkpoint_files(str(tmp_path)) == []  # no checkpoints/ directory at all
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    for name in ("step_00000004.pt", "step_00000002.pt", "step_00000009.pt.tmp", "step_00000010.pt.tmp",
                 "notes.txt", "step_3.pt.bak"):
        (directory / name).write_bytes(b"x")
    assert grpo.checkpoint_files(str(tmp_path)) == [str(directory / "step_00000002.pt"),
                                                    str(directory / "step_00000004.pt")]


def test_save_checkpoint_is_atomic_rotates_and_round_trips(grpo, tmp_path):
    from transformers import get_scheduler

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = get_scheduler("linear", optimizer, 1, 10)
    (tmp_path / "checkpoints").mkdir()
    leftover = tmp_path / "checkpoints" / "step_00000009.pt.tmp"  # from an earlier save that was killed
    leftover.write_bytes(b"junk")
    state = grpo.TrainerState()
    for step in (1, 2, 3):
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        state.step, state.best_score = step, 0.1 * step
        path = grpo.save_checkpoint(str(tmp_path), model, optimizer, scheduler, state, [grpo.rng_state()], keep=2)
        assert Path(path).name == f"step_{step:08d}.pt"
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # Only the newest two complete files; no .tmp of our own saves, and the leftover of the killed save is removed.
    assert names == ["step_00000002.pt", "step_00000003.pt"]
    assert grpo.checkpoint_files(str(tmp_path))[-1].endswith("step_00000003.pt")

    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_lr = scheduler.get_last_lr()
    fresh = torch.nn.Linear(3, 2)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh_scheduler = get_scheduler("linear", fresh_optimizer, 1, 10)
    loaded = grpo.load_checkpoint(grpo.checkpoint_files(str(tmp_path))[-1], fresh, fresh_optimizer,
                                  fresh_scheduler, rank=0)
    assert loaded.step == 3 and loaded.best_score == pytest.approx(0.3)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert fresh_scheduler.get_last_lr() == expected_lr
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 3


def test_keep_checkpoints_one_and_best_model(grpo, straight_run, tiny_bart_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    # Three saves (steps 2, 4, 6) with --keep_checkpoints=1: only the newest is left, and no temporary file.
    assert sorted(p.name for p in (straight_run / "checkpoints").iterdir()) == ["step_00000006.pt"]
    assert not list(straight_run.glob("*.tmp")), list(straight_run.glob("*.tmp"))

    best = straight_run / "best"
    assert best.is_dir()
    model = AutoModelForSeq2SeqLM.from_pretrained(best)
    tokenizer = AutoTokenizer.from_pretrained(best)
    assert model.config.is_encoder_decoder
    text = "The council of Ashgrove voted on Monday."
    assert tokenizer(text)["input_ids"] == AutoTokenizer.from_pretrained(tiny_bart_dir)(text)["input_ids"]

    # best/ is refreshed only when best_metric strictly improves, so it holds the model of the first evaluation
    # with the highest score. This seeded run is deterministic, and that evaluation is one whose model is also
    # kept elsewhere (step 0: reference/, the policy after SFT; step 6: final/): the weights must match.
    # (test_best_model_is_refreshed_only_on_strict_improvement covers the other steps.)
    evals = read_jsonl(straight_run / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2, 4, 6]
    scores = [e[grpo.Config().best_metric] for e in evals]
    best_step = evals[scores.index(max(scores))]["step"]
    twins = {0: straight_run / "reference", 6: straight_run / "final"}
    assert best_step in twins, f"best step {best_step} (scores {scores}) has no copy to compare with: change the run"
    ours, theirs = load_file(best / "model.safetensors"), load_file(twins[best_step] / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), (best_step, name)


def test_best_model_is_refreshed_only_on_strict_improvement(grpo, tiny_bart_dir, tmp_path, monkeypatch):
    """record_evaluation with scripted scores: best/ holds the weights of the first evaluation with the highest
    score (a tie does not replace it), whichever step that is, and best_score follows the maximum."""
    from safetensors.torch import load_file

    config = grpo.Config(model_name=str(tiny_bart_dir), output_dir=str(tmp_path), device="cpu")
    policy, tokenizer = grpo.load_policy_and_tokenizer(config, torch.device("cpu"))
    scores = {0: 0.1, 2: 0.3, 4: 0.3, 6: 0.2}  # the best is step 2; step 4 ties it
    current_step, weights, state = [0], {}, grpo.TrainerState()
    monkeypatch.setattr(grpo, "evaluate", lambda policy, tokenizer, held_out, config, device, dist: (
        {f"{key}{part}": scores[current_step[0]] for key in grpo.ROUGE_KEYS for part in ("", "_ci_low", "_ci_high")},
        [], []))  # metrics (with their intervals), examples, per-article records
    for step in scores:
        current_step[0] = step
        with torch.no_grad():
            for parameter in policy.parameters():
                parameter.add_(1.0)  # a different model at every evaluation
        weights[step] = {k: v.clone() for k, v in policy.state_dict().items()}
        grpo.record_evaluation(config, grpo.Distributed(), step, policy, tokenizer, ["one held-out row"], state,
                               log=lambda m: None)
    assert state.best_score == 0.3
    assert [e["step"] for e in read_jsonl(tmp_path / "eval.jsonl")] == [0, 2, 4, 6]
    saved = load_file(tmp_path / "best" / "model.safetensors")
    parameters = {name for name, _ in policy.named_parameters()} & saved.keys()  # not buffers (final_logits_bias)
    assert parameters
    for name in saved:
        assert torch.equal(saved[name], weights[2][name]), name
    for name in parameters:
        assert not torch.equal(saved[name], weights[4][name]), name


def test_loading_a_checkpoint_of_another_model_is_one_line(grpo, tiny_bart_dir, tiny_t5_dir, tmp_path):
    """The guard on load_state_dict itself (a checkpoint without a config, or a model dir changed in place)."""
    from transformers import AutoModelForSeq2SeqLM, get_scheduler

    def parts(model_dir):
        model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
        optimizer = torch.optim.AdamW(model.parameters())
        return model, optimizer, get_scheduler("constant", optimizer)

    bart, optimizer, scheduler = parts(tiny_bart_dir)
    path = grpo.save_checkpoint(str(tmp_path), bart, optimizer, scheduler, grpo.TrainerState(step=1),
                                [grpo.rng_state()], keep=1)
    with pytest.raises(grpo.UserError) as info:
        grpo.load_checkpoint(path, *parts(tiny_t5_dir), rank=0)
    message = str(info.value)
    assert "different model" in message and "\n" not in message and len(message) < 400
    assert grpo.load_checkpoint(path, *parts(tiny_bart_dir), rank=0).step == 1  # the right model still loads


def test_keep_lines_up_to_drops_later_steps(grpo, tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in (1, 2, 3, 4)) + "\n",
                    encoding="utf-8")
    grpo.keep_lines_up_to(str(path), 2)
    assert [m["step"] for m in read_jsonl(path)] == [1, 2]
    grpo.keep_lines_up_to(str(tmp_path / "absent.jsonl"), 2)  # a log that was never written is fine
    assert not (tmp_path / "absent.jsonl").exists()


def test_keep_lines_up_to_survives_a_torn_last_line(grpo, tmp_path):
    """A run that died mid-write (disk full, power loss) can leave half a JSON line at the end of a log.
    The resume must drop it with the other lines after the checkpoint, not crash on it."""
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 0.5}) + "\n" for s in (1, 2, 3)]
    path.write_text("".join(lines) + '{"step": 4, "lo', encoding="utf-8")
    grpo.keep_lines_up_to(str(path), 2)
    assert [m["step"] for m in read_jsonl(path)] == [1, 2]


# --------------------------------------------------------------------------------------------------
# 5. What --resume=True may change: bookkeeping yes (the lr schedule continues), the trajectory no
# --------------------------------------------------------------------------------------------------
def changed_value(value):
    """A different value of the same type, for any Config field."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "_changed"
    return 0.5  # None (epsilon_high)


def test_every_field_but_the_bookkeeping_ones_counts_as_changing_the_run(grpo):
    """No list of trajectory fields: a field another branch adds later is checked by default."""
    saved = dataclasses.asdict(grpo.Config())
    assert grpo.RESUME_BOOKKEEPING_FIELDS | grpo.RESUME_IGNORED_FIELDS <= set(saved)
    for field in dataclasses.fields(grpo.Config):
        changed = dataclasses.replace(grpo.Config(), **{field.name: changed_value(saved[field.name])})
        trajectory, bookkeeping = grpo.changed_on_resume(saved, changed)
        if field.name in grpo.RESUME_IGNORED_FIELDS:  # --resume and --overwrite_output_dir
            assert trajectory == bookkeeping == []
            continue
        expected = f"--{field.name}: {saved[field.name]!r} -> {getattr(changed, field.name)!r}"
        assert (bookkeeping if field.name in grpo.RESUME_BOOKKEEPING_FIELDS else trajectory) == [expected]
        assert not (trajectory if field.name in grpo.RESUME_BOOKKEEPING_FIELDS else bookkeeping)
    # a field missing from an older saved config counts as its default
    older = {k: v for k, v in saved.items() if k != "beta"}
    assert grpo.changed_on_resume(older, grpo.Config()) == ([], [])
    assert grpo.changed_on_resume(older, grpo.Config(beta=0.5))[0] == [f"--beta: {grpo.Config().beta!r} -> 0.5"]


def test_resume_with_trajectory_changes_stops_with_one_line(grpo, earlier_run, tmp_path):
    run_dir, _, flags = earlier_run
    out = copy_of(run_dir, tmp_path)
    result = main_in_process(grpo, *flags, "--learning_rate=5e-4", "--group_size=2", "--seed=3", "--eval_every=5",
                             "--resume=True", f"--output_dir={out}")
    error = one_error(result, 2)
    for change in ("--learning_rate: 0.001 -> 0.0005", "--group_size: 4 -> 2", "--seed: 0 -> 3"):
        assert change in error, error
    assert "eval_every" not in error  # bookkeeping is allowed


def test_resume_with_another_model_stops_with_one_line(grpo, earlier_run, tiny_t5_dir, tmp_path):
    run_dir, _, flags = earlier_run
    out = copy_of(run_dir, tmp_path)
    result = main_in_process(grpo, *flags, f"--model_name={tiny_t5_dir}", "--resume=True", f"--output_dir={out}")
    error = one_error(result, 2)
    assert "--model_name: '" in error and f"-> '{tiny_t5_dir}'" in error and len(result.stderr) < 2000


def test_resume_with_bookkeeping_changes_and_longer_max_steps(grpo, earlier_run, tmp_path):
    run_dir, _, flags = earlier_run
    out = copy_of(run_dir, tmp_path)
    result = main_in_process(grpo, *flags, "--max_steps=3", "--eval_every=3", "--keep_checkpoints=1", "--resume=True",
                             f"--output_dir={out}")
    check_ok(result)
    bookkeeping = next(line for line in result.stderr.splitlines() if "resuming with changed bookkeeping" in line)
    assert "--eval_every: 2 -> 3" in bookkeeping and "--keep_checkpoints: 2 -> 1" in bookkeeping
    assert "--resume" not in bookkeeping, bookkeeping
    # the linear schedule had decayed to 0 at step 2 of 2; over 3 steps it continues at the value of step 2 of 3
    line = next(line for line in result.stderr.splitlines() if "schedule now runs over 3 steps" in line)
    assert "not 0" in line and "uses lr 0.0004" in line, line  # 1e-3 * (6 - 4) / (6 - 1): 4 of 6 optimizer steps
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    assert json.loads((out / "run_config.json").read_text())["max_steps"] == 3


@pytest.mark.parametrize("name", ["linear", "cosine", "constant_with_warmup", "polynomial", "inverse_sqrt"])
def test_continue_lr_schedule_gives_the_lr_of_a_run_with_the_new_max_steps(grpo, name):
    from transformers import get_scheduler

    assert name in grpo.scheduler_names()

    def parts(total):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=1e-3)
        return optimizer, get_scheduler(name, optimizer, 2, total)

    old_optimizer, old_scheduler = parts(total=10)
    for _ in range(10):  # the old run finished its schedule
        old_optimizer.step()
        old_scheduler.step()
    optimizer, scheduler = parts(total=30)  # resumed with 3x max_steps
    optimizer.load_state_dict(old_optimizer.state_dict())
    scheduler.load_state_dict(old_scheduler.state_dict())
    old_lr, new_lr = grpo.continue_lr_schedule(scheduler, optimizer)
    reference_optimizer, reference_scheduler = parts(total=30)
    for _ in range(10):
        reference_optimizer.step()
        reference_scheduler.step()
    assert old_lr == old_scheduler.get_last_lr()[0]
    for _ in range(5):  # the lr of each later update is the fresh schedule's too
        assert optimizer.param_groups[0]["lr"] == reference_optimizer.param_groups[0]["lr"]
        assert scheduler.get_last_lr() == reference_scheduler.get_last_lr()
        optimizer.step()
        scheduler.step()
        reference_optimizer.step()
        reference_scheduler.step()
    if name == "linear":
        assert old_lr == 0.0 and new_lr > 0  # the bug: the first update after resume used the old schedule's 0


# --------------------------------------------------------------------------------------------------
# 6. Output dir: a fresh run never deletes an earlier one unless asked to
# --------------------------------------------------------------------------------------------------
def test_fresh_run_into_an_earlier_run_stops_and_keeps_it(grpo, earlier_run, tmp_path):
    run_dir, _, flags = earlier_run
    out = copy_of(run_dir, tmp_path)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    error = one_error(main_in_process(grpo, *flags, f"--output_dir={out}"), 2)
    assert "--resume=True" in error and "--overwrite_output_dir=True" in error and str(out) in error
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing deleted or added


def test_overwrite_output_dir_deletes_the_earlier_run(grpo, earlier_run, tmp_path):
    run_dir, _, _ = earlier_run
    out = copy_of(run_dir, tmp_path)
    (out / "notes.txt").write_text("the user's own file")
    messages = []
    config = grpo.Config(output_dir=str(out), overwrite_output_dir=True)
    grpo.check_output_dir(config)
    grpo.prepare_output_dir(config, messages.append)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # the run's files only
    assert len(messages) == 1 and "deleting the earlier run" in messages[0] and "checkpoints" in messages[0]
    grpo.check_output_dir(dataclasses.replace(config, overwrite_output_dir=False))  # now empty: a fresh run may start


def test_benchmark_follows_the_same_rule(grpo, tmp_path):
    (tmp_path / "benchmark.json").write_text("{}")
    error = one_error(main_in_process(grpo, "--benchmark", f"--output_dir={tmp_path}"), 2)
    assert "--overwrite_output_dir=True" in error
    assert (tmp_path / "benchmark.json").read_text() == "{}"


# --------------------------------------------------------------------------------------------------
# 7. Data files and models: empty rows skipped and counted, long articles truncated and counted, CSV input,
# tokenizing each batch once, trust_remote_code off unless asked for
# --------------------------------------------------------------------------------------------------
def skipped_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if re.search(r"skipped \d+ of \d+ rows", line)]


def test_empty_rows_are_skipped_and_counted(grpo, tiny_bart_dir, data_files, tmp_path):
    bad = [{"article": "", "highlights": "A summary."},
           {"article": "Some article text here.", "highlights": "   \n\t "},
           {"article": " \n ", "highlights": "A summary."},
           {"article": "Another article.", "highlights": None}]
    rows = good_rows(data_files, 6) + bad[:2] + good_rows(data_files, 12)[6:] + bad[2:]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    out = tmp_path / "run"
    result = main_in_process(grpo, f"--model_name={tiny_bart_dir}", f"--train_file={train}",
                             f"--validation_file={data_files[1]}", *TINY, "--max_steps=1", f"--output_dir={out}")
    check_ok(result)
    lines = skipped_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "skipped 4 of 16 rows" in lines[0], lines[0]
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1]


def test_long_articles_are_truncated_and_counted(grpo, tiny_bart_dir, data_files, tmp_path):
    out = tmp_path / "run"
    result = main_in_process(grpo, f"--model_name={tiny_bart_dir}", *data_args(data_files), *TINY,
                             "--max_source_length=8", "--max_steps=2", f"--output_dir={out}")
    check_ok(result)
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    # Every synthetic article is far longer than 8 tokens: each step adds its 2 articles to the running count.
    assert [m["articles_truncated"] for m in metrics] == [2, 4]


def test_csv_train_file(grpo, tiny_bart_dir, data_files, tmp_path):
    rows = good_rows(data_files, 12) + [{"article": "An article with no summary.", "highlights": ""}]
    train = tmp_path / "train.csv"
    with open(train, "w", encoding="utf-8", newline="") as file:  # highlights hold newlines: csv quotes them
        writer = csv.DictWriter(file, fieldnames=["article", "highlights"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "run"
    result = main_in_process(grpo, f"--model_name={tiny_bart_dir}", f"--train_file={train}",
                             f"--validation_file={data_files[1]}", *TINY, "--max_steps=1", f"--output_dir={out}")
    check_ok(result)
    lines = skipped_lines(result.stderr)
    assert len(lines) == 1 and "skipped 1 of 13 rows" in lines[0], result.stderr
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1]


@pytest.mark.parametrize("model_dir", ["tiny_t5_dir", "tiny_bart_dir"])
def test_tokenize_once_equals_tokenizer_truncation(grpo, model_dir, request):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(model_dir))
    rows = grpo.make_synthetic_corpus(6, seed=3)
    articles = [row["article"] for row in rows]
    articles[2] = " ".join(articles[2].split()[:3])  # a short one among long ones
    for limit in (8, 30, 10_000):
        config = grpo.Config(max_source_length=limit, source_prefix="summarize: ")
        encoded, truncated = grpo.tokenize_articles(tokenizer, articles, config, torch.device("cpu"))
        texts = [config.source_prefix + article for article in articles]
        expected = tokenizer(texts, max_length=limit, truncation=True, padding=True, return_tensors="pt")
        assert torch.equal(encoded["input_ids"], expected["input_ids"])
        assert torch.equal(encoded["attention_mask"], expected["attention_mask"])
        lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
        assert truncated == sum(length > limit for length in lengths)
        for row, length in zip(encoded["input_ids"], lengths):  # a truncated article keeps its closing EOS
            assert length <= limit or row[-1].item() == tokenizer.eos_token_id
        assert truncated >= 5 or limit > 8  # at 8 tokens the long articles (all but one) are cut
    assert truncated == 0 and limit == 10_000


@pytest.mark.parametrize("flags, expected", [([], None), (["--trust_remote_code=True"], True),
                                             (["--trust_remote_code=False"], False)],
                         ids=["default", "true", "false"])
def test_trust_remote_code_is_passed_explicitly(grpo, tiny_bart_dir, monkeypatch, flags, expected):
    import transformers

    if expected is None:  # no flag: Config's default, whatever it is set to at the top of the script
        expected = grpo.Config().trust_remote_code

    calls: dict[str, list[dict]] = {}

    def recording(cls_name):
        real = getattr(transformers, cls_name).from_pretrained  # bound classmethod

        def wrapper(*args, **kwargs):
            calls.setdefault(cls_name, []).append(kwargs)
            return real(*args, **kwargs)
        return wrapper

    for cls_name in ("AutoConfig", "AutoTokenizer", "AutoModelForSeq2SeqLM"):
        monkeypatch.setattr(getattr(transformers, cls_name), "from_pretrained", recording(cls_name))
    config, _ = grpo.parse_args([f"--model_name={tiny_bart_dir}", *flags])
    grpo.load_policy_and_tokenizer(config, torch.device("cpu"))
    assert set(calls) == {"AutoConfig", "AutoTokenizer", "AutoModelForSeq2SeqLM"}
    for cls_name, recorded in calls.items():
        for kwargs in recorded:
            assert "trust_remote_code" in kwargs and kwargs["trust_remote_code"] is expected, (cls_name, kwargs)


# --------------------------------------------------------------------------------------------------
# 8. Pre-emption (issue 19): Ctrl-C or SIGTERM stops at the next boundary in whatever phase it lands, saves the last
# finished step and exits 128 + the signal; --resume=True continues exactly. First SFT: the resume goes on with SFT
# --------------------------------------------------------------------------------------------------
# The signal is sent by the run to itself from a monkeypatched function (the n-th call of sft_labels,
# grpo_loss, compute_rewards or generate), so where it lands never depends on timing. Runs are
# in-process (grpo.main) except where the printed command is the point.

# 2 articles x 4 samples, micro-batches of 4 (two per update), mu = 2 (four grpo_loss calls per step), SFT of 3 steps
# scored after step 2, GRPO steps 1-4 scored at 0, 2, 4; checkpoints only at the end, so every earlier one is a stop's.
ARGS = ("--batch_size=2", "--group_size=4", "--micro_batch_size=4", "--max_new_tokens=8", "--max_source_length=64",
        "--eval_samples=4", "--eval_batch_size=2", "--device=cpu", "--max_steps=4", "--eval_every=2",
        "--save_every=100", "--num_iterations=2", "--learning_rate=1e-3", "--lr_scheduler=linear", "--warmup_steps=1",
        "--sft_steps=3", "--sft_batch_size=4", "--sft_learning_rate=1e-2", "--sft_eval_every=2", "--seed=5")
NO_SFT = ("--sft_steps=0", "--sft_eval_every=0")
LOSS_CALLS_PER_STEP = 4  # num_iterations x micro-batches
TIMING_KEYS = ("time", "seconds")  # metrics that are wall-clock times, not numbers of the run


def flags(tiny_bart_dir, data_files, out: Path, *extra: str) -> list[str]:
    return [f"--model_name={tiny_bart_dir}", *data_args(data_files), *ARGS, f"--output_dir={out}", *extra]


def signal_on_call(monkeypatch, grpo, name: str, call: int, signal_number=signal.SIGTERM) -> list[int]:
    """Make the `call`-th call (1-based) of grpo.<name> send `signal_number` to this process before it runs. Returns
    the call counter (a one-item list)."""
    original, calls = getattr(grpo, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signal_number)
        return original(*args, **kwargs)

    monkeypatch.setattr(grpo, name, wrapper)
    return calls


def assert_same_run(resumed: Path, straight: Path) -> None:
    """The resumed run wrote what the uninterrupted one did, bit for bit: every number of metrics.jsonl (wall-clock
    times aside), eval.jsonl, sft_eval.jsonl and eval_predictions.jsonl, and the final weights."""
    from safetensors.torch import load_file

    def numbers(path: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if not k.startswith(TIMING_KEYS)} for r in read_jsonl(path)]

    for name in ("metrics.jsonl", "eval.jsonl", "sft_eval.jsonl", "eval_predictions.jsonl"):
        assert numbers(resumed / name) == numbers(straight / name), name
    assert any(m["kl"] > 0 for m in read_jsonl(straight / "metrics.jsonl")), "the policy never moved"
    ours, theirs = (load_file(run / "final" / "model.safetensors") for run in (resumed, straight))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.fixture(scope="module")
def straight(grpo, tiny_bart_dir, data_files, tmp_path_factory) -> Path:
    """The run never stopped."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert grpo.main(flags(tiny_bart_dir, data_files, out)) == 0
    return out


def stop_and_resume(grpo, monkeypatch, capsys, tiny_bart_dir, data_files, out: Path, name: str, call: int,
                    signal_number=signal.SIGTERM) -> tuple[str, list[str]]:
    """Run with a signal at the `call`-th call of grpo.<name>; check exit 128 + signal and the one stop line; then
    resume (without the hook). Returns (the stopped run's stderr, the checkpoints it left)."""
    calls = signal_on_call(monkeypatch, grpo, name, call, signal_number)
    assert grpo.main(flags(tiny_bart_dir, data_files, out)) == 128 + signal_number
    stopped = capsys.readouterr().err
    assert calls[0] >= call and "Traceback" not in stopped, stopped
    assert signal.Signals(signal_number).name in stopped and "Continue with: " in stopped, stopped
    assert not (out / "final").exists()
    saved = checkpoint_names(out)
    monkeypatch.undo()
    assert grpo.main(flags(tiny_bart_dir, data_files, out, "--resume=True")) == 0
    resumed = capsys.readouterr().err
    assert "Traceback" not in resumed, resumed
    return stopped + resumed, saved


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl_c"])
def test_signal_in_an_sft_step(grpo, monkeypatch, capsys, straight, tiny_bart_dir, data_files, tmp_path,
                               signal_number):
    """Landing in SFT step 1 (the first sft_labels call): the boundary after it saves SFT step 1."""
    out = tmp_path / "run"
    stderr, saved = stop_and_resume(grpo, monkeypatch, capsys, tiny_bart_dir, data_files, out, "sft_labels", 1,
                                    signal_number)
    assert saved == ["sft_00000001.pt"]
    assert "stopped at SFT step 1; checkpoint saved" in stderr and "at SFT step 1" in stderr, stderr
    assert_same_run(out, straight)


def test_signal_in_the_sft_evaluation(grpo, monkeypatch, capsys, straight, tiny_bart_dir, data_files, tmp_path):
    """Landing in the first batch of the evaluation after SFT step 2: step 2 is saved with the evaluation pending,
    and the resumed run does that evaluation again (sft_eval.jsonl ends as the uninterrupted run's)."""
    out = tmp_path / "run"
    stderr, saved = stop_and_resume(grpo, monkeypatch, capsys, tiny_bart_dir, data_files, out, "generate", 1)
    assert saved == ["sft_00000002.pt"]
    assert "stopped at SFT step 2" in stderr and [r["sft_step"] for r in read_jsonl(out / "sft_eval.jsonl")] == [2]
    assert_same_run(out, straight)


def test_a_crash_after_sft_resumes_from_the_periodic_sft_checkpoint(grpo, monkeypatch, capsys, straight,
                                                                    tiny_bart_dir, data_files, tmp_path):
    """SFT writes sft_N.pt every save_every SFT steps, like GRPO's checkpoints, so a run killed without a signal (here
    an exception in GRPO's first loss, after step 0's evaluation was logged) resumes from SFT step 2: SFT goes on,
    the GRPO logs the dead run wrote are dropped, and the run ends as the uninterrupted one."""
    out = tmp_path / "run"

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(grpo, "grpo_loss", crash)
    with pytest.raises(RuntimeError, match="killed"):
        grpo.main(flags(tiny_bart_dir, data_files, out, "--save_every=2"))
    assert checkpoint_names(out) == ["sft_00000002.pt"] and read_jsonl(out / "eval.jsonl")[0]["step"] == 0
    monkeypatch.undo()
    capsys.readouterr()
    assert grpo.main(flags(tiny_bart_dir, data_files, out, "--save_every=2", "--resume=True")) == 0
    assert "at SFT step 2" in capsys.readouterr().err
    assert_same_run(out, straight)


# --------------------------------------------------------------------------------------------------
# 9. Pre-emption in GRPO: a signal inside a step (reward, update) or an evaluation
# --------------------------------------------------------------------------------------------------
def test_signal_in_the_reward_drops_the_step(grpo, monkeypatch, capsys, straight, tiny_bart_dir, data_files, tmp_path):
    """Landing in step 3's reward (call 4: the first is the start's check): the rollout ends, step 3 is dropped at
    the next boundary, step 2 is saved."""
    out = tmp_path / "run"
    stderr, saved = stop_and_resume(grpo, monkeypatch, capsys, tiny_bart_dir, data_files, out, "compute_rewards", 4)
    assert saved[-1] == "step_00000002.pt" and "stopped at step 2" in stderr, stderr
    assert_same_run(out, straight)


def test_signal_between_micro_batches_of_the_update(grpo, monkeypatch, capsys, straight, tiny_bart_dir, data_files,
                                                     tmp_path):
    """Landing in step 3's first micro-batch: the update stops before the second one, the weights untouched by
    step 3, and step 2 is saved."""
    out = tmp_path / "run"
    stderr, saved = stop_and_resume(grpo, monkeypatch, capsys, tiny_bart_dir, data_files, out, "grpo_loss",
                                    2 * LOSS_CALLS_PER_STEP + 1)
    assert saved[-1] == "step_00000002.pt" and "stopped at step 2" in stderr, stderr
    assert_same_run(out, straight)


def test_signal_after_the_first_optimizer_step_finishes_the_step(grpo, monkeypatch, capsys, straight, tiny_bart_dir,
                                                                 data_files, tmp_path):
    """Landing in step 3's second update (mu = 2): the weights have moved, so step 3 runs to its end and is saved."""
    out = tmp_path / "run"
    stderr, saved = stop_and_resume(grpo, monkeypatch, capsys, tiny_bart_dir, data_files, out, "grpo_loss",
                                    2 * LOSS_CALLS_PER_STEP + 3)
    assert saved[-1] == "step_00000003.pt" and "stopped at step 3" in stderr, stderr
    assert_same_run(out, straight)


@pytest.mark.parametrize("call, step", [(3, 0), (5, 2)], ids=["step_0", "step_2"])
def test_signal_in_an_evaluation_redoes_it(grpo, monkeypatch, capsys, straight, tiny_bart_dir, data_files, tmp_path,
                                           call, step):
    """Landing in the first batch of the evaluation after step 0 or step 2 (generate runs twice per evaluation, SFT's
    first: calls 1-2, then step 0's 3-4, step 2's 5-6): that step is finished and saved; the resumed run evaluates
    it again, so eval.jsonl holds each step once, as the uninterrupted run's."""
    out = tmp_path / "run"
    stderr, saved = stop_and_resume(grpo, monkeypatch, capsys, tiny_bart_dir, data_files, out, "generate", call)
    assert saved[-1] == f"step_{step:08d}.pt" and f"stopped at step {step};" in stderr, stderr
    assert [e["step"] for e in read_jsonl(out / "eval.jsonl")] == [0, 2, 4]
    assert_same_run(out, straight)


# --------------------------------------------------------------------------------------------------
# 10. Resume checks: process count, --max_steps below the checkpoint, fewer GPUs
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_step_run(grpo, tiny_bart_dir, data_files, tmp_path_factory) -> Path:
    """A finished 2-step run without SFT, with a checkpoint at step 2."""
    out = tmp_path_factory.mktemp("two_steps") / "run"
    assert grpo.main(flags(tiny_bart_dir, data_files, out, "--max_steps=2", *NO_SFT, "--save_every=2")) == 0
    return out


def test_resume_under_another_process_count_is_refused_in_one_line(grpo, capsys, two_step_run, tiny_bart_dir,
                                                                     data_files, tmp_path):
    """A checkpoint of 2 processes (its world_size rewritten here: no torchrun needed) does not resume under 1."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(two_step_run, out)
    path = out / "checkpoints" / "step_00000002.pt"
    payload = torch.load(path, weights_only=False)
    assert payload["world_size"] == 1
    payload["world_size"] = 2
    torch.save(payload, path)
    code = grpo.main(flags(tiny_bart_dir, data_files, out, "--max_steps=2", *NO_SFT, "--save_every=2",
                           "--resume=True"))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == grpo.ConfigError.exit_code and len(errors) == 1, errors
    assert "processes (torchrun --nproc_per_node, all nodes): 2 -> 1" in errors[0], errors


def test_max_steps_below_the_checkpoint_says_so(grpo, capsys, two_step_run, tiny_bart_dir, data_files, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(two_step_run, out)
    code = grpo.main(flags(tiny_bart_dir, data_files, out, "--max_steps=1", *NO_SFT, "--save_every=2",
                           "--resume=True"))
    stderr = capsys.readouterr().err
    assert code == 0, stderr
    lines = [line for line in stderr.splitlines() if "below the checkpoint's step" in line]
    assert lines == ["note: --max_steps=1 is below the checkpoint's step 2: no step to run"], stderr


def test_fewer_gpus_than_saved_random_states(grpo, monkeypatch):
    """No GPU needed: torch.cuda is monkeypatched to show 1 device, the state holds 3."""
    restored, logged = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state = {**grpo.rng_state(), "cuda": [torch.zeros(8, dtype=torch.uint8) + i for i in range(3)]}
    grpo.set_rng_state(state, logged.append)
    assert len(restored) == 1 and len(restored[0]) == 1 and torch.equal(restored[0][0], state["cuda"][0])
    assert len(logged) == 1 and "3 GPUs and 1 are visible" in logged[0], logged
    grpo.set_rng_state({**state, "cuda": state["cuda"][:1]}, logged.append)  # as many as visible: no note
    assert len(logged) == 1


# --------------------------------------------------------------------------------------------------
# 11. The printed continue command, pasted as is
# --------------------------------------------------------------------------------------------------
def test_continue_command_quotes_and_names_the_launcher(grpo):
    argv = ["scripts/my grpo.py", "--source_prefix=it's a summary: ", "--resume", "--max_steps=3"]
    plain = grpo.continue_command(argv, {})
    assert shlex.split(plain) == ["python", "scripts/my grpo.py", "--source_prefix=it's a summary: ", "--max_steps=3",
                                  "--resume=True"]
    torchrun = grpo.continue_command(argv, {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"})
    assert shlex.split(torchrun)[:3] == ["torchrun", "--standalone", "--nproc_per_node=4"]
    nodes = grpo.continue_command(argv, {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"})
    assert "--nnodes=2 --nproc_per_node=4" in nodes and "rendezvous" in nodes


def test_pasted_continue_command_resumes(tiny_bart_dir, data_files, tmp_path):
    """A subprocess stopped by SIGTERM (sent by itself from a wrapper, as step 2's rollout begins) prints a command
    with a quoted --source_prefix (a space and an apostrophe); run through bash as printed, it resumes and finishes."""
    wrapper = tmp_path / "stop_once.py"
    wrapper.write_text(textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(SCRIPT.parent)!r})
        import grpo_encoder_decoder_summarization as grpo
        original, calls = grpo.rollout_step, [0]
        def rollout_step(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 2 and not any(a.startswith("--resume") for a in sys.argv):
                os.kill(os.getpid(), signal.SIGTERM)
            return original(*args, **kwargs)
        grpo.rollout_step = rollout_step
        sys.exit(grpo.main())
    """))
    out = tmp_path / "run dir"
    args = [f"--model_name={tiny_bart_dir}", *data_args(data_files), *ARGS, *NO_SFT, "--max_steps=2",
            "--source_prefix=it's a summary: ", f"--output_dir={out}"]
    stopped = subprocess.run([sys.executable, str(wrapper), *args], cwd=tmp_path, env=subprocess_env(),
                             capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 143, stopped.stderr
    lines = [line for line in stopped.stderr.splitlines() if "Continue with: " in line]
    assert len(lines) == 1, stopped.stderr
    command = lines[0].split("Continue with: ", 1)[1]
    assert shlex.split(command)[:2] == ["python", str(wrapper)] and shlex.split(command)[-1] == "--resume=True"
    env = subprocess_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    resumed = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
    check_ok(resumed)
    assert "resumed from" in resumed.stderr and "at step 1" in resumed.stderr, resumed.stderr
    assert json.loads((out / "run_config.json").read_text())["source_prefix"] == "it's a summary: "
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2]


# --------------------------------------------------------------------------------------------------
# 12. Start checks (issue 20): a run at exactly the model's positions, truncation counted over both splits
# at the start, no minute of retries when the hub is unreachable, an architecture that loads but cannot
# sample is one line
# --------------------------------------------------------------------------------------------------
def test_a_run_at_exactly_the_positions_trains(grpo, short_bart_dir, data_files, tmp_path):
    """The untrained model samples up to max_new_tokens = the decoder's positions, articles are cut to the
    encoder's: the run ends without an index error (the limit is not off by one)."""
    train, validation = data_files
    result = main_in_process(grpo, f"--model_name={short_bart_dir}", f"--train_file={train}",
                             f"--validation_file={validation}", f"--output_dir={tmp_path / 'run'}", "--device=cpu",
                             f"--max_source_length={POSITIONS}", f"--max_new_tokens={POSITIONS}", "--max_steps=1",
                             "--batch_size=2", "--group_size=2", "--micro_batch_size=4", "--eval_samples=2",
                             "--sft_steps=1", "--sft_batch_size=2")
    check_ok(result)
    lengths = result.stderr.index("lengths: --max_source_length=64 cuts ")  # item 3: said first
    assert lengths < result.stderr.index("sft: 1 steps") < result.stderr.index("eval step 0")


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


def test_switch_transformers_fail_in_one_line_at_the_start(grpo, tmp_path, data_files, capsys):
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
    encoded, sequences = grpo.check_model_runs(model, tokenizer, torch.device("cpu"))
    logged = []
    grpo.freeze_unused_parameters(model, encoded, sequences, logged.append)
    after = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(3)) and model.training  # same draws after both; the mode restored
    assert not logged and all(p.requires_grad and p.grad is None for p in model.parameters())  # nothing unused


def test_freeze_unused_parameters_freezes_what_the_forward_never_uses(grpo, untied_bart_dir):
    """A BART with untied embeddings (the demo's) keeps a `shared` embedding that neither encoder nor decoder
    reads; trained under torchrun, it would stop DDP ("parameters that were not used in producing loss")."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(untied_bart_dir)
    logged = []
    encoded, sequences = grpo.check_model_runs(model, AutoTokenizer.from_pretrained(untied_bart_dir),
                                               torch.device("cpu"))
    grpo.freeze_unused_parameters(model, encoded, sequences, logged.append)
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["model.shared.weight"] and logged == ["note: frozen 1 parameter the model's forward never "
                                                            "uses: model.shared.weight"], (frozen, logged)
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# 13. Smaller: the punkt note on rank 0 only, "1 training row", UTF-8 JSONL, --max_steps=0's last lines
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


def test_max_steps_0_names_only_files_that_exist(grpo, tiny_t5_dir, data_files, tmp_path):
    train, validation = data_files
    out = tmp_path / "run"
    result = main_in_process(grpo, f"--model_name={tiny_t5_dir}", f"--train_file={train}",
                             f"--validation_file={validation}", f"--output_dir={out}", "--device=cpu",
                             "--max_source_length=64", "--max_new_tokens=8", "--max_steps=0", "--eval_samples=2")
    check_ok(result)
    assert "metrics.jsonl" not in result.stderr and not (out / "metrics.jsonl").exists()
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"open: {out}/final (the model), {out}/eval.jsonl (held-out scores)"
    assert (out / "final").is_dir() and (out / "eval.jsonl").exists()
