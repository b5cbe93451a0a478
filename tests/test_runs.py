"""Robustness tests of grpo_encoder_decoder_summarization.py: exact resume after SIGKILL, atomic checkpoints,
Ctrl-C, messy data, truncated completions, trust_remote_code, and NaN losses.

Everything runs offline on the tiny models of conftest.py. Subprocess runs are kept tiny (2 articles x 4 samples,
8 new tokens); polling loops use generous deadlines because the CPU is shared, and nothing asserts on timing.
"""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import SCRIPT, assert_resumed_run_matches, check_ok, data_args, read_jsonl, run_script, subprocess_env

TINY = ("--batch_size=2", "--group_size=4", "--micro_batch_size=8", "--max_new_tokens=8", "--max_source_length=64",
        "--eval_samples=4", "--device=cpu")
POLL_DEADLINE = 240.0  # seconds; a shared CPU can be slow, and a healthy run never gets near this


def checkpoint_steps(output_dir: Path) -> list[int]:
    directory = output_dir / "checkpoints"
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := re.fullmatch(r"step_(\d+)\.pt", p.name)))


def popen_script(*args: str, cwd: Path, log_dir: Path) -> tuple[subprocess.Popen, Path, Path]:
    """Start the script in the background; stdout and stderr go to files (no pipe can fill up and block it)."""
    stdout_path, stderr_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
    with open(stdout_path, "w") as stdout, open(stderr_path, "w") as stderr:
        process = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, env=subprocess_env(),
                                   stdout=stdout, stderr=stderr)
    return process, stdout_path, stderr_path


def wait_for(condition, process: subprocess.Popen, what: str, stderr_path: Path) -> bool:
    """Poll until condition() or the process exits; True if the condition held. Fails only past a long deadline."""
    deadline = time.monotonic() + POLL_DEADLINE
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return condition()
        time.sleep(0.02)
    process.kill()
    process.wait()
    pytest.fail(f"no {what} after {POLL_DEADLINE:.0f} s; stderr:\n{stderr_path.read_text()}")


# --------------------------------------------------------------------------------------------------
# 1. Exact resume after SIGKILL
# --------------------------------------------------------------------------------------------------
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
                        f"--output_dir={out}", cwd=directory, timeout=300)
    check_ok(result)
    return out


def test_resume_after_sigkill_is_exact(straight_run, tiny_bart_dir, data_files, tmp_path):
    out = tmp_path / "killed"
    args = (f"--model_name={tiny_bart_dir}", *data_args(data_files), *EXACT_ARGS, "--keep_checkpoints=10",
            f"--output_dir={out}")
    process, _, stderr_path = popen_script(*args, cwd=tmp_path, log_dir=tmp_path)
    try:
        saved = wait_for(lambda: (out / "checkpoints").is_dir() and bool(checkpoint_steps(out)), process,
                         "checkpoint", stderr_path)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    assert saved, f"exit {process.returncode} before any checkpoint; stderr:\n{stderr_path.read_text()}"
    # killed, not finished: steps 3..6 and two evaluations take seconds, the poll looks every 20 ms
    assert process.returncode == -signal.SIGKILL, stderr_path.read_text()
    assert "Traceback" not in stderr_path.read_text()

    # The kill lands at some step >= 2. Keep only the first checkpoint (step 2): exactly what a kill right after
    # that save leaves behind, so steps 3..6 are always recomputed. The metrics/eval lines the killed run wrote
    # after step 2 stay, and the resumed run must drop them. A save killed half-way leaves a .tmp file: plant
    # one with a higher step number, full of junk, which --resume must ignore.
    steps = checkpoint_steps(out)
    assert steps[0] == 2, steps
    for step in steps[1:]:
        (out / "checkpoints" / f"step_{step:08d}.pt").unlink()
    (out / "checkpoints" / "step_00000009.pt.tmp").write_bytes(b"half a checkpoint")
    written_before = [m["step"] for m in read_jsonl(out / "metrics.jsonl")]
    assert written_before[:2] == [1, 2], written_before

    result = run_script(*args, "--resume=True", cwd=tmp_path, timeout=300)
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


