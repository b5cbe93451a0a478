"""Unit tests of the GRPO math: advantages, completion masks, token log-probs, the loss and its micro-batching.

Expected numbers are worked out by hand in the tests (which branch of min/clip each token takes is decided
here, not by re-running the script's formula).
"""

import math

import pytest
import torch

import grpo_encoder_decoder_summarization as grpo

EPS = 1e-4  # group_advantages' default eps
LOSS_TYPES = grpo.LOSS_TYPES  # a new loss type fails below until it has its hand-computed case


# --------------------------------------------------------------------------------------------------
# group_advantages
# --------------------------------------------------------------------------------------------------
def test_group_advantages_g2_hand_computed():
    """r = [1, 3]: mean 2, sample std sqrt((1 + 1) / (2 - 1)) = sqrt(2), so A = [-1, 1] / (sqrt(2) + 1e-4)."""
    rewards = torch.tensor([1.0, 3.0], dtype=torch.float64)
    s = math.sqrt(2)
    expected = torch.tensor([-1 / (s + EPS), 1 / (s + EPS)], dtype=torch.float64)
    torch.testing.assert_close(grpo.group_advantages(rewards, 2), expected, rtol=0, atol=1e-12)


def test_group_advantages_g4_uses_the_sample_std_as_trl():
    """r = [0, 1, 2, 5]: mean 2, deviations [-2, -1, 0, 3], variance (4+1+0+9)/(4-1) = 14/3 (Bessel, as TRL)."""
    rewards = torch.tensor([0.0, 1.0, 2.0, 5.0], dtype=torch.float64)
    std = math.sqrt(14 / 3)  # 2.1602...; the population std would be sqrt(3.5) = 1.8708...
    expected = torch.tensor([-2 / (std + EPS), -1 / (std + EPS), 0.0, 3 / (std + EPS)], dtype=torch.float64)
    torch.testing.assert_close(grpo.group_advantages(rewards, 4), expected, rtol=0, atol=1e-12)


def test_group_advantages_groups_are_contiguous():
    """(B*G,) = two groups of G=4: [0, 1, 2, 5] and [4, 4, 4, 8] (mean 5, deviations [-1,-1,-1,3], variance 12/3)."""
    rewards = torch.tensor([0.0, 1.0, 2.0, 5.0, 4.0, 4.0, 4.0, 8.0], dtype=torch.float64)
    s1, s2 = math.sqrt(14 / 3), 2.0
    expected = torch.tensor([-2 / (s1 + EPS), -1 / (s1 + EPS), 0.0, 3 / (s1 + EPS),
                             -1 / (s2 + EPS), -1 / (s2 + EPS), -1 / (s2 + EPS), 3 / (s2 + EPS)], dtype=torch.float64)
    advantages = grpo.group_advantages(rewards, 4)
    assert advantages.shape == (8,)
    torch.testing.assert_close(advantages, expected, rtol=0, atol=1e-12)
    # The same 8 rewards read as four groups of 2: [0,1] [2,5] [4,4] [4,8]; a pair (a, b) has deviations -/+ d with
    # d = |b-a|/2 and sample std |b-a|/sqrt(2), so A = -/+ d/(d*sqrt(2) + eps) with d = 0.5, 1.5, (equal: 0), 2.
    pairs = grpo.group_advantages(rewards, 2)
    a, b, c = (d / (d * math.sqrt(2) + EPS) for d in (0.5, 1.5, 2.0))
    torch.testing.assert_close(pairs, torch.tensor([-a, a, -b, b, 0, 0, -c, c], dtype=torch.float64), rtol=0, atol=1e-12)


def test_group_advantages_scale_false_is_reward_minus_group_mean():
    rewards = torch.tensor([1.0, 3.0, 10.0, 10.0], dtype=torch.float64)
    torch.testing.assert_close(grpo.group_advantages(rewards, 2, scale="none"),
                               torch.tensor([-1.0, 1.0, 0.0, 0.0], dtype=torch.float64), rtol=0, atol=0)
    rewards = torch.tensor([0.0, 1.0, 2.0, 5.0], dtype=torch.float64)
    torch.testing.assert_close(grpo.group_advantages(rewards, 4, scale="none"),
                               torch.tensor([-2.0, -1.0, 0.0, 3.0], dtype=torch.float64), rtol=0, atol=0)


