"""Preemption (issue 19): Ctrl-C or SIGTERM stops at the next boundary in whatever phase it lands (SFT, rollout,
update, evaluation), saves the last finished step and exits 128 + the signal; --resume=True then continues exactly.
Also the resume checks: the process count, --max_steps below the checkpoint, fewer GPUs than saved random states,
and a continue command that can be pasted as is.

The signal is sent by the run to itself from a monkeypatched function (the n-th call of sft_labels, grpo_loss,
compute_rewards or generate), so where it lands never depends on timing. Runs are in-process (grpo.main) except
where the printed command or torchrun is the point.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import SCRIPT, check_ok, data_args, read_jsonl, subprocess_env

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


def checkpoint_names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.endswith(".pt"))


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


# --------------------------------------------------------------------------------------------------
# 1. SFT: a signal during SFT saves its last finished step, and the resume goes on with SFT, then GRPO
# --------------------------------------------------------------------------------------------------
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
# 2. GRPO: a signal inside a step (reward, update) or an evaluation
# --------------------------------------------------------------------------------------------------
def test_signal_in_the_reward_drops_the_step(grpo, monkeypatch, capsys, straight, tiny_bart_dir, data_files, tmp_path):
    """Landing in step 3's reward: the rollout ends, step 3 is dropped at the next boundary, step 2 is saved."""
    out = tmp_path / "run"
    stderr, saved = stop_and_resume(grpo, monkeypatch, capsys, tiny_bart_dir, data_files, out, "compute_rewards", 3)
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
# 3. Resume checks: process count, --max_steps below the checkpoint, fewer GPUs
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
# 4. The printed continue command, pasted as is
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
    """A subprocess stopped by SIGTERM (sent by itself from a wrapper, at the first reward of step 2) prints a command
    with a quoted --source_prefix (a space and an apostrophe); run through bash as printed, it resumes and finishes."""
    wrapper = tmp_path / "stop_once.py"
    wrapper.write_text(textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(SCRIPT.parent)!r})
        import grpo_encoder_decoder_summarization as grpo
        original, calls = grpo.compute_rewards, [0]
        def compute_rewards(*args):
            calls[0] += 1
            if calls[0] == 2 and not any(a.startswith("--resume") for a in sys.argv):
                os.kill(os.getpid(), signal.SIGTERM)
            return original(*args)
        grpo.compute_rewards = compute_rewards
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
# 5. Two processes (torchrun, gloo): a signal on one rank; both stop at the same boundary and save
# --------------------------------------------------------------------------------------------------
SIGNAL_ON_RANK_1 = """
import os, signal, sys
sys.path.insert(0, {root!r})
import grpo_encoder_decoder_summarization as grpo
original, calls = grpo.grpo_loss, [0]
def grpo_loss(*args, **kwargs):  # rank 1 alone: SIGTERM in the first micro-batch of step 2's update
    calls[0] += 1
    if calls[0] == 3 and os.environ["RANK"] == "1" and "--resume=True" not in sys.argv:
        os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)
grpo.grpo_loss = grpo_loss
sys.exit(grpo.main())
"""


def test_two_processes_stop_at_the_same_boundary(tiny_bart_dir, data_files, tmp_path):
    """SIGTERM reaches rank 1 only, inside step 2's update (2 micro-batches per process): both ranks agree at the
    next micro-batch, save step 1 and exit 143; nobody waits in a collective alone. 5 held-out articles in batches
    of 1 give the ranks 3 and 2 evaluation batches: they still pass the same boundaries. The resume under torchrun
    (the printed command's launcher) ends as the run never stopped."""
    from conftest import assert_resumed_run_matches, run_torchrun

    wrapper = tmp_path / "signal_rank_1.py"
    wrapper.write_text(SIGNAL_ON_RANK_1.format(root=str(SCRIPT.parent)))
    common = [f"--model_name={tiny_bart_dir}", *data_args(data_files), "--batch_size=2", "--group_size=4",
              "--micro_batch_size=4", "--max_new_tokens=8", "--max_source_length=64", "--eval_samples=5",
              "--eval_batch_size=1", "--eval_every=2", "--save_every=100", "--sft_steps=1", "--learning_rate=1e-3",
              "--device=cpu", "--max_steps=3"]
    out, straight = tmp_path / "stopped", tmp_path / "straight"
    stopped = run_torchrun(*common, f"--output_dir={out}", script=wrapper)
    assert stopped.returncode != 0 and "KeyboardInterrupt" not in stopped.stderr, stopped.stderr[-3000:]
    assert "stopped at step 1; checkpoint saved" in stopped.stderr, stopped.stderr[-3000:]
    assert re.search(r"exitcode\s*:\s*143", stopped.stderr), stopped.stderr[-3000:]  # torchrun's report of a rank
    assert checkpoint_names(out) == ["step_00000001.pt"]
    assert torch.load(out / "checkpoints" / "step_00000001.pt", weights_only=False)["world_size"] == 2
    command = [line for line in stopped.stderr.splitlines() if "Continue with: " in line][0]
    assert shlex.split(command.split("Continue with: ", 1)[1])[:3] == ["torchrun", "--standalone",
                                                                       "--nproc_per_node=2"]
    resumed = run_torchrun(*common, f"--output_dir={out}", "--resume=True", script=wrapper)
    check_ok(resumed)
    assert "at step 1" in resumed.stderr, resumed.stderr[-3000:]
    check_ok(run_torchrun(*common, f"--output_dir={straight}", script=SCRIPT))
    assert_resumed_run_matches(out, straight, resumed_at=1)
