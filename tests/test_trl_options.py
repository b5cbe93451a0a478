"""The options and logs TRL users expect: loss_type=gspo_token, scale_rewards=group|batch|none, the clip fractions
split by side, the policy's token entropy, completions.jsonl, and --report_to=wandb,tensorboard.

Expected numbers are worked out by hand in the comments; the trackers are tested offline (wandb's offline mode
writes a local run file; TensorBoard's event files are read back with its EventAccumulator).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import math
import struct

import pytest
import torch

from conftest import check_ok, data_args, read_jsonl, run_script, subprocess_env

EPS = 1e-4  # group_advantages' default eps


# --------------------------------------------------------------------------------------------------
# loss_type = gspo_token
# --------------------------------------------------------------------------------------------------
# N=2 sequences, T=2, every token real, beta=0, epsilon=0.2, A = [+1, +1].
#   row 0: log-ratios [0.1, 0.1] -> s_0 = exp(0.1) = 1.10517, inside [0.8, 1.2]
#   row 1: log-ratios [0.5, 0.3] -> s_1 = exp(0.4) = 1.49182 > 1.2 with A > 0: clipped to 1.2 (no gradient)
# Every token's ratio has the value s_i, so the objective per token is s_0 (row 0) and 1.2 (row 1);
#   loss = -(mean over rows of the token means) = -(s_0 + 1.2) / 2 = -1.152585
# Gradient with respect to logp of a row-0 token: d/dlogp [ -(1/2) (1/2) (sg(s_0) e^(logp - sg(logp))) ] = -s_0 / 4;
#   row 1 is clipped: 0. clip_fraction_high = 2 of 4 tokens, clip_fraction_low = 0.
def gspo_hand_case():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], dtype=torch.float64, requires_grad=True)
    old = logp.detach() - torch.tensor([[0.1, 0.1], [0.5, 0.3]], dtype=torch.float64)
    return logp, old, torch.tensor([1.0, 1.0], dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)


@pytest.mark.parametrize("loss_type", ["gspo_token", "gspo"])
def test_gspo_token_hand_computed_value_and_gradient(grpo, loss_type):
    logp, old, advantages, mask = gspo_hand_case()
    loss, stats = grpo.grpo_loss(logp, old, logp.detach(), advantages, mask, epsilon=0.2, beta=0.0,
                                 loss_type=loss_type)
    loss.backward()
    s0 = math.exp(0.1)
    assert loss.item() == pytest.approx(-(s0 + 1.2) / 2, abs=1e-12)
    assert -(s0 + 1.2) / 2 == pytest.approx(-1.152585, abs=1e-6)
    torch.testing.assert_close(logp.grad, torch.tensor([[-s0 / 4, -s0 / 4], [0.0, 0.0]], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    assert stats["clip_fraction_high"].item() == 0.5 and stats["clip_fraction_low"].item() == 0.0
    assert stats["clip_fraction"].item() == 0.5


def test_gspo_token_ratio_is_the_sequence_ratio_on_every_token(grpo):
    """The formula itself: token ratio = sg(s_i) * exp(logp - sg(logp)), value s_i, gradient s_i * dlogp.

    With epsilon huge (nothing clipped), beta = 0 and A = 1 on a single real token per row, the loss is
    -mean_i s_i, and the gradient on the real token of row i is -s_i / N while the masked tokens get none.
    """
    logp = torch.tensor([[-1.0, -4.0], [-2.0, -0.1]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.3, -1.0], [-1.5, -9.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    loss, _ = grpo.grpo_loss(logp, old, logp.detach(), torch.ones(2, dtype=torch.float64), mask, epsilon=100.0,
                             beta=0.0, loss_type="gspo_token")
    loss.backward()
    s = [math.exp(0.3), math.exp(-0.5)]  # row i's only real token: logp - old
    assert loss.item() == pytest.approx(-(s[0] + s[1]) / 2, abs=1e-12)
    torch.testing.assert_close(logp.grad, torch.tensor([[-s[0] / 2, 0.0], [-s[1] / 2, 0.0]], dtype=torch.float64),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_gspo_token_equals_gspo_in_value_and_gradient(grpo, seed):
    """With one advantage per sequence and the same per-sequence token mean, GSPO-token's loss and gradient are
    GSPO's: each token's ratio has the value s_i (same min/clip decision on every token of the sequence, so a
    clipped sequence gives no gradient in both), and sum_t s_i dlogp_t / |y_i| is d s_i. This holds for every
    input (random log-probs, padding, both clip sides, a KL term, epsilon_high), so gspo_token only differs
    from gspo where TRL combines it with per-token advantages, which GRPO's sequence rewards do not have."""
    generator = torch.Generator().manual_seed(seed)
    N, T = 6, 5
    logp = -torch.rand(N, T, generator=generator, dtype=torch.float64) * 3
    # sequence log-ratios about [0.3, -0.3, 0, 0, -0.25, 0.25] (token noise +-0.06) with advantage signs
    # [-, +, +, -, -, +]: row 0 clipped low, row 1 clipped high, rows 2-3 inside, rows 4-5 outside but unclipped
    shift = torch.tensor([0.3, -0.3, 0.0, 0.0, -0.25, 0.25], dtype=torch.float64).unsqueeze(1)
    old = logp + shift + (torch.rand(N, T, generator=generator, dtype=torch.float64) - 0.5) * 0.12
    ref = logp + (torch.rand(N, T, generator=generator, dtype=torch.float64) - 0.5)
    signs = torch.tensor([-1.0, 1.0, 1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    advantages = signs * (0.1 + torch.rand(N, generator=generator, dtype=torch.float64))
    mask = (torch.rand(N, T, generator=generator) > 0.3).double()
    mask[:, 0] = 1.0
    results = {}
    for loss_type in ("gspo", "gspo_token"):
        leaf = logp.clone().requires_grad_(True)
        loss, stats = grpo.grpo_loss(leaf, old, ref, advantages, mask, epsilon=0.1, beta=0.04, epsilon_high=0.15,
                                     loss_type=loss_type)
        loss.backward()
        results[loss_type] = (loss.detach(), leaf.grad, {k: v.item() for k, v in stats.items()})
    (loss_a, grad_a, stats_a), (loss_b, grad_b, stats_b) = results["gspo"], results["gspo_token"]
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_a, grad_b, rtol=0, atol=1e-12)
    assert stats_a == pytest.approx(stats_b, abs=1e-12)
    assert stats_a["clip_fraction_low"] > 0 and stats_a["clip_fraction_high"] > 0 and stats_a["clip_fraction"] < 1


def test_gspo_token_differs_from_grpo_when_token_ratios_differ(grpo):
    """A check that the test above can fail: with unequal token log-ratios, grpo's token ratios differ from gspo_token's."""
    logp, old, advantages, mask = gspo_hand_case()
    losses = [grpo.grpo_loss(logp, old, logp.detach(), advantages, mask, 10.0, 0.0, loss_type=t)[0].item()
              for t in ("grpo", "gspo_token")]
    assert losses[0] != pytest.approx(losses[1], abs=1e-6)


def test_gspo_token_micro_batch_weight_is_the_sequence_share(grpo):
    mask = torch.ones(8, 3)
    assert grpo.micro_batch_weight("gspo_token", mask[:2], mask) == 2 / 8


# --------------------------------------------------------------------------------------------------
# scale_rewards = group | batch | none
# --------------------------------------------------------------------------------------------------
# Rewards [0, 1 | 2, 2], G = 2. Group means 0.5 and 2, so r - mean = [-0.5, 0.5, 0, 0].
#   group: group sample stds sqrt(0.5) and 0   -> [-0.5, 0.5] / (0.707107 + eps), and [0, 0] (equal rewards)
#   batch: batch mean 1.25, sample std sqrt(((-1.25)^2 + (-0.25)^2 + 0.75^2 + 0.75^2) / 3) = sqrt(2.75 / 3)
#          = 0.957427                         -> [-0.5, 0.5, 0, 0] / (0.957427 + eps)
#   none:                                     -> [-0.5, 0.5, 0, 0]
REWARDS = [0.0, 1.0, 2.0, 2.0]


def test_scale_rewards_group_hand_computed(grpo):
    a = 0.5 / (math.sqrt(0.5) + EPS)
    torch.testing.assert_close(grpo.group_advantages(torch.tensor(REWARDS, dtype=torch.float64), 2, scale="group"),
                               torch.tensor([-a, a, 0.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-12)


def test_scale_rewards_batch_hand_computed(grpo):
    a = 0.5 / (math.sqrt(2.75 / 3) + EPS)
    torch.testing.assert_close(grpo.group_advantages(torch.tensor(REWARDS, dtype=torch.float64), 2, scale="batch"),
                               torch.tensor([-a, a, 0.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-12)


def test_scale_rewards_batch_uses_the_given_std_of_all_processes(grpo):
    """Under torchrun the batch std is of every process's rewards (batch_reward_std gathers them)."""
    a = 0.5 / (2.0 + EPS)
    result = grpo.group_advantages(torch.tensor(REWARDS, dtype=torch.float64), 2, scale="batch",
                                   batch_std=torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(result, torch.tensor([-a, a, 0.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-12)
    # one process: batch_reward_std is the plain sample std
    assert grpo.batch_reward_std(torch.tensor(REWARDS)).item() == pytest.approx(0.957427, abs=1e-6)


def test_scale_rewards_none_hand_computed(grpo):
    torch.testing.assert_close(grpo.group_advantages(torch.tensor(REWARDS, dtype=torch.float64), 2, scale="none"),
                               torch.tensor([-0.5, 0.5, 0.0, 0.0], dtype=torch.float64), rtol=0, atol=0)


def test_scale_rewards_flag_parses_and_rejects(grpo):
    config, _ = grpo.parse_args(["--scale_rewards=batch"])
    assert config.scale_rewards == "batch"
    grpo.validate_config(config)
    for bad in ("True", "sequence"):
        with pytest.raises(grpo.ConfigError, match="--scale_rewards must be one of group, batch, none"):
            grpo.validate_config(dataclasses.replace(grpo.Config(), scale_rewards=bad))
    with pytest.raises(ValueError):
        grpo.group_advantages(torch.tensor(REWARDS), 2, scale="std")


# --------------------------------------------------------------------------------------------------
# clip_fraction_low / clip_fraction_high
# --------------------------------------------------------------------------------------------------
# One row, 4 real tokens (and 1 padding token), epsilon = 0.2:
#   A = +1 row: log-ratios [0.25, -0.5, 0.0, 0.22, (9 masked)]: ratio e^0.25 = 1.284 > 1.2 (high clip), e^-0.5 < 0.8
#   but A > 0 (min keeps the unclipped term, not counted), e^0.22 = 1.246 > 1.2 (high clip) -> high 2/4, low 0.
#   A = -1 row: log-ratios [-0.5, 0.5, -0.3, 0.0]: e^-0.5 = 0.607 and e^-0.3 = 0.741 < 0.8 with A < 0 (low clip),
#   e^0.5 > 1.2 but A < 0 (not counted) -> low 2/4, high 0.
# Both rows together (8 real tokens): low 2/8, high 2/8, clip_fraction 4/8.
# With epsilon_high = 0.245: e^0.22 = 1.246 > 1.245 still clipped, e^0.25 = 1.284 too; with 0.3 neither is.
def clip_case():
    d = torch.tensor([[0.25, -0.5, 0.0, 0.22, 9.0], [-0.5, 0.5, -0.3, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1, 1, 1, 0], [1.0, 1, 1, 1, 0]], dtype=torch.float64)
    logp = torch.full_like(d, -1.0)
    return logp, logp - d, mask


def test_clip_fraction_low_and_high_hand_computed(grpo):
    logp, old, mask = clip_case()
    _, stats = grpo.grpo_loss(logp, old, logp, torch.tensor([1.0, -1.0], dtype=torch.float64), mask, 0.2, 0.0)
    assert stats["clip_fraction_low"].item() == pytest.approx(2 / 8, abs=1e-12)
    assert stats["clip_fraction_high"].item() == pytest.approx(2 / 8, abs=1e-12)
    assert stats["clip_fraction"].item() == pytest.approx(4 / 8, abs=1e-12)


def test_epsilon_high_shows_in_clip_fraction_high_only(grpo):
    logp, old, mask = clip_case()
    advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)
    for epsilon_high, high in ((0.245, 2 / 8), (0.3, 0.0)):
        _, stats = grpo.grpo_loss(logp, old, logp, advantages, mask, 0.2, 0.0, epsilon_high=epsilon_high)
        assert stats["clip_fraction_high"].item() == pytest.approx(high, abs=1e-12), epsilon_high
        assert stats["clip_fraction_low"].item() == pytest.approx(2 / 8, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# entropy
# --------------------------------------------------------------------------------------------------
def test_token_entropy_uniform_is_log_v_and_matches_the_formula(grpo):
    assert torch.allclose(grpo.token_entropy(torch.zeros(2, 3, 7)), torch.full((2, 3), math.log(7)))
    # two tokens with p = [0.5, 0.5] and one certain token: H = log 2 and 0 (hand-computed)
    logits = torch.tensor([[[0.0, 0.0], [0.0, -1e4]]], dtype=torch.float64)
    torch.testing.assert_close(grpo.token_entropy(logits), torch.tensor([[math.log(2), 0.0]], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    logits = torch.randn(3, 4, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(grpo.token_entropy(logits), -(p * p.log()).sum(-1), rtol=0, atol=1e-12)


def test_grpo_update_reports_the_mean_token_entropy_of_the_sampling_policy(grpo, tiny_bart_dir, data_files):
    from test_script import build_in_process

    config, device, policy, tokenizer, reference, optimizer, scheduler, rows = build_in_process(
        grpo, tiny_bart_dir, data_files, num_iterations=2, temperature=0.7)
    timer = grpo.PhaseTimer(device)
    rollout, _ = grpo.rollout_step(policy, tokenizer, rows, config, device, timer)
    rollout.ref_logprobs = grpo.sequence_logprobs_no_grad(grpo.GroupedSeq2Seq(reference), rollout, config, device)
    rollout.old_logprobs = grpo.sequence_logprobs_no_grad(grpo.GroupedSeq2Seq(policy), rollout, config, device)
    with torch.no_grad():  # the expected value, by the plain formula on the full logits before any update
        logits = grpo.GroupedSeq2Seq(policy)(rollout.input_ids, rollout.attention_mask, rollout.decoder_input_ids,
                                             config.group_size).double() / config.temperature
        p = torch.softmax(logits, -1)
        entropy = -(p * torch.log_softmax(logits, -1)).sum(-1)
        expected = ((entropy * rollout.mask).sum() / rollout.mask.sum()).item()
    stats = grpo.grpo_update(grpo.GroupedSeq2Seq(policy), optimizer, scheduler, rollout, config, device, timer)
    assert stats["entropy"] == pytest.approx(expected, rel=1e-5)
    assert 0 < stats["entropy"] <= math.log(len(tokenizer)) + 1e-6


# --------------------------------------------------------------------------------------------------
# A whole run: completions.jsonl, the new metrics, and --report_to=wandb,tensorboard (offline)
# --------------------------------------------------------------------------------------------------
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


@pytest.mark.parametrize("value", ["wandbb", "tensorboard,mlflow", "none,wandb"])
def test_report_to_rejects_unknown_names(grpo, value):
    with pytest.raises(grpo.ConfigError, match="--report_to must be none or a comma-separated list of wandb"):
        grpo.validate_config(dataclasses.replace(grpo.Config(), report_to=value))


@pytest.mark.parametrize("flag, package, named", [("--report_to=wandb", "wandb", "--report_to=wandb"),
                                                  ("--report_to=tensorboard", "tensorboard", "--report_to=tensorboard"),
                                                  ("--lora_r=8", "peft", "--lora_r > 0")])
def test_missing_optional_package_is_one_error_line(grpo, flag, package, named, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == package else real_find_spec(name, *args))
    assert grpo.main([flag]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"error: {named} needs the {package} package, which is not installed: pip install {package}"


def test_log_completions_every_rejects_negative(grpo):
    with pytest.raises(grpo.ConfigError, match="--log_completions_every"):
        grpo.validate_config(dataclasses.replace(grpo.Config(), log_completions_every=-1))


def _batch_std_worker(rank: int, init_file: str, results) -> None:
    import grpo_encoder_decoder_summarization as grpo

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        rewards = torch.tensor([[0.0, 1.0, 2.0, 2.0], [4.0, 4.0, 0.5, 1.5]][rank])
        results[rank] = grpo.batch_reward_std(rewards).item()
    finally:
        torch.distributed.destroy_process_group()


def test_batch_reward_std_under_two_processes_is_the_std_of_all_rewards(tmp_path):
    """scale_rewards=batch under torchrun: both processes divide by the sample std of all 8 rewards."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_batch_std_worker, args=(str(tmp_path / "init"), results), nprocs=2)
        stds = [results[0], results[1]]
    # all 8 rewards [0, 1, 2, 2, 4, 4, 0.5, 1.5]: mean 1.875; squared deviations sum 15.375
    # -> sample std sqrt(15.375 / 7) = 1.482035
    assert stds == pytest.approx([1.482035, 1.482035], abs=1e-6)