@pytest.mark.parametrize("group_size", [2, 4])
@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
def test_group_advantages_equal_rewards_give_zeros(group_size, value):
    rewards = torch.full((3 * group_size,), value)
    advantages = grpo.group_advantages(rewards, group_size)
    assert not advantages.isnan().any()
    assert torch.equal(advantages, torch.zeros_like(rewards))


@pytest.mark.parametrize("value", [0.3, 0.7, 0.2])
def test_group_advantages_equal_float32_rouge_rewards_g8_give_exact_zeros(value):
    """The default G=8 with a typical ROUGE reward, in float32 as rollout_step builds it (torch.tensor(list)).

    The docstring promises A = 0 for a group of equal rewards. In float32 the group mean of eight 0.3s is one
    ulp off 0.3, the std is then ~3e-8 instead of 0, and (r - mean) / (std + 1e-4) is ~3e-4 for all
    eight samples: a same-sign advantage that nudges the whole group instead of leaving it out of the gradient.
    """
    rewards = torch.tensor([value] * 8)  # float32, as in rollout_step
    advantages = grpo.group_advantages(rewards, 8)
    assert torch.equal(advantages, torch.zeros(8)), advantages.tolist()


# --------------------------------------------------------------------------------------------------
# completion_mask
# --------------------------------------------------------------------------------------------------
def test_completion_mask_t5_sample():
    """T5: decoder start = pad = 0, eos = 1; generate gives [0, 5, 7, 1, 0, 0], the completion drops the start."""
    sequence = torch.tensor([[0, 5, 7, 1, 0, 0]])
    mask, truncated = grpo.completion_mask(sequence[:, 1:], eos_token_id=1)
    assert mask.dtype == torch.float32
    assert mask.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0]]
    assert truncated.tolist() == [False]


def test_completion_mask_bart_sample():
    """BART: decoder start = eos = 2, bos 0 forced first, pad 1; generate gives [2, 0, 5, 2, 1, 1]."""
    sequence = torch.tensor([[2, 0, 5, 2, 1, 1]])
    mask, truncated = grpo.completion_mask(sequence[:, 1:], eos_token_id=2)
    assert mask.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0]]
    assert truncated.tolist() == [False]


def test_completion_mask_without_eos_keeps_all_tokens_and_is_truncated():
    mask, truncated = grpo.completion_mask(torch.tensor([[5, 6, 7, 8]]), eos_token_id=1)
    assert mask.tolist() == [[1.0, 1.0, 1.0, 1.0]]
    assert truncated.tolist() == [True]


def test_completion_mask_pad_equal_to_eos():
    """The eos id also pads: only the first one counts."""
    mask, truncated = grpo.completion_mask(torch.tensor([[5, 9, 9, 9]]), eos_token_id=9)
    assert mask.tolist() == [[1.0, 1.0, 0.0, 0.0]]
    assert truncated.tolist() == [False]


def test_completion_mask_batch_of_mixed_rows():
    ids = torch.tensor([[9, 9, 9, 9],   # EOS first: only it counts
                        [4, 5, 6, 7],   # no EOS
                        [4, 9, 3, 9],   # a later EOS does not matter
                        [4, 5, 6, 9]])  # EOS last
    mask, truncated = grpo.completion_mask(ids, eos_token_id=9)
    assert mask.tolist() == [[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, True, False, False]


# --------------------------------------------------------------------------------------------------
# token_logprobs
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_logprobs_matches_log_softmax_gather(dtype):
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 11, generator=generator) * 4).to(dtype)
    tokens = torch.randint(0, 11, (3, 5), generator=generator)
    expected = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    result = grpo.token_logprobs(logits, tokens)
    assert result.shape == (3, 5)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(result, expected, rtol=0, atol=tolerance)


