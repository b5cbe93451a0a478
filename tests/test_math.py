"""The GRPO math (pure tensor functions): advantages and scale_rewards, completion masks, token log-probs and
entropy, grpo_loss and its variants (dapo, dr_grpo, gspo, gspo_token, epsilon_high, the clip fractions) and
micro_batch_weight.

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
    assert torch.equal(grpo.group_advantages(rewards, 4, scale="group"), advantages)  # the default is "group"
    torch.testing.assert_close(advantages, expected, rtol=0, atol=1e-12)
    # The same 8 rewards read as four groups of 2: [0,1] [2,5] [4,4] [4,8]; a pair (a, b) has deviations -/+ d with
    # d = |b-a|/2 and sample std |b-a|/sqrt(2), so A = -/+ d/(d*sqrt(2) + eps) with d = 0.5, 1.5, (equal: 0), 2.
    pairs = grpo.group_advantages(rewards, 2)
    a, b, c = (d / (d * math.sqrt(2) + EPS) for d in (0.5, 1.5, 2.0))
    torch.testing.assert_close(pairs, torch.tensor([-a, a, -b, b, 0, 0, -c, c], dtype=torch.float64), rtol=0, atol=1e-12)


def test_group_advantages_scale_none_is_reward_minus_group_mean():
    """scale_rewards=none (Dr. GRPO): r - group mean, no division."""
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


# --------------------------------------------------------------------------------------------------
# scale_rewards = batch, and an unknown scale
# --------------------------------------------------------------------------------------------------
# Rewards [0, 1 | 2, 2], G = 2. Group means 0.5 and 2, so r - mean = [-0.5, 0.5, 0, 0].
#   batch: batch mean 1.25, sample std sqrt(((-1.25)^2 + (-0.25)^2 + 0.75^2 + 0.75^2) / 3) = sqrt(2.75 / 3)
#          = 0.957427                         -> [-0.5, 0.5, 0, 0] / (0.957427 + eps)
# (group and none: the group_advantages hand cases above)
REWARDS = [0.0, 1.0, 2.0, 2.0]


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


def test_group_advantages_unknown_scale_raises():
    with pytest.raises(ValueError):
        grpo.group_advantages(torch.tensor(REWARDS), 2, scale="std")


# --------------------------------------------------------------------------------------------------
# token_entropy
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
# micro_batch_weight under torchrun, and forced first tokens left out of the mask
# --------------------------------------------------------------------------------------------------
def test_micro_batch_weight_uses_the_token_count_of_all_processes(grpo):
    micro, full = torch.ones(2, 5), torch.ones(4, 5)
    assert grpo.micro_batch_weight("dapo", micro, full) == 0.5
    assert grpo.micro_batch_weight("dapo", micro, full, world_token_count=40, world_size=2) == 10 * 2 / 40
    assert grpo.micro_batch_weight("grpo", micro, full, world_token_count=40, world_size=2) == 0.5


def test_exclude_forced_tokens(grpo):
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    assert torch.equal(grpo.exclude_forced_tokens(mask, None), mask)
    assert grpo.exclude_forced_tokens(mask, 0).tolist() == [[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