# --------------------------------------------------------------------------------------------------
# 2. Atomic checkpoints, rotation, best/
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


# --------------------------------------------------------------------------------------------------
# 3. Ctrl-C: finish the step, save, say how to resume, exit 130
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signal_number, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["ctrl_c", "sigterm"])
def test_a_signal_saves_and_resumes(signal_number, exit_code, tiny_bart_dir, data_files, tmp_path):
    """Ctrl-C, and SIGTERM (what SLURM sends before pre-empting a job): finish the step, save a checkpoint, say
    how to resume, exit 128 + the signal number; the resumed run goes on from that checkpoint."""
    out = tmp_path / "run"
    common = (f"--model_name={tiny_bart_dir}", *data_args(data_files), *TINY, "--eval_every=1000",
              "--save_every=1000", f"--output_dir={out}")
    process, _, stderr_path = popen_script(*common, "--max_steps=200", cwd=tmp_path, log_dir=tmp_path)
    metrics_path = out / "metrics.jsonl"
    try:
        started = wait_for(lambda: metrics_path.is_file() and bool(metrics_path.read_text().strip()), process,
                           "metrics line", stderr_path)
        assert started, f"exit {process.returncode} before any step; stderr:\n{stderr_path.read_text()}"
        process.send_signal(signal_number)
        returncode = process.wait(timeout=POLL_DEADLINE)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = stderr_path.read_text()
    assert returncode == exit_code, f"exit {returncode}; stderr:\n{stderr}"
    assert "Traceback" not in stderr and signal.Signals(signal_number).name in stderr, stderr
    assert any("--resume=True" in line for line in stderr.splitlines()), stderr

    steps = [m["step"] for m in read_jsonl(metrics_path)]
    last = steps[-1]
    assert steps == list(range(1, last + 1)) and last < 200
    assert checkpoint_steps(out)[-1] == last
    assert f"stopped at step {last}" in stderr, stderr
    assert not (out / "final").exists()  # a stopped run is not a finished one

    result = run_script(*common, f"--max_steps={last + 1}", "--resume=True", cwd=tmp_path, timeout=300)
    check_ok(result)
    assert f"at step {last}" in result.stderr, result.stderr
    assert [m["step"] for m in read_jsonl(metrics_path)] == list(range(1, last + 2))
    assert (out / "final" / "config.json").is_file()


# --------------------------------------------------------------------------------------------------
# 4. Messy data: empty rows skipped and counted, long articles truncated and counted, CSV input
# --------------------------------------------------------------------------------------------------
def good_rows(data_files, count: int) -> list[dict]:
    return read_jsonl(data_files[0])[:count]


def tiny_policy_and_batch(grpo, model_dir, data_files, max_new_tokens: int):
    """(config, policy in eval mode, tokenizer, a batch of 2 articles) for in-process rollouts, G = 4."""
    rows = good_rows(data_files, 2)
    batch = {"article": [r["article"] for r in rows], "highlights": [r["highlights"] for r in rows]}
    config = grpo.Config(model_name=str(model_dir), group_size=4, batch_size=2, max_new_tokens=max_new_tokens,
                         max_source_length=64, device="cpu")
    policy, tokenizer = grpo.load_policy_and_tokenizer(config, torch.device("cpu"))
    return config, policy.eval(), tokenizer, batch


def skipped_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if re.search(r"skipped \d+ of \d+ rows", line)]


def test_empty_rows_are_skipped_and_counted(tiny_bart_dir, data_files, tmp_path):
    bad = [{"article": "", "highlights": "A summary."},
           {"article": "Some article text here.", "highlights": "   \n\t "},
           {"article": " \n ", "highlights": "A summary."},
           {"article": "Another article.", "highlights": None}]
    rows = good_rows(data_files, 6) + bad[:2] + good_rows(data_files, 12)[6:] + bad[2:]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    out = tmp_path / "run"
    result = run_script(f"--model_name={tiny_bart_dir}", f"--train_file={train}", f"--validation_file={data_files[1]}",
                        *TINY, "--max_steps=1", f"--output_dir={out}", cwd=tmp_path)
    check_ok(result)
    lines = skipped_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "skipped 4 of 16 rows" in lines[0], lines[0]
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1]