# --------------------------------------------------------------------------------------------------
# grpo_loss: a tiny hand-computed case
# --------------------------------------------------------------------------------------------------
# N=2 sequences, T=3, the last token of row 1 is padding. epsilon=0.2, beta=0.1, A = [+1, -0.5].
#   log-ratio d = logp - old:  row 0 [0.1, 0.5, -0.3]    row 1 [0.2, -0.8, (0.7 masked)]
#   ref - logp  k:             row 0 [0.2, -0.1, 0.0]    row 1 [-0.3, 0.25, (1.0 masked)]
# Per-token ratios and min(ratio*A, clip(ratio, 0.8, 1.2)*A):
#   row 0 (A=+1):  e^0.1 = 1.10517 inside          -> e^0.1
#                  e^0.5 = 1.64872 > 1.2, A > 0     -> 1.2          (clipped, counts in clip_fraction)
#                  e^-0.3 = 0.74082 < 0.8, A > 0    -> e^-0.3       (min takes the unclipped ratio; not counted)
#   row 1 (A=-.5): e^0.2 = 1.22140 > 1.2, A < 0     -> -0.5 e^0.2   (unclipped, not counted)
#                  e^-0.8 = 0.44933 < 0.8, A < 0    -> -0.5 * 0.8   (clipped, counts)
# k3 KL = e^k - k - 1: row 0 [e^0.2 - 1.2, e^-0.1 - 0.9, 0] = [0.021403, 0.004837, 0]
#                      row 1 [e^-0.3 - 0.7, e^0.25 - 1.25] = [0.040818, 0.034025]
# Objective per token = policy - 0.1 * kl:
#   row 0 sum = e^0.1 + 1.2 + e^-0.3 - 0.1 (0.021403 + 0.004837)      = 3.043365
#   row 1 sum = -0.5 e^0.2 - 0.4 - 0.1 (0.040818 + 0.034025)           = -1.018186
D = [[0.1, 0.5, -0.3], [0.2, -0.8, 0.7]]
K = [[0.2, -0.1, 0.0], [-0.3, 0.25, 1.0]]
LOGP = [[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]]
MASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
ADV = [1.0, -0.5]
KL0 = [math.exp(0.2) - 1.2, math.exp(-0.1) - 0.9, 0.0]
KL1 = [math.exp(-0.3) - 0.7, math.exp(0.25) - 1.25]
ROW0 = math.exp(0.1) + 1.2 + math.exp(-0.3) - 0.1 * sum(KL0)  # 3.043365
ROW1 = -0.5 * math.exp(0.2) - 0.5 * 0.8 - 0.1 * sum(KL1)  # -1.018186
# GSPO: one ratio per sequence, exp(mean masked d):
#   row 0: exp((0.1 + 0.5 - 0.3) / 3) = e^0.1 = 1.10517, inside  -> e^0.1 on each of its 3 tokens
#   row 1: exp((0.2 - 0.8) / 2) = e^-0.3 = 0.74082 < 0.8, A < 0  -> -0.5 * 0.8 on each of its 2 tokens (clipped)
GSPO_ROW0 = 3 * math.exp(0.1) - 0.1 * sum(KL0)  # 3.312889
GSPO_ROW1 = 2 * (-0.5 * 0.8) - 0.1 * sum(KL1)  # -0.807484
EXPECTED_LOSS = {
    "grpo": -(ROW0 / 3 + ROW1 / 2) / 2,  # mean over sequences of per-sequence token means
    "dapo": -(ROW0 + ROW1) / 5,  # over the 5 real tokens
    "dr_grpo": -(ROW0 + ROW1) / 6,  # over N*T = 6
    "gspo": -(GSPO_ROW0 / 3 + GSPO_ROW1 / 2) / 2,
    # gspo_token: each token's ratio sg(s_i) * pi/sg(pi) has the value of gspo's sequence ratio s_i, and the
    # advantage is per sequence, so every token's clipped objective is gspo's: the same loss
    "gspo_token": -(GSPO_ROW0 / 3 + GSPO_ROW1 / 2) / 2,
}
EXPECTED_LOSS_DECIMALS = {"grpo": -0.252681, "dapo": -0.405036, "dr_grpo": -0.337530, "gspo": -0.350277, "gspo_token": -0.350277}