def test_long_articles_are_truncated_and_counted(tiny_bart_dir, data_files, tmp_path):
    out = tmp_path / "run"
    result = run_script(f"--model_name={tiny_bart_dir}", *data_args(data_files), *TINY, "--max_source_length=8",
                        "--max_steps=2", f"--output_dir={out}", cwd=tmp_path)
    check_ok(result)
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    # Every synthetic article is far longer than 8 tokens: each step adds its 2 articles to the running count.
    assert [m["articles_truncated"] for m in metrics] == [2, 4]


def test_tokenize_articles_truncates_and_counts(grpo, tiny_bart_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bart_dir)
    config = grpo.Config(max_source_length=8)
    short = "the council voted ."
    long = "the council of ashgrove voted on monday to spend money on a new bridge ."
    encoded, truncated = grpo.tokenize_articles(tokenizer, [short, long], config, torch.device("cpu"))
    assert truncated == 1
    assert encoded["input_ids"].shape == (2, 8)
    assert encoded["input_ids"][1, -1].item() == tokenizer.eos_token_id  # truncation keeps the closing </s>
    assert grpo.tokenize_articles(tokenizer, [short, short], config, torch.device("cpu"))[1] == 0


def test_csv_train_file(tiny_bart_dir, data_files, tmp_path):
    rows = good_rows(data_files, 12) + [{"article": "An article with no summary.", "highlights": ""}]
    train = tmp_path / "train.csv"
    with open(train, "w", encoding="utf-8", newline="") as file:  # highlights hold newlines: csv quotes them
        writer = csv.DictWriter(file, fieldnames=["article", "highlights"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "run"
    result = run_script(f"--model_name={tiny_bart_dir}", f"--train_file={train}", f"--validation_file={data_files[1]}",
                        *TINY, "--max_steps=1", f"--output_dir={out}", cwd=tmp_path)
    check_ok(result)
    lines = skipped_lines(result.stderr)
    assert len(lines) == 1 and "skipped 1 of 13 rows" in lines[0], result.stderr
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1]


# --------------------------------------------------------------------------------------------------
# 5. Truncated completions (no EOS within max_new_tokens) and mask_truncated_completions
# --------------------------------------------------------------------------------------------------
def test_mask_truncated_completions(grpo, tiny_bart_dir, data_files):
    device = torch.device("cpu")
    base, policy, tokenizer, batch = tiny_policy_and_batch(grpo, tiny_bart_dir, data_files, max_new_tokens=2)
    results = {}
    for flag in (True, False):
        config = grpo.Config(**{**vars(base), "mask_truncated_completions": flag})
        torch.manual_seed(0)  # the same samples with and without the flag
        results[flag] = grpo.rollout_step(policy, tokenizer, batch, config, device, grpo.PhaseTimer(device))

    (masked, masked_stats), (plain, plain_stats) = results[True], results[False]
    assert torch.equal(masked.completion_ids, plain.completion_ids)
    no_eos = ~(plain.completion_ids == tokenizer.eos_token_id).any(dim=1)  # (B*G,)
    # An untrained model over ~480 words samples EOS at a given position with probability ~1/480, so nearly
    # every sample runs out of tokens. If every one ends in EOS exactly at the limit, EOS was forced there
    # (see test_sampling_ignores_the_checkpoints_generation_defaults).
    assert no_eos.any(), ("every sample ends with EOS within max_new_tokens=2, so no sample counts as truncated; "
                          f"completion_ids:\n{plain.completion_ids}")
    for stats in (masked_stats, plain_stats):
        assert stats["truncated_fraction"] == pytest.approx(no_eos.float().mean().item())
    assert torch.all(masked.mask[no_eos] == 0)
    assert torch.all(plain.mask[no_eos] == 1)
    assert torch.equal(masked.mask[~no_eos], plain.mask[~no_eos])  # samples that stopped keep their tokens
    assert torch.all(plain.mask[~no_eos].sum(dim=1) >= 1)


def test_sampling_ignores_the_checkpoints_generation_defaults(grpo, tiny_bart_dir, data_files):
    """generation_settings promises that a checkpoint's own generation defaults cannot change the distribution
    the rollout samples from (and then scores as if unconstrained). Give the policy generation defaults like
    facebook/bart-large-cnn's (forced_bos_token_id aside, which the script keeps on purpose); with the same seed,
    the samples must be those of the same weights with no generation defaults at all."""
    from transformers import GenerationConfig

    device = torch.device("cpu")
    config, policy, tokenizer, batch = tiny_policy_and_batch(grpo, tiny_bart_dir, data_files, max_new_tokens=8)
    ids = dict(decoder_start_token_id=policy.config.decoder_start_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    samples = {}
    for name, defaults in {"bare": {}, "bart-large-cnn-like": dict(
            min_length=56, no_repeat_ngram_size=3, forced_eos_token_id=tokenizer.eos_token_id, num_beams=4)}.items():
        policy.generation_config = GenerationConfig(**ids, **defaults)
        torch.manual_seed(0)
        rollout, _ = grpo.rollout_step(policy, tokenizer, batch, config, device, grpo.PhaseTimer(device))
        samples[name] = rollout.completion_ids
    assert torch.equal(samples["bart-large-cnn-like"], samples["bare"]), (
        "the checkpoint's generation_config changed the sampled summaries:\n"
        f"without it:\n{samples['bare']}\nwith it:\n{samples['bart-large-cnn-like']}")


# --------------------------------------------------------------------------------------------------
# 6. trust_remote_code is off unless asked for
# --------------------------------------------------------------------------------------------------
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
# 7. NaN/inf losses: skipped without touching the weights, counted, and the run stops after too many
# --------------------------------------------------------------------------------------------------
def test_nan_losses_are_skipped_and_stop_the_run(grpo, tiny_bart_dir, data_files, tmp_path, monkeypatch, capfd):
    real_loss, real_update = grpo.grpo_loss, grpo.grpo_update
    seen: dict = {}

    def nan_loss(*args, **kwargs):
        loss, stats = real_loss(*args, **kwargs)
        return loss * float("nan"), stats  # still attached to the graph, so backward runs and yields NaN grads

    def watching_update(policy_forward, optimizer, *args, **kwargs):
        if not seen:
            seen["module"], seen["optimizer"] = policy_forward, optimizer
            seen["before"] = {k: v.detach().clone() for k, v in policy_forward.state_dict().items()}
        return real_update(policy_forward, optimizer, *args, **kwargs)

    monkeypatch.setattr(grpo, "grpo_loss", nan_loss)
    monkeypatch.setattr(grpo, "grpo_update", watching_update)
    out = tmp_path / "run"
    code = grpo.main([f"--model_name={tiny_bart_dir}", *data_args(data_files), *TINY, "--max_steps=10",
                      "--max_nonfinite_steps=3", f"--output_dir={out}"])
    stderr = capfd.readouterr().err

    assert code != 0, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "3 steps in a row" in errors[0] and "NaN/inf" in errors[0], stderr
    for step in (1, 2, 3):
        assert f"step {step} had a NaN/inf loss" in stderr, stderr
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert [m["nonfinite_steps"] for m in metrics] == [1, 2, 3]
    assert not (out / "final").exists()

    # No optimizer step ever ran, and the weights are those the first update started from.
    assert seen, "grpo_update was never called"
    assert len(seen["optimizer"].state) == 0
    for name, tensor in seen["module"].state_dict().items():
        assert torch.equal(tensor, seen["before"][name]), name
        assert torch.isfinite(tensor).all(), name


# --------------------------------------------------------------------------------------------------
# keep_lines_up_to: the log trimming a resume relies on
# --------------------------------------------------------------------------------------------------
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