def hand_case(dtype=torch.float64):
    logp = torch.tensor(LOGP, dtype=dtype)
    old = logp - torch.tensor(D, dtype=dtype)
    ref = logp + torch.tensor(K, dtype=dtype)
    return logp, old, ref, torch.tensor(ADV, dtype=dtype), torch.tensor(MASK, dtype=dtype)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_hand_computed(loss_type):
    logp, old, ref, adv, mask = hand_case()
    loss, stats = grpo.grpo_loss(logp, old, ref, adv, mask, epsilon=0.2, beta=0.1, loss_type=loss_type)
    assert loss.item() == pytest.approx(EXPECTED_LOSS[loss_type], abs=1e-9)
    assert loss.item() == pytest.approx(EXPECTED_LOSS_DECIMALS[loss_type], abs=1e-6)  # the decimals worked above
    # kl: mean over the 5 real tokens (the masked one, e^1 - 2 = 0.718, is left out)
    assert stats["kl"].item() == pytest.approx((sum(KL0) + sum(KL1)) / 5, abs=1e-9)  # 0.020217
    # clip_fraction: per token, row 0 token 1 and row 1 token 1 -> 2 of 5; gspo: row 1 (2 tokens) -> 2 of 5
    assert stats["clip_fraction"].item() == pytest.approx(2 / 5, abs=1e-12)


def test_grpo_loss_float32_hand_case():
    logp, old, ref, adv, mask = hand_case(torch.float32)
    loss, _ = grpo.grpo_loss(logp, old, ref, adv, mask, epsilon=0.2, beta=0.1, loss_type="grpo")
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(EXPECTED_LOSS["grpo"], abs=1e-5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_ratio_one_when_logprobs_equal_old(loss_type):
    """old = logp.detach() (mu = 1): ratio = 1, nothing clipped, and d ratio / d logp = 1.

    With beta = 0 and mask [[1,1,1],[1,1,0]], A = [1, -0.5]:
      grpo/gspo: loss = -(1 + (-0.5)) / 2 = -0.25, grad = -A_i / (n_i * N): row 0 -1/6, row 1 +0.5/4 = 0.125
      dapo:      loss = -(3*1 + 2*(-0.5)) / 5 = -0.4, grad = -A_i / 5
      dr_grpo:   loss = -(3 - 1) / 6 = -1/3, grad = -A_i / 6
    """
    expected = {"grpo": (-0.25, [-1 / 6, 0.125]), "gspo": (-0.25, [-1 / 6, 0.125]),
                "gspo_token": (-0.25, [-1 / 6, 0.125]),
                "dapo": (-0.4, [-1 / 5, 0.5 / 5]), "dr_grpo": (-1 / 3, [-1 / 6, 0.5 / 6])}[loss_type]
    logp0, _, _, adv, mask = hand_case()
    logp = logp0.clone().requires_grad_(True)
    loss, stats = grpo.grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, epsilon=0.2, beta=0.0,
                                 loss_type=loss_type)
    assert stats["clip_fraction"].item() == 0.0
    assert loss.item() == pytest.approx(expected[0], abs=1e-12)
    loss.backward()
    g0, g1 = expected[1]
    torch.testing.assert_close(logp.grad, torch.tensor([[g0, g0, g0], [g1, g1, 0.0]], dtype=torch.float64),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_kl_zero_when_logprobs_equal_ref(loss_type):
    logp, old, _, adv, mask = hand_case()
    loss_with_beta, stats = grpo.grpo_loss(logp, old, logp.clone(), adv, mask, epsilon=0.2, beta=0.5,
                                           loss_type=loss_type)
    loss_without_beta, _ = grpo.grpo_loss(logp, old, logp.clone(), adv, mask, epsilon=0.2, beta=0.0,
                                          loss_type=loss_type)
    assert stats["kl"].item() == 0.0
    assert loss_with_beta.item() == loss_without_beta.item()


def test_grpo_loss_clipped_token_has_zero_gradient_and_counts():
    """One sequence, A = +1, beta = 0, d = [0.5, 0]: token 0 has ratio e^0.5 = 1.6487 > 1.2, so the objective
    there is the constant 1.2 (zero gradient); token 1 has ratio 1, objective e^(logp - old), gradient
    -(1/2) * 1 = -0.5. clip_fraction = 1/2. Loss = -(1.2 + 1) / 2 = -1.1."""
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    old = logp.detach() - torch.tensor([[0.5, 0.0]], dtype=torch.float64)
    loss, stats = grpo.grpo_loss(logp, old, logp.detach(), torch.tensor([1.0], dtype=torch.float64),
                                 torch.ones(1, 2, dtype=torch.float64), epsilon=0.2, beta=0.0)
    loss.backward()
    assert loss.item() == pytest.approx(-1.1, abs=1e-12)
    assert logp.grad[0, 0].item() == 0.0
    assert logp.grad[0, 1].item() == pytest.approx(-0.5, abs=1e-12)
    assert stats["clip_fraction"].item() == pytest.approx(0.5, abs=1e-12)


def test_grpo_loss_low_clip_with_negative_advantage_has_zero_gradient():
    """A = -1, d = -0.5: ratio e^-0.5 = 0.6065 < 0.8; min(-0.6065, -0.8) = -0.8, a constant: zero gradient."""
    logp = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    old = logp.detach() + 0.5
    loss, stats = grpo.grpo_loss(logp, old, logp.detach(), torch.tensor([-1.0], dtype=torch.float64),
                                 torch.ones(1, 1, dtype=torch.float64), epsilon=0.2, beta=0.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.8, abs=1e-12)
    assert logp.grad.item() == 0.0
    assert stats["clip_fraction"].item() == 1.0


def one_token_loss(d, advantage, epsilon, epsilon_high):
    logp = torch.tensor([[-1.0]], dtype=torch.float64)
    loss, stats = grpo.grpo_loss(logp, logp - d, logp, torch.tensor([advantage], dtype=torch.float64),
                                 torch.ones(1, 1, dtype=torch.float64), epsilon=epsilon, beta=0.0,
                                 epsilon_high=epsilon_high)
    return loss.item(), stats["clip_fraction"].item()


def test_grpo_loss_epsilon_high_sets_the_upper_bound():
    """A = +1, ratio e^0.3 = 1.34986, epsilon = 0.2:
    epsilon_high None -> bound 1.2, loss -1.2, clipped; 0.4 -> bound 1.4, loss -e^0.3, not clipped;
    0.25 -> bound 1.25, loss -1.25, clipped."""
    assert one_token_loss(0.3, 1.0, 0.2, None) == pytest.approx((-1.2, 1.0), abs=1e-12)
    assert one_token_loss(0.3, 1.0, 0.2, 0.4) == pytest.approx((-math.exp(0.3), 0.0), abs=1e-12)
    assert one_token_loss(0.3, 1.0, 0.2, 0.25) == pytest.approx((-1.25, 1.0), abs=1e-12)


def test_grpo_loss_epsilon_high_leaves_the_lower_bound_at_epsilon():
    """A = -1, ratio e^-0.3 = 0.74082: with epsilon = 0.2 the lower bound is 0.8 whatever epsilon_high is:
    min(-0.74082, -0.8) = -0.8, loss 0.8, clipped. (Were the lower bound 1 - 0.5, the loss would be e^-0.3.)"""
    assert one_token_loss(-0.3, -1.0, 0.2, 0.5) == pytest.approx((0.8, 1.0), abs=1e-12)


def test_grpo_loss_unknown_loss_type_raises():
    logp, old, ref, adv, mask = hand_case()
    with pytest.raises(ValueError, match="ppo"):
        grpo.grpo_loss(logp, old, ref, adv, mask, epsilon=0.2, beta=0.1, loss_type="ppo")


# --------------------------------------------------------------------------------------------------
# micro-batching and gradient masking
# --------------------------------------------------------------------------------------------------
def random_case(seed=0, empty_row=False):
    n, t = 8, 6
    generator = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=generator, dtype=torch.float64) * 3
    old = logp + torch.randn(n, t, generator=generator, dtype=torch.float64) * 0.3
    ref = logp + torch.randn(n, t, generator=generator, dtype=torch.float64) * 0.3
    adv = torch.randn(n, generator=generator, dtype=torch.float64)
    lengths = [1, 6, 3, 2, 5, 4, 6, 1]  # a different length per row (T = 6)
    if empty_row:
        lengths[3] = 0  # e.g. mask_truncated_completions removed a sample
    mask = torch.tensor([[1.0] * k + [0.0] * (t - k) for k in lengths], dtype=torch.float64)
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("empty_row", [False, True])
@pytest.mark.parametrize("chunks", [[2, 2, 2, 2], [4, 4], [4, 2, 2], [6, 2]])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batch_weighted_losses_sum_to_full_batch_loss(loss_type, chunks, empty_row):
    logp, old, ref, adv, mask = random_case(empty_row=empty_row)
    kwargs = dict(epsilon=0.2, beta=0.1, epsilon_high=0.28, loss_type=loss_type)
    full, _ = grpo.grpo_loss(logp, old, ref, adv, mask, **kwargs)
    total, start = torch.zeros((), dtype=torch.float64), 0
    for size in chunks:
        rows = slice(start, start + size)
        part, _ = grpo.grpo_loss(logp[rows], old[rows], ref[rows], adv[rows], mask[rows], **kwargs)
        total = total + part * grpo.micro_batch_weight(loss_type, mask[rows], mask)
        start += size
    assert start == logp.size(0)
    torch.testing.assert_close(total, full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batch_weight_values(loss_type):
    """Rows 0-1 of mask lengths [1, 6 | 3, 2] (T=6): dapo weight = tokens 7 / 12, the others rows 2 / 4."""
    mask = torch.tensor([[1.0] * k + [0.0] * (6 - k) for k in (1, 6, 3, 2)])
    expected = 7 / 12 if loss_type == "dapo" else 0.5
    assert grpo.micro_batch_weight(loss_type, mask[:2], mask) == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_gradient_only_through_masked_tokens(loss_type):
    logp0, old, ref, adv, mask = random_case(seed=1)
    logp = logp0.clone().requires_grad_(True)
    loss, _ = grpo.grpo_loss(logp, old, ref, adv, mask, epsilon=0.2, beta=0.1, loss_type=loss_type)
    loss.backward()
    assert torch.all(logp.grad[mask == 0] == 0)
    assert torch.all(torch.isfinite(logp.grad))
    assert (logp.grad[mask == 1] != 0).any()


def test_dr_grpo_divides_by_the_constant_max_completion_length():
    """With max_completion_length = L = 10 the hand case is -(ROW0 + ROW1) / (N * L) = -(3.043365 - 1.018186) / 20,
    whatever the width T = 3 of the (trimmed) batch."""
    logp, old, ref, adv, mask = hand_case()
    loss, _ = grpo.grpo_loss(logp, old, ref, adv, mask, epsilon=0.2, beta=0.1, loss_type="dr_grpo",
                             max_completion_length=10)
    assert loss.item() == pytest.approx(-(3.043365 - 1.018186) / 20, abs=1e-6)
    # the other loss types do not depend on it
    for loss_type in ("grpo", "dapo", "gspo"):
        with_length, _ = grpo.grpo_loss(logp, old, ref, adv, mask, 0.2, 0.1, loss_type=loss_type, max_completion_length=10)
        assert with_length.item() == pytest.approx(EXPECTED_LOSS[loss_type], abs=1e-9)
