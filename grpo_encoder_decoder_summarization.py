"""GRPO for encoder-decoder summarization (BART, T5, Pegasus: any AutoModelForSeq2SeqLM), in one file.

What it does, per step (Shao et al. 2024, "DeepSeekMath", section 4.1):
  1. take B articles; the policy samples G summaries for each (G independent samples, not a beam);
  2. score every summary with ROUGE against the reference highlights: rewards r_1..r_G per article;
  3. advantages A_i = (r_i - mean(r)) / (std(r) + eps) within each group of G: the group mean is the
     baseline, so no value model (critic) is needed;
  4. update the policy mu times on this rollout with the clipped surrogate of PPO plus a KL penalty to a
     frozen reference model, per token t of summary i:
        ratio      = pi_theta(y_t | x, y_<t) / pi_old(y_t | x, y_<t)
        objective  = min(ratio * A_i, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A_i) - beta * KL_t
        KL_t       = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1        (the k3 estimator)
     and the loss is minus the objective averaged over tokens (see grpo_loss for the loss_type variants).

What the defaults reduce to: with num_iterations = mu = 1 (the default) every rollout gets exactly one update,
so pi_old = pi_theta, the ratio is exactly 1 and the clip never fires: the update is the plain group-baseline
policy gradient, -A_i * grad log pi_theta(y_t), plus the KL term. No old-policy pass is run. The clip (epsilon)
matters only when mu > 1, where later updates on the same rollout move pi_theta away from pi_old.

Reading map, top to bottom (the algorithm first; everything after the PLUMBING banner only serves it):
  Config                       every flag, with its paper symbol (G, beta, epsilon, mu); --help lists them
  GRPO step 1/4, the math      group_advantages, completion_mask, token_logprobs, grpo_loss: pure tensor functions
  GRPO step 2/4, the rollout   sample_completions (our encoder-decoder sampler), rollout_step (rewards, advantages)
  GRPO step 3/4, the update    grpo_update: mu AdamW steps on one rollout
  GRPO step 4/4                grpo_step: rollout -> pi_ref (and pi_old) log-probs -> update
  Model glue                   GroupedSeq2Seq (the encoder once per article, cross-attention shared by its G)
  The reward                   compute_rewards: edit it to change what GRPO optimizes
  SFT and evaluation           sft_warmup, evaluate
  The main loop                train: a batch -> grpo_step -> log -> evaluate / save; build_run sets it up
  PLUMBING                     model loading (LoRA, pi_ref, decoding settings), the run's bookkeeping, flags,
                               data files, evaluation internals and eval-only mode, run files and checkpoints,
                               processes (DDP), ROUGE internals, the demo world, the benchmark

References:
  GRPO      Shao et al. 2024, DeepSeekMath, arXiv:2402.03300
  PPO       Schulman et al. 2017, arXiv:1707.06347; k3 KL estimator: J. Schulman, "Approximating KL divergence"
  DAPO      Yu et al. 2025, arXiv:2503.14476 (token-level loss, clip-higher epsilon_high)
  Dr. GRPO  Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783
  GSPO      Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv:2507.18071
  TRL's GRPOTrainer, whose names we follow (num_generations ~ group_size, beta, epsilon, num_iterations).

How to run:
  python grpo_encoder_decoder_summarization.py --demo                  # offline: SFT, then more SFT vs GRPO
  python grpo_encoder_decoder_summarization.py --demo --demo_seeds=3   # the demo's table over seeds 0, 1, 2
  python grpo_encoder_decoder_summarization.py                         # bart-large-cnn on CNN/DailyMail (GPU)
  python grpo_encoder_decoder_summarization.py --eval_only=True --eval_split=test --eval_decoding=checkpoint
  python grpo_encoder_decoder_summarization.py --model_name=t5-small --source_prefix="summarize: " --beta=0.02
  python grpo_encoder_decoder_summarization.py --train_file=train.jsonl --validation_file=val.jsonl
  torchrun --standalone --nproc_per_node=4 grpo_encoder_decoder_summarization.py --batch_size=4
Every field of Config below can be set as --name=value (or --name value); edit the defaults here to change a run for good.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import sys
import time
import types
import typing
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

if typing.TYPE_CHECKING:  # for annotations only: datasets is imported where data is loaded
    import datasets


# --------------------------------------------------------------------------------------------------
# Configuration: every field is a command-line flag, --name=value (python ... --help lists them)
# --------------------------------------------------------------------------------------------------
@dataclass
class Config:
    # model and data
    model_name: str = "facebook/bart-large-cnn"  # hub id or local dir loadable with AutoModelForSeq2SeqLM
    trust_remote_code: bool = False  # allow custom model code from the hub (off unless you set it)
    dataset_name: str = "abisee/cnn_dailymail"  # hub dataset with train and validation splits
    dataset_config: str = "3.0.0"  # its configuration name
    train_file: str = ""  # local .jsonl/.json/.csv training data; when set it replaces the hub dataset
    validation_file: str = ""  # local held-out data; if empty with train_file, eval_samples rows are held out
    test_file: str = ""  # local test data, read only by --eval_only=True --eval_split=test
    text_column: str = "article"  # column with the text to summarize
    summary_column: str = "highlights"  # column with the reference summary
    source_prefix: str = ""  # prepended to every article, e.g. "summarize: " for T5
    max_source_length: int = 1024  # articles are truncated to this many tokens (and counted)
    max_new_tokens: int = 142  # longest summary sampled (and greedy-decoded), in tokens
    # GRPO rollout
    group_size: int = 8  # G: summaries sampled per article (TRL: num_generations)
    batch_size: int = 8  # B: articles per step and process; the step sees B*G summaries
    micro_batch_size: int = 32  # summaries per forward/backward; a multiple of G (whole groups)
    temperature: float = 1.0  # sampling temperature; log-probs are scored at the same temperature
    top_p: float = 1.0  # nucleus sampling mass in (0, 1]
    # reward: a weighted mean of ROUGE F1 scores (weights are normalized to sum to 1)
    rouge1_weight: float = 1.0  # weight of ROUGE-1 F1 in the reward
    rouge2_weight: float = 1.0  # weight of ROUGE-2 F1 in the reward
    rougeL_weight: float = 0.0  # weight of ROUGE-L F1 in the reward
    rougeLsum_weight: float = 1.0  # weight of ROUGE-Lsum F1 in the reward
    rouge_tokenizer: str = "default"  # default: rouge_score's (a-z0-9); unicode: any script, not the papers' English ROUGE
    invented_fact_penalty: float = 0.0  # lambda: reward minus lambda per name or number not in the article; 0: off
    # GRPO update
    learning_rate: float = 1e-6  # AdamW learning rate of the GRPO phase
    weight_decay: float = 0.0  # AdamW weight decay
    lr_scheduler: str = "linear"  # any transformers scheduler name: linear, cosine, constant_with_warmup, ...
    warmup_steps: int = 10  # learning-rate warm-up, in optimizer steps
    max_grad_norm: float = 1.0  # gradient clipping norm
    beta: float = 0.04  # beta: weight of the KL penalty to the reference model
    epsilon: float = 0.2  # epsilon: lower clip range of the ratio, 1 - epsilon
    epsilon_high: float | None = None  # upper clip range, 1 + epsilon_high (DAPO clip-higher); None: epsilon
    num_iterations: int = 1  # mu: policy updates per rollout; > 1 scores an old policy once per rollout
    loss_type: str = "grpo"  # grpo | dapo | dr_grpo | gspo | gspo_token (see grpo_loss)
    scale_rewards: str = "group"  # advantages divided by the std of: group (its G), batch (all B*G), none (Dr. GRPO)
    mask_truncated_completions: bool = False  # leave summaries that hit max_new_tokens out of the loss
    # optional supervised warm-up (SFT first, then GRPO)
    sft_steps: int = 0  # teacher-forced cross-entropy steps on reference summaries before GRPO
    sft_learning_rate: float = 5e-5  # AdamW learning rate of the SFT phase
    sft_lr_scheduler: str = "linear"  # its schedule (warm-up: warmup_steps): linear, constant_with_warmup, cosine, ...
    sft_batch_size: int = 16  # articles per SFT step and process
    sft_eval_every: int = 0  # held-out ROUGE every N SFT steps, to sft_eval.jsonl: does more SFT still help? 0: off
    # optional LoRA (peft): train low-rank adapters only; the reference is the same model with adapters off
    lora_r: int = 0  # LoRA rank r; 0: full fine-tuning (no adapters)
    lora_alpha: int = 32  # LoRA scaling alpha (the adapter update is scaled by alpha / r)
    lora_dropout: float = 0.0  # must stay 0: GRPO scores with dropout off (ratio = 1 at mu = 1)
    lora_target_modules: str = "all-linear"  # peft target_modules: all-linear (not the LM head) or names, e.g. q,v
    # loop, evaluation, checkpoints
    max_steps: int = 1000  # GRPO steps
    eval_every: int = 100  # held-out ROUGE every this many steps (and before and after training)
    eval_samples: int = 500  # held-out articles per evaluation; 0: none; --eval_only: all unless given
    eval_split: str = "validation"  # split scored: validation, or test (only with --eval_only=True)
    eval_decoding: str = "greedy"  # greedy (max_new_tokens), or checkpoint: the model's own generation_config
    eval_only: bool = False  # only score --model_name on --eval_split: eval.jsonl and eval_predictions.jsonl
    eval_batch_size: int = 32  # articles per evaluation decoding batch
    num_examples: int = 3  # example summaries written to eval_examples.jsonl per evaluation
    save_every: int = 100  # checkpoint every this many steps (and at the end)
    keep_checkpoints: int = 2  # most recent checkpoints kept (the best one by best_metric is kept apart)
    best_metric: str = "rougeL"  # held-out metric that picks best/: rouge1, rouge2, rougeL or rougeLsum
    max_nonfinite_steps: int = 5  # stop after this many consecutive steps with a NaN/inf loss
    log_completions_every: int = 0  # write G samples of 2 articles to completions.jsonl every N steps; 0: off
    report_to: str = "none"  # also log metrics to: none, wandb, tensorboard, or wandb,tensorboard (optional packages)
    output_dir: str = "runs/grpo"  # metrics, evaluations, checkpoints and the final model go here
    seed: int = 0  # seeds data order, sampling and initialization
    device: str = "auto"  # auto (cuda if available), cpu, cuda or cuda:N
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more time (dropout 0)
    compile: bool = False  # torch.compile the scoring forward pass (CUDA)
    compile_sampler: bool = False  # CUDA: the sampler's decode step with a static KV cache, compiled to CUDA graphs
    resume: bool = False  # continue from the latest checkpoint in output_dir
    overwrite_output_dir: bool = False  # let a fresh run delete an earlier run in output_dir (else it stops)
    demo: bool = False  # offline demo: synthetic data and a tiny model built here (see DEMO_CONFIG)
    demo_seeds: int = 1  # --demo: run seeds seed..seed+n-1 (each in output_dir/seed_N) and print mean and spread
    benchmark: bool = False  # time every phase of a fixed tiny workload and print a table
    estimate_memory: bool = False  # print the GPU memory one GRPO step needs at these sizes (no weights loaded), exit
    gpu_memory_gb: float = 80.0  # --estimate_memory: the GPU size (GB, 10^9 bytes) it fits micro_batch_size to


LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "gspo", "gspo_token")  # --loss_type choices (see grpo_loss)
SCALE_REWARDS = ("group", "batch", "none")  # --scale_rewards choices, as in TRL
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


# --------------------------------------------------------------------------------------------------
# GRPO step 1/4, the math: advantages, masks, log-probs and the loss (pure tensor functions)
# --------------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, scale: str = "group",
                     batch_std: torch.Tensor | None = None) -> torch.Tensor:
    """A_i = (r_i - mean_g r) / (std + eps), the mean over each group of G contiguous samples (TRL's scale_rewards):

    scale = "group": std = std_g r, the std of the sample's own group (GRPO);
            "batch": std = the std of all the step's rewards (batch_std if given: under torchrun, of every process's);
            "none":  no division, A_i = r_i - mean_g r (Dr. GRPO).
    Every std is the sample std (divides by count - 1), as TRL's torch.std. Equal rewards in a group give A = 0.
    """
    grouped = rewards.view(-1, group_size)  # (B, G)
    centered = grouped - grouped.mean(dim=1, keepdim=True)  # (B, G)
    if scale == "group":
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / ((rewards.std() if batch_std is None else batch_std) + eps)
    elif scale != "none":
        raise ValueError(f"unknown scale {scale!r}; expected one of {SCALE_REWARDS}")
    all_equal = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)  # (B, 1): the float mean can be 1 ulp off
    return centered.masked_fill(all_equal, 0.0).reshape(-1)  # (B*G,)


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mask[i, t] = 1 for the tokens of sample i up to and including its first EOS, 0 after it.

    completion_ids (N, T) excludes the decoder start token, so the mask is right whatever that token is (eos for
    BART, pad for T5), also when pad == eos. Returns (mask (N, T) float, truncated (N,) bool: no EOS).
    """
    is_eos = completion_ids == eos_token_id  # (N, T)
    has_eos = is_eos.any(dim=1)  # (N,)
    length = completion_ids.size(1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, length, dtype=torch.long))
    positions = torch.arange(length, device=completion_ids.device)  # (T,)
    return (positions[None, :] <= first_eos[:, None]).float(), ~has_eos


def exclude_forced_tokens(mask: torch.Tensor, forced_bos_token_id: int | None) -> torch.Tensor:
    """mask (N, T) without column 0 when the checkpoint forces the first token (forced_bos_token_id): that token
    was not sampled (probability 1), so it enters neither the loss nor the KL."""
    if forced_bos_token_id is None:
        return mask
    kept = torch.ones_like(mask)  # (N, T)
    kept[:, 0] = 0
    return mask * kept


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per position: logits (N, T, V), tokens (N, T) -> (N, T).

    The gathered logit minus logsumexp, one (T, V) row at a time: exact, with no (N, T, V) log_softmax copy
    (about 2x faster on CPU at V = 50k).
    """
    chosen = logits.gather(dim=-1, index=tokens.unsqueeze(-1)).squeeze(-1)  # (N, T)
    return chosen - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])  # (N, T)


@torch.no_grad()
def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H_t = -sum_v p_v log p_v with p = softmax(logits): logits (N, T, V) -> (N, T), one row at a time, no grad."""
    entropies = []
    for row in logits:  # (T, V)
        log_p = torch.log_softmax(row, dim=-1)
        entropies.append(-(log_p.exp() * log_p).sum(dim=-1))
    return torch.stack(entropies)  # (N, T)


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, epsilon: float, beta: float, epsilon_high: float | None = None, loss_type: str = "grpo",
              max_completion_length: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy-gradient loss with a KL penalty. Tensors (N, T) with N = B*G, advantages (N,), mask 0/1.

    Per token: ratio = exp(logprobs - old_logprobs)
               objective = min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A) - beta * kl
               kl = exp(ref - logp) - (ref - logp) - 1            (k3 estimator, >= 0)
    loss_type  grpo:    -(mean over sequences of (sum of masked objective / that sequence's token count))
               dapo:    -(sum of masked objective over all tokens) / (total token count)
               dr_grpo: -(sum of masked objective) / (N * L), L = max_completion_length (default T): a constant
               gspo:    as grpo, with one ratio per sequence, exp(mean masked log-ratio), clipped per sequence
                        (GSPO uses small epsilons, e.g. 3e-4 / 4e-4)
               gspo_token: as grpo, with token ratio sg(s_i) * pi_theta(y_t) / sg(pi_theta(y_t)) (s_i: gspo's
                        sequence ratio, sg: stop-gradient; TRL's importance_sampling_level="sequence_token"). With
                        one advantage per sequence its loss and gradient equal gspo's exactly (tested).
    Returns (loss, stats): kl (mean over masked tokens), clip_fraction_low / _high (share of masked tokens clipped
    below 1 - epsilon with A < 0 / above 1 + epsilon_high with A > 0: the clips that stop the gradient) and
    clip_fraction, their sum. The clip fractions are token-weighted also for gspo (TRL averages gspo's per sequence).
    """
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logprobs.dtype)
    tokens_per_sequence = mask.sum(dim=1).clamp(min=1)  # (N,)
    log_ratio = logprobs - old_logprobs  # (N, T)
    if loss_type in ("gspo", "gspo_token"):
        sequence_log_ratio = ((log_ratio * mask).sum(dim=1) / tokens_per_sequence).unsqueeze(1)  # (N, 1)
        log_ratio = (sequence_log_ratio if loss_type == "gspo"  # gspo_token: (N, T), value s_i, gradient per token
                     else sequence_log_ratio.detach() + logprobs - logprobs.detach())
    ratio = torch.exp(log_ratio)  # (N, T), or (N, 1) for gspo
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    A = advantages.unsqueeze(1)  # (N, 1)
    policy_objective = torch.min(ratio * A, clipped_ratio * A)  # (N, T) or (N, 1)
    log_ref_ratio = ref_logprobs - logprobs  # (N, T)
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # (N, T)
    objective = (policy_objective - beta * kl) * mask  # (N, T)
    if loss_type in ("grpo", "gspo", "gspo_token"):
        loss = -(objective.sum(dim=1) / tokens_per_sequence).mean()
    elif loss_type == "dapo":
        loss = -objective.sum() / mask.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        loss = -objective.sum() / (mask.size(0) * (max_completion_length or mask.size(1)))
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    with torch.no_grad():
        clipped_low = (ratio < 1 - epsilon) & (A < 0)  # (N, T) or (N, 1)
        clipped_high = (ratio > 1 + epsilon_high) & (A > 0)  # (N, T) or (N, 1)
        token_count = mask.sum().clamp(min=1)
        stats = {"kl": (kl * mask).sum() / token_count, "clip_fraction_low": (clipped_low * mask).sum() / token_count,
                 "clip_fraction_high": (clipped_high * mask).sum() / token_count}
        stats["clip_fraction"] = stats["clip_fraction_low"] + stats["clip_fraction_high"]
    return loss, stats


def micro_batch_weight(loss_type: str, micro_mask: torch.Tensor, full_mask: torch.Tensor,
                       world_token_count: float | None = None, world_size: int = 1) -> float:
    """Weight of a micro-batch's grpo_loss so that the weighted sum over micro-batches is the full batch's loss.

    dapo divides by the step's token count: under DDP, of all processes (world_token_count); DDP then averages the
    world_size processes' gradients, so the weight is micro_tokens * world_size / world_token_count.
    """
    if loss_type == "dapo":
        total = full_mask.sum() if world_token_count is None else torch.tensor(float(world_token_count))
        return float(micro_mask.sum() * world_size / total.clamp(min=1))
    return micro_mask.size(0) / full_mask.size(0)  # grpo, gspo(_token): mean over sequences; dr_grpo: same N * L


# --------------------------------------------------------------------------------------------------
# GRPO step 2/4, the rollout: G samples per article (our sampler), their rewards and advantages
# --------------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    input_ids: torch.Tensor  # (B, S) articles
    attention_mask: torch.Tensor  # (B, S)
    decoder_input_ids: torch.Tensor  # (B*G, T) decoder start token + sampled tokens, shifted right
    completion_ids: torch.Tensor  # (B*G, T) the sampled tokens (decoder start token excluded)
    mask: torch.Tensor  # (B*G, T) 1 up to and including the first EOS, 0 at a forced first token
    advantages: torch.Tensor  # (B*G,)
    ref_logprobs: torch.Tensor | None = None  # (B*G, T) under pi_ref, filled in by grpo_step
    old_logprobs: torch.Tensor | None = None  # (B*G, T) under pi_old (None when mu == 1: ratio is exactly 1)


SAMPLER_CHECK_EVERY = 8  # the sampler asks "has every sample ended?" (a device sync) once per this many tokens


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass is >= top_p.

    logits (N, V) -> (N, V), the dropped tokens at -inf: exactly transformers' TopPLogitsWarper.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_indices = torch.sort(logits, descending=False)  # (N, V)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (N, V)
    drop_sorted = cumulative <= 1 - top_p
    drop_sorted[:, -1] = False  # the most likely token is always kept
    drop = drop_sorted.scatter(1, sorted_indices, drop_sorted)  # (N, V) back in vocabulary order
    return logits.masked_fill(drop, -float("inf"))


def inverse_cdf_sample(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row drawn from probs (N, V) >= 0 (need not sum to 1), with uniform (N,) in [0, 1): the token i
    with cdf[i-1] <= u * cdf[V-1] < cdf[i]. Exactly the categorical distribution, with one uniform per row and no
    device sync; a token of probability 0 is never drawn."""
    cdf = probs.cumsum(dim=-1)  # (N, V)
    total = cdf[:, -1:]  # (N, 1)
    target = torch.minimum(uniform.unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))  # < total
    return torch.searchsorted(cdf, target, right=True).squeeze(1)  # (N,): first i with cdf[i] > target


def decoder_step(model, encoder_outputs, attention_mask: torch.Tensor, token: torch.Tensor, cache) -> torch.Tensor:
    """One decoder step of the sampler: token (N,) -> next-token logits (N, V) in float32, the cache extended."""
    return model(encoder_outputs=encoder_outputs, attention_mask=attention_mask, decoder_input_ids=token.unsqueeze(1),
                 cache=cache, use_cache=True).logits[:, -1].float()


@torch.no_grad()
def sample_completions(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, group_size: int,
                       max_new_tokens: int, eos_token_id: int, pad_token_id: int, temperature: float = 1.0,
                       top_p: float = 1.0, greedy: bool = False, with_logprobs: bool = True,
                       step_function=decoder_step) -> tuple[torch.Tensor, torch.Tensor | None]:
    """G samples per article from an encoder-decoder, token by token: the rollout sampler of GRPO.

    input_ids, attention_mask (B, S) -> sequences (B*G, 1+T): the decoder start token, the tokens, pad after EOS,
    an article's G samples in consecutive rows; and logprobs (B*G, T) = log softmax(logits / temperature)[token],
    0 after EOS (None with with_logprobs=False). Per article the encoder and the first decoder step run once, so
    the cross-attention keys/values are projected once and then repeated to the G samples in the model's cache.
    Each step: logits / temperature -> top_p_filter -> softmax -> inverse_cdf_sample (greedy: argmax). Call it in
    eval mode (transformers turns the cache off in train mode under gradient checkpointing).
    """
    from transformers import DynamicCache, EncoderDecoderCache
    from transformers.modeling_outputs import BaseModelOutput

    batch, device = input_ids.size(0), input_ids.device
    num_samples = batch * group_size
    forced_first = forced_bos_token_id(model)
    hidden = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, S, d)
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    start = torch.full((batch, 1), decoder_start_token_id(model), dtype=torch.long, device=device)
    outputs = model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=attention_mask,
                    decoder_input_ids=start, cache=cache, use_cache=True)  # one row per article: (B, 1, V)
    logits = outputs.logits[:, -1].float().repeat_interleave(group_size, dim=0)  # (B*G, V)
    cache.batch_repeat_interleave(group_size)  # self- and cross-attention keys/values, (B, ...) -> (B*G, ...)
    encoder_outputs = BaseModelOutput(last_hidden_state=hidden.repeat_interleave(group_size, dim=0))  # (B*G, S, d)
    attention_mask = attention_mask.repeat_interleave(group_size, dim=0)  # (B*G, S)
    finished = torch.zeros(num_samples, dtype=torch.bool, device=device)  # (B*G,)
    tokens, logprobs = [], []
    for step in range(max_new_tokens):
        if step > 0:
            logits = step_function(model, encoder_outputs, attention_mask, tokens[-1], cache)  # (B*G, V)
        scaled = logits / temperature
        if greedy:
            token = logits.argmax(dim=-1)  # (B*G,)
        else:
            probs = top_p_filter(scaled, top_p).softmax(dim=-1)  # (B*G, V)
            token = inverse_cdf_sample(probs, torch.rand(num_samples, device=device))
        if step == 0 and forced_first is not None:  # the checkpoint's forced first token (BART-large, mBART)
            token = torch.full_like(token, forced_first)
        token = token.masked_fill(finished, pad_token_id)  # (B*G,)
        if with_logprobs:
            chosen = scaled.gather(1, token.unsqueeze(1)).squeeze(1) - torch.logsumexp(scaled, dim=-1)  # (B*G,)
            logprobs.append(chosen.masked_fill(finished, 0.0))
        tokens.append(token)
        finished = finished | (token == eos_token_id)
        if (step + 1) % SAMPLER_CHECK_EVERY == 0 and bool(finished.all()):
            break
    completion_ids = torch.stack(tokens, dim=1)  # (B*G, T)
    length = int(completion_mask(completion_ids, eos_token_id)[0].sum(dim=1).max())  # drop all-pad columns
    start = torch.full((num_samples, 1), decoder_start_token_id(model), dtype=torch.long, device=device)
    logprobs = torch.stack(logprobs, dim=1)[:, :length] if with_logprobs else None  # (B*G, T)
    return torch.cat([start, completion_ids[:, :length]], dim=1), logprobs


def rollout_step(policy, tokenizer, batch_rows: dict, config: Config, device, timer,
                 names: frozenset[str] = frozenset()) -> tuple[Rollout, dict]:
    """Sample G summaries per article, reward them, and compute the group advantages (once per rollout)."""
    encoded, truncated_articles = tokenize_articles(tokenizer, batch_rows[config.text_column], config, device)
    with timer("time_generate"), autocast(device), eval_mode(policy):
        sequences, _ = sample_completions(policy, encoded["input_ids"], encoded["attention_mask"], config.group_size,
                                          config.max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                          config.temperature, config.top_p, with_logprobs=False,
                                          step_function=sampler_step_function(config))
    completion_ids = sequences[:, 1:]  # (B*G, T): drop the decoder start token, which is never scored
    mask, truncated = completion_mask(completion_ids, tokenizer.eos_token_id)
    length = int(mask.sum(dim=1).max())  # trim right padding past the longest sample
    completion_ids, mask = completion_ids[:, :length], mask[:, :length]
    with timer("time_reward"):
        lengths = mask.sum(dim=1).long().tolist()
        summaries = tokenizer.batch_decode([ids[:n] for ids, n in zip(completion_ids.tolist(), lengths)],
                                           skip_special_tokens=True)
        references = [ref for ref in batch_rows[config.summary_column] for _ in range(config.group_size)]
        articles = [text for text in batch_rows[config.text_column] for _ in range(config.group_size)]
        rewards = compute_rewards(summaries, references, articles, config, names)
        rewards = torch.tensor(checked_rewards(rewards, summaries), dtype=torch.float32, device=device)
        advantages = group_advantages(rewards, config.group_size, scale=config.scale_rewards,
                                      batch_std=batch_reward_std(rewards) if config.scale_rewards == "batch" else None)
    if config.mask_truncated_completions:
        mask = mask * (~truncated).unsqueeze(1)
    mask = exclude_forced_tokens(mask, forced_bos_token_id(policy))  # the sampler forces exactly this token
    rollout = Rollout(encoded["input_ids"], encoded["attention_mask"], sequences[:, :length], completion_ids,
                      mask, advantages)
    zero_std_groups = (advantages.view(-1, config.group_size) == 0).all(dim=1)  # (B,): all G rewards equal
    stats = {"reward_mean": rewards.mean().item(), "reward_std": rewards.std(unbiased=False).item(),
             "reward_max": rewards.max().item(), "zero_std_groups": zero_std_groups.float().mean().item(),
             "completion_length": float(np.mean(lengths)), "truncated_fraction": truncated.float().mean().item(),
             "articles_truncated": truncated_articles,
             "samples": list(zip(summaries, rewards.tolist(), advantages.tolist()))}  # for completions.jsonl
    return rollout, stats


# --------------------------------------------------------------------------------------------------
# GRPO step 3/4, the update: mu optimizer steps on one rollout
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def sequence_logprobs_no_grad(forward, rollout: Rollout, config: Config, device: torch.device) -> torch.Tensor:
    """Per-token log-probs (B*G, T) of the rollout's samples under a model, micro-batched, no gradients."""
    chunks = []
    for articles, samples in micro_batches(rollout.input_ids.size(0), config.group_size, config.micro_batch_size):
        with autocast(device):
            logits = forward(rollout.input_ids[articles], rollout.attention_mask[articles],
                             rollout.decoder_input_ids[samples], config.group_size)
        chunks.append(token_logprobs(logits.float() / config.temperature, rollout.completion_ids[samples]))
    return torch.cat(chunks)


def grpo_update(policy_forward, optimizer, scheduler, rollout: Rollout, config: Config, device, timer) -> dict:
    """num_iterations (mu) AdamW steps on one rollout. Returns the loss statistics, averaged.

    The rollout is cut into micro-batches of whole groups, each loss weighted so that the gradients add up to the
    full batch's (micro_batch_weight). An update whose loss or gradient norm is not finite is skipped and counted.
    """
    parameters = [p for p in policy_forward.parameters() if p.requires_grad]
    groups = list(micro_batches(rollout.input_ids.size(0), config.group_size, config.micro_batch_size))
    world_tokens = world_token_count(policy_forward, rollout.mask, config.loss_type)  # dapo under DDP, else (None, 1)
    totals = Counter()
    for iteration in range(config.num_iterations):  # mu updates on the same rollout
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for index, (articles, samples) in enumerate(groups):
            if iteration == 0:  # a signal stops here (stop_point) while the weights are the last finished step's
                stop_point()
            with gradient_sync(policy_forward, index == len(groups) - 1):  # DDP: once per update
                with timer("time_forward"), autocast(device):
                    logits = policy_forward(rollout.input_ids[articles], rollout.attention_mask[articles],
                                            rollout.decoder_input_ids[samples], config.group_size)
                    logits = logits.float() / config.temperature  # (n, T, V): the distribution that sampled
                    logprobs = token_logprobs(logits, rollout.completion_ids[samples])  # log pi_theta, (n, T)
                    # pi_old: with mu = 1 it is pi_theta itself (detached), so the ratio is exactly 1
                    old = logprobs.detach() if rollout.old_logprobs is None else rollout.old_logprobs[samples]
                    loss, stats = grpo_loss(logprobs, old, rollout.ref_logprobs[samples], rollout.advantages[samples],
                                            rollout.mask[samples], config.epsilon, config.beta, config.epsilon_high,
                                            config.loss_type, config.max_new_tokens)
                    weight = micro_batch_weight(config.loss_type, rollout.mask[samples], rollout.mask, *world_tokens)
                    if iteration == 0:  # the entropy of the policy that sampled, for the logs
                        stats["entropy"] = token_entropy(logits)  # (n, T)
                with timer("time_backward"):
                    (loss * weight).backward()
            step_loss += loss.item() * weight
            add_update_stats(totals, stats, rollout.mask, samples, config.num_iterations)
        with timer("time_optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm).item()
            if math.isfinite(step_loss) and math.isfinite(grad_norm):
                optimizer.step()
                scheduler.step()
            else:
                totals["nonfinite_updates"] += 1
        totals["loss"] += step_loss / config.num_iterations
        totals["grad_norm"] += grad_norm / config.num_iterations
    return dict(totals)


# --------------------------------------------------------------------------------------------------
# GRPO step 4/4: rollout, reference (and old) log-probs, update
# --------------------------------------------------------------------------------------------------
def grpo_step(policy, policy_forward, reference_forward, tokenizer, rows: dict, optimizer, scheduler,
              config: Config, device, names: frozenset[str] = frozenset()) -> dict:
    """One GRPO step on a batch of articles: rollout and rewards, reference (and old) log-probs, mu updates.

    Returns this process's numbers for metrics.jsonl (with the seconds of each phase), and its samples.
    """
    timer, started = PhaseTimer(device), time.perf_counter()
    rollout, rollout_stats = rollout_step(policy, tokenizer, rows, config, device, timer, names)
    stop_point()  # a boundary: after Ctrl-C or SIGTERM the run stops here (see StopRequest)
    with timer("time_reference"):
        rollout.ref_logprobs = sequence_logprobs_no_grad(reference_forward, rollout, config, device)
    if config.num_iterations > 1:  # pi_old = the policy as it sampled; with mu = 1 the ratio is exactly 1
        with timer("time_old"):
            rollout.old_logprobs = sequence_logprobs_no_grad(GroupedSeq2Seq(policy), rollout, config, device)
    update_stats = grpo_update(policy_forward, optimizer, scheduler, rollout, config, device, timer)
    numbers = {k: float(v) for k, v in {**rollout_stats, **update_stats}.items() if isinstance(v, (int, float))}
    numbers.setdefault("nonfinite_updates", 0.0)
    numbers["generated_tokens"] = float(rollout.mask.sum())
    update_seconds = sum(timer.seconds[k] for k in ("time_forward", "time_backward", "time_optimizer"))
    return {**numbers, **timer.seconds, "time_update": update_seconds, "seconds": time.perf_counter() - started,
            "samples": rollout_stats["samples"]}


# --------------------------------------------------------------------------------------------------
# Model glue: an encoder-once forward with shared cross-attention, micro-batches, modes and tokens
# --------------------------------------------------------------------------------------------------
class GroupedSeq2Seq(torch.nn.Module):
    """Teacher-forced forward of an encoder-decoder where each article has `group_size` decoder rows.

    The encoder runs once per article; its output is repeated to the G samples, so gradients from all G reach the
    encoder through that single pass. Wrapping this module (not the bare model) in DDP keeps every scoring pass a
    normal DDP forward.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, decoder_input_ids, group_size: int) -> torch.Tensor:
        from transformers.modeling_outputs import BaseModelOutput

        hidden = self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        cache = shared_cross_attention_cache(self.model, hidden, attention_mask, decoder_input_ids[::group_size, :1],
                                             group_size)
        outputs = self.model(  # hidden (B, S, d) -> (B*G, S, d); decoder_input_ids (B*G, T)
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden.repeat_interleave(group_size, dim=0)),
            attention_mask=attention_mask.repeat_interleave(group_size, dim=0),
            decoder_input_ids=decoder_input_ids, cache=cache, use_cache=cache is not None,
        )
        return outputs.logits  # (B*G, T, V)


def shared_cross_attention_cache(model, hidden: torch.Tensor, attention_mask: torch.Tensor,
                                 start_ids: torch.Tensor, group_size: int):
    """An EncoderDecoderCache whose cross-attention keys/values are projected once per article, repeated to G.

    hidden (B, S, d), attention_mask (B, S), start_ids (B, 1). One decoder step at batch B fills the model's own
    cross-attention cache ((B, heads, S, d_head) per layer); repeated to B*G rows, a teacher-forced pass over
    (B*G, T) reads them instead of projecting the article G times (gradients flow through them as before).
    None (the plain path) for G = 1 and in train mode, where dropout and layerdrop draw anew per sample.
    """
    from transformers import DynamicCache, EncoderDecoderCache
    from transformers.modeling_outputs import BaseModelOutput

    if group_size == 1 or model.training:
        return None
    primed = EncoderDecoderCache(DynamicCache(), DynamicCache())
    model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=attention_mask,
          decoder_input_ids=start_ids, cache=primed, use_cache=True)
    cross = [(keys.repeat_interleave(group_size, dim=0), values.repeat_interleave(group_size, dim=0))
             for keys, values, *_ in primed.cross_attention_cache]
    return EncoderDecoderCache(DynamicCache(), DynamicCache(cross))


def micro_batches(num_articles: int, group_size: int, micro_batch_size: int):
    """(article slice, sample slice) pairs of whole groups, micro_batch_size samples at most each."""
    articles_per_micro_batch = max(1, micro_batch_size // group_size)
    for start in range(0, num_articles, articles_per_micro_batch):
        stop = min(start + articles_per_micro_batch, num_articles)
        yield slice(start, stop), slice(start * group_size, stop * group_size)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """The model in eval mode inside the block, its own mode after it (sampling needs the KV cache, which
    transformers turns off in train mode under gradient checkpointing)."""
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (weights stay fp32), nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forced_bos_token_id(model) -> int | None:
    """The token the checkpoint forces as the first generated one (BART-large, mBART), else None."""
    for source in (model.generation_config, model.config):
        token = getattr(source, "forced_bos_token_id", None)
        if token is not None:
            return token
    return None


def decoder_start_token_id(model) -> int:
    """The token every decoder sequence starts with (eos for BART, pad for T5)."""
    token = model.config.decoder_start_token_id
    return model.generation_config.decoder_start_token_id if token is None else token


# --------------------------------------------------------------------------------------------------
# THE REWARD: edit compute_rewards to change what GRPO optimizes (e.g. add a length penalty)
# --------------------------------------------------------------------------------------------------
def compute_rewards(predictions: list[str], references: list[str], articles: list[str], config: Config,
                    names: frozenset[str] = frozenset()) -> list[float]:
    """The reward of each sampled summary. This is the one place to plug in another reward.

    Contract:
      inputs   predictions[i] is a summary sampled for articles[i], whose reference summary is references[i];
               the G samples of an article are consecutive and share its article and reference.
               config is the run's Config (for weights or other settings you add to it); names: see below.
      output   one finite float per prediction, larger is better. Advantages compare the G samples of an
               article, so a constant offset changes nothing (with --scale_rewards=batch the spread between
               articles sets the scale; with group or none only differences within a group matter).
      called   once per rollout, on every process for its own articles, never inside the mu updates; and once
               at the start of a run (check_reward: two training articles, their references and empty summaries).
    Default: sum_k weight_k * ROUGE-k F1 with the --rouge*_weight flags (normalized to sum to 1), in [0, 1].
    With --invented_fact_penalty=lambda > 0, minus lambda * the number of the summary's numbers and names that its
    article lacks (invented_facts, the evaluation's own measure; `names`: the training texts' names, so lowercased
    names count). A count, not a share: correct facts cost nothing, so ROUGE keeps pulling them in, and a vaguer
    summary cannot dilute an invented one. What it misses: README, "Changing the reward".
    """
    rewards = rouge_rewards(predictions, references, reward_weights(config), config.rouge_tokenizer)
    if config.invented_fact_penalty:
        rewards = [reward - config.invented_fact_penalty * len(invented_facts(prediction, article, names))
                   for reward, prediction, article in zip(rewards, predictions, articles)]
    return rewards


def reward_weights(config: Config) -> dict[str, float]:
    """The reward's ROUGE weights from the config, normalized to sum to 1."""
    weights = {key: getattr(config, f"{key}_weight") for key in ROUGE_KEYS}
    total = sum(weights.values())
    return {key: weight / total for key, weight in weights.items()}


def rouge_rewards(predictions: list[str], references: list[str], weights: dict[str, float] | None = None,
                  tokenizer: str = "default") -> list[float]:
    """Reward of each prediction: sum_k weight_k * ROUGE-k F1, in [0, 1]. Default: mean of ROUGE-1, -2, -Lsum."""
    weights = weights or reward_weights(Config())
    scores = rouge_f1(predictions, references, tokenizer)
    return [sum(w * scores[key][i] for key, w in weights.items() if w) for i in range(len(predictions))]


# --------------------------------------------------------------------------------------------------
# SFT warm-up: teacher-forced cross-entropy on the reference summaries
# --------------------------------------------------------------------------------------------------
def sft_labels(tokenizer, summaries: list[str], max_length: int) -> torch.Tensor:
    """Token ids of the reference summaries (B, T), with -100 at padding positions (by the attention mask, not by
    pad_token_id, so the EOS targets stay when pad == eos). Targets start after the decoder start token."""
    encoded = tokenizer(text_target=summaries, max_length=max_length, truncation=True, padding=True,
                        return_tensors="pt")
    return encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)  # (B, T)


def sft_warmup(policy_forward, policy, tokenizer, train, config: Config, device, dist: "Distributed", log,
               held_out=None, curve_file: str | None = None, checkpoint: str | None = None) -> list[dict]:
    """sft_steps AdamW steps of cross-entropy on (article, reference summary) pairs, through the same forward.

    With sft_eval_every > 0 and held_out rows, the held-out ROUGE every sft_eval_every steps before the last (the
    caller evaluates the end), so one can see whether SFT had stopped improving. Returns those evaluations, and
    appends each to curve_file (if given) as soon as it is made. checkpoint: an SFT checkpoint (sft_N.pt) to go on from.
    """
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=config.sft_learning_rate,
                                  fused=fused_adamw(device))
    scheduler = get_scheduler(config.sft_lr_scheduler, optimizer, min(config.warmup_steps, config.sft_steps),
                              config.sft_steps)
    policy.train()
    curve = []

    def score(step: int, loss: float) -> None:  # held-out ROUGE after SFT step `step`
        with eval_mode(policy):
            metrics, _, _ = evaluate(policy, tokenizer, held_out, config, device, dist)
        curve.append({"sft_step": step, "loss": loss, **metrics})
        if curve_file:
            append_jsonl(curve_file, curve[-1])
        log(f"sft step {step}: " + format_scores(metrics))

    saved = load_sft_checkpoint(checkpoint, policy, optimizer, scheduler, config, dist, log) if checkpoint else None
    if saved and saved.evaluation_pending:  # stopped in the evaluation after this SFT step: do it again
        score(saved.sft_step, saved.sft_loss)
    progress = tqdm_bar(config.sft_steps, "sft", disable=not dist.is_main, initial=saved.sft_step if saved else 0)
    for step in progress:
        rows = train[batch_indices(step, config.sft_batch_size, len(train), config.seed + 1, dist.rank, dist.world_size)]
        encoded, _ = tokenize_articles(tokenizer, rows[config.text_column], config, device)
        labels = sft_labels(tokenizer, rows[config.summary_column], config.max_new_tokens).to(device)
        decoder_input_ids = policy.prepare_decoder_input_ids_from_labels(labels=labels)
        with autocast(device):
            logits = policy_forward(encoded["input_ids"], encoded["attention_mask"], decoder_input_ids, 1)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.3f}")
        scored_now = config.sft_eval_every and (step + 1) % config.sft_eval_every == 0 and step + 1 < config.sft_steps
        scored_now = bool(scored_now and held_out is not None and len(held_out))
        finished_sft_step(step + 1, loss.item(), scored_now, policy, optimizer, scheduler, config, dist)  # a boundary
        if scored_now:
            score(step + 1, loss.item())
    set_grpo_mode(policy, config)
    log(f"sft: {config.sft_steps} steps, last loss {loss.item():.4f}")
    return curve


# --------------------------------------------------------------------------------------------------
# Evaluation: greedy (or the checkpoint's own) decoding on held-out articles, ROUGE F1 with 95% CIs
# --------------------------------------------------------------------------------------------------
def score_summaries(predictions: list[str], references: list[str], seed: int,
                    tokenizer: str = "default") -> tuple[dict, dict[str, list[float]]]:
    """ROUGE-1/2/L/Lsum F1 of each summary, and the metrics: each mean with <key>_ci_low / <key>_ci_high.

    Returns (metrics, per-article scores). Every interval uses the same seed, so it reproduces.
    """
    scores = rouge_f1(predictions, references, tokenizer)
    metrics = {}
    for key, values in scores.items():
        metrics[key] = float(np.mean(values))
        metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"] = bootstrap_ci(values, seed)
    return metrics, scores


@torch.no_grad()
def evaluate(policy, tokenizer, held_out, config: Config, device, dist: "Distributed") -> tuple[dict, list[dict], list[dict]]:
    """Summaries of the held-out articles (split across processes; decoding by evaluation_settings), scored with
    ROUGE F1.

    Returns (metrics: rouge1, rouge2, rougeL, rougeLsum with 95% bootstrap intervals, gen_length and ref_length
    in words, distinct_fraction; examples; per-article records: index, reference, prediction and scores).
    """
    settings = evaluation_settings(policy, tokenizer, config)
    mine = list(range(dist.rank, len(held_out), dist.world_size))
    predictions, special_only = [], []
    for start in range(0, math.ceil(len(held_out) / dist.world_size), config.eval_batch_size):  # equal on all processes
        stop_point()  # a boundary between batches (every process passes it equally often)
        if start >= len(mine):
            continue
        rows = held_out[mine[start:start + config.eval_batch_size]]
        encoded, _ = tokenize_articles(tokenizer, rows[config.text_column], config, device)
        with autocast(device):
            output = generate(policy, encoded, settings)
        predictions += tokenizer.batch_decode(output, skip_special_tokens=True)
        special_only += special_token_summaries(policy, tokenizer, output)
    predictions, special_only = zip(*dist.gather_in_order(list(zip(mine, zip(predictions, special_only)))))
    predictions = list(predictions)
    articles, references = held_out[config.text_column], held_out[config.summary_column]
    metrics, scores = score_summaries(predictions, references, config.seed, config.rouge_tokenizer)
    metrics["gen_length"] = float(np.mean([len(p.split()) for p in predictions]))
    metrics["ref_length"] = float(np.mean([len(r.split()) for r in references]))
    metrics["distinct_fraction"] = len(set(predictions)) / len(predictions)
    metrics.update(summary_quality(predictions, references, articles))
    metrics.update(empty_summaries=sum(not p.strip() for p in predictions) / len(predictions),
                   special_token_summaries=sum(special_only) / len(predictions))
    examples = [{"article": articles[i], "reference": references[i], "prediction": predictions[i]}
                for i in range(min(config.num_examples, len(predictions)))]
    per_article = [{"index": i, "reference": references[i], "prediction": predictions[i],
                    **{key: scores[key][i] for key in ROUGE_KEYS}} for i in range(len(predictions))]
    return metrics, examples, per_article


# --------------------------------------------------------------------------------------------------
# The main loop: build the run, then batch -> grpo_step -> log -> evaluate/save
# --------------------------------------------------------------------------------------------------
def train(config: Config, given: set[str] = frozenset()) -> int:
    """The whole run: set it up, then per step: a batch -> grpo_step -> log -> evaluate / save.

    Returns the exit code: 0, or 130 after Ctrl-C / 143 after SIGTERM, with a checkpoint saved.
    """
    config, dist, log = start_process(config, given)  # processes, output dir, threads, the demo's files
    stop, run, progress = StopRequest(log, dist), None, None  # from here on (SFT too) a signal stops at a boundary
    try:
        run = build_run(config, dist, log)  # data, policy (after SFT), pi_ref, optimizer; a checkpoint's state
        finished_step(run)  # what a signal saves until the next step is finished
        progress = tqdm_bar(config.max_steps, "grpo", disable=not dist.is_main, initial=run.state.step)
        if run.state.evaluation_pending:  # the start (step 0), or the evaluation a signal interrupted (resumed)
            evaluate_and_log(run, step=run.state.step)  # held-out ROUGE (at step 0: before any GRPO step)
        for step in range(run.state.step + 1, config.max_steps + 1):
            # 1. a batch of B articles: a pure function of the step, so a resumed run sees the same data
            indices = batch_indices(step - 1, config.batch_size, len(run.train_rows), config.seed, dist.rank,
                                    dist.world_size)
            rows = run.train_rows[indices]
            # 2. GRPO: sample G summaries per article, reward them, score them under pi_ref, update pi_theta
            numbers = grpo_step(run.policy, run.policy_forward, run.reference_forward, run.tokenizer, rows,
                                run.optimizer, run.scheduler, config, dist.device, run.fact_names)
            # 3. log: metrics.jsonl (and trackers, completions.jsonl); stop after too many NaN steps in a row
            metrics = log_step(run, step, indices, rows, numbers)
            progress.update(1)
            progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl']:.4f}")
            # 4. held-out ROUGE every eval_every steps (best/ follows it), a checkpoint every save_every steps
            if step % config.eval_every == 0 or step == config.max_steps:
                evaluate_and_log(run, step)
            interrupted = dist.any(stop.requested)  # Ctrl-C or SIGTERM on any process
            if step % config.save_every == 0 or step == config.max_steps or interrupted:
                save_run_checkpoint(run)
            if interrupted:
                return stopped_early(run, stop)
    except Stopped as stopped:  # at a boundary in SFT, a step or an evaluation: the last finished step is saved
        return stopped_early(run, stop, stopped)
    finally:
        stop.restore()
        for opened in (progress, run and run.trackers):
            if opened is not None:
                opened.close()
    finish_run(run)  # final/, curves.png, the demo's comparison
    return 0


def build_run(config: Config, dist: "Distributed", log) -> Run:
    """Data, the policy (after SFT, with LoRA adapters if asked), pi_ref, AdamW and the lr schedule; on --resume,
    the newest checkpoint's weights, optimizer, schedule, counters and random state (resume_run)."""
    from transformers import get_scheduler

    device = dist.device
    checkpoint = checkpoint_to_resume(config, dist, log)  # None for a fresh run; a resume's flags are checked first
    sft_checkpoint = checkpoint if checkpoint and is_sft_checkpoint(checkpoint) else None  # stopped during SFT
    checkpoint = None if sft_checkpoint else checkpoint
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed + dist.rank)  # different samples on every process
    train_rows, held_out = load_data(config, log)
    fact_names = training_names(train_rows, config, log) if config.invented_fact_penalty else frozenset()  # reward's
    policy, tokenizer = load_policy_and_tokenizer(config, device)
    check_data_and_model(config, dist, log, train_rows, held_out, policy, tokenizer, fact_names)  # one line per problem
    set_grpo_mode(policy, config)
    policy_forward = None if config.lora_r > 0 else training_forward(policy, config, dist)  # LoRA: after SFT
    reference_dir = os.path.join(config.output_dir, "reference")
    if dist.is_main:  # once data and model have loaded (a bad data file leaves no "earlier run" behind)
        write_json_atomic(os.path.join(config.output_dir, RUN_CONFIG_FILE), dataclasses.asdict(config))
    if checkpoint is None and config.sft_steps > 0:
        sft_warmup(policy_forward or training_forward(policy, config, dist), policy, tokenizer, train_rows, config,
                   device, dist, log, held_out, os.path.join(config.output_dir, "sft_eval.jsonl") if dist.is_main else None,
                   sft_checkpoint)
        if dist.is_main:  # pi_ref for a resumed run (with LoRA: the base the adapter of final/adapter applies to)
            save_pretrained_atomic(policy, tokenizer, reference_dir)
    if config.lora_r > 0:  # adapters after SFT: switched off, they give the post-SFT model, pi_ref (no copy)
        policy = add_lora(policy, config)
        set_grpo_mode(policy, config)
        policy_forward, reference_forward = training_forward(policy, config, dist), AdaptersDisabled(policy)
        trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        log(f"lora: training {trained:,} of {sum(p.numel() for p in policy.parameters()):,} parameters")
    else:  # pi_ref: the policy as GRPO starts (after SFT); a resumed run reads it back from reference/
        reference = load_saved_model(reference_dir, config, device) if checkpoint and os.path.isdir(reference_dir) \
            else policy
        reference_forward = GroupedSeq2Seq(frozen_copy(reference))
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=config.learning_rate,
                                  weight_decay=config.weight_decay, fused=fused_adamw(device))
    scheduler = get_scheduler(config.lr_scheduler, optimizer, config.warmup_steps, config.max_steps * config.num_iterations)
    run = Run(config, dist, log, train_rows, held_out, policy, tokenizer, policy_forward, reference_forward,
              optimizer, scheduler, TrainerState(), None, fact_names)
    if checkpoint:
        resume_run(run, checkpoint)
    run.trackers = Trackers(config if dist.is_main else dataclasses.replace(config, report_to="none"), run.state.step + 1)
    return run


# ==================================================================================================
# PLUMBING: everything below serves the algorithm above (model loading, the run's bookkeeping, flags,
# data files, checkpoint files, processes, ROUGE internals, the demo world, the benchmark).
# A first reading can stop here.
# ==================================================================================================


# --------------------------------------------------------------------------------------------------
# Model loading: policy and tokenizer, LoRA, pi_ref, modes; decoding settings; the compiled sampler step
# --------------------------------------------------------------------------------------------------
def load_policy_and_tokenizer(config: Config, device: torch.device):
    """The policy (fp32 master weights) and its tokenizer, with one clear line when either cannot be loaded."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    name, remote = os.path.expanduser(config.model_name), config.trust_remote_code  # ~/models/x: the shell may not expand it
    hint = "pass --model_name=/path/to/local/model, or set HF_ENDPOINT to a reachable mirror"
    try:
        model_config = AutoConfig.from_pretrained(name, trust_remote_code=remote)
    except Exception as error:
        raise UserError(f"could not load model {name!r} ({str(error).splitlines()[0]}); {hint}") from None
    if not getattr(model_config, "is_encoder_decoder", False):
        raise UserError(f"model {name!r} is a {model_config.model_type} model without a decoder/encoder pair; "
                        "this script needs an encoder-decoder (BART, T5, Pegasus, ...)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=remote)
    except Exception as error:
        raise UserError(f"could not load a tokenizer for {name!r} ({str(error).splitlines()[0]}); "
                        "save one beside the model with tokenizer.save_pretrained") from None
    if config.gradient_checkpointing:  # transformers checkpoints only in train mode: dropout goes to 0 instead
        for key, value in model_config.to_dict().items():  # layerdrop too: it skips whole layers in train mode
            if ("dropout" in key or "layerdrop" in key) and isinstance(value, float):
                setattr(model_config, key, 0.0)
    try:
        policy = AutoModelForSeq2SeqLM.from_pretrained(name, config=model_config, trust_remote_code=remote,
                                                       dtype=torch.float32)
    except Exception as error:
        raise UserError(f"could not load model {name!r} ({str(error).splitlines()[0]}); {hint}") from None
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)) + 1:  # transformers 5 builds an empty one from the config
        raise UserError(f"found no tokenizer files for {name!r} (its tokenizer would hold only special tokens); "
                        "save one beside the model with tokenizer.save_pretrained")
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer of {name!r} needs a pad and an eos token")
    return policy.to(device), tokenizer


def add_lora(policy, config: Config):
    """Wrap the policy in peft LoRA adapters (a PeftModel): from now on only the adapters train.

    Called after SFT, so the base weights under the adapters are the model as GRPO starts; the adapters start
    as a no-op (peft initializes B = 0), so at step 1 the policy equals that model.
    """
    import peft

    targets = config.lora_target_modules.strip()
    lora_config = peft.LoraConfig(
        task_type=peft.TaskType.SEQ_2_SEQ_LM, r=config.lora_r, lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()])
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated is_gradient_checkpointing: not ours
            warnings.simplefilter("ignore", FutureWarning)
            lora_policy = peft.get_peft_model(policy, lora_config)
    except ValueError as error:  # e.g. a target module name the model does not have
        raise UserError(f"--lora_target_modules={targets}: {str(error).splitlines()[0]}") from None
    if config.gradient_checkpointing:  # the frozen embeddings' output must require grad for checkpointed layers
        lora_policy.enable_input_require_grads()
    return lora_policy


def is_lora(model) -> bool:
    """Whether the model is a peft LoRA PeftModel (add_lora)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "merge_and_unload")


class AdaptersDisabled(torch.nn.Module):
    """pi_ref for a LoRA policy: the same weights with the adapters switched off (peft's disable_adapter), so
    the reference costs no second copy of the model. Call it under no_grad, outside DDP."""

    def __init__(self, lora_policy):
        super().__init__()
        self.grouped = GroupedSeq2Seq(lora_policy)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        with self.grouped.model.disable_adapter():
            return self.grouped(*args, **kwargs)


def set_grpo_mode(policy, config: Config) -> None:
    """Dropout off for GRPO, so that the rollout and the update score the same function (ratio = 1 at first).

    That is eval mode, except with gradient checkpointing, which transformers applies only in train mode:
    then the model was loaded with every dropout probability set to 0 and stays in train mode.
    """
    if config.gradient_checkpointing:  # transformers 5 name first, then the transformers 4 one
        enable = getattr(policy, "activation_checkpointing_enable", None) or policy.gradient_checkpointing_enable
        enable()
        policy.train()
    else:
        policy.eval()


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the model in eval mode with no gradients: the reference pi_ref."""
    import copy

    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def training_forward(model, config: Config, dist: "Distributed") -> torch.nn.Module:
    """The training forward: GroupedSeq2Seq(model), compiled (--compile) and/or DDP-wrapped (torchrun) as asked."""
    forward = GroupedSeq2Seq(model)
    if config.compile:
        forward = torch.compile(forward)
    if dist.world_size > 1:
        device = dist.device
        forward = torch.nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None)
    return forward


def load_saved_model(directory: str, config: Config, device: torch.device):
    """A model written by save_pretrained_atomic (a resumed run's pi_ref), in fp32 on device."""
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(directory, dtype=torch.float32,
                                                 trust_remote_code=config.trust_remote_code).to(device)


def sampler_step_function(config: Config):
    """The sampler's decoder step: the plain one, or with --compile_sampler the run's compiled static step."""
    return run_static_step(config.max_new_tokens, config.max_source_length) if config.compile_sampler else decoder_step


@lru_cache(maxsize=1)
def run_static_step(max_new_tokens: int, max_source_length: int) -> "StaticCacheDecoderStep":
    """The run's one compiled static step: its buffers, compile and CUDA graph serve every rollout of the run."""
    return StaticCacheDecoderStep(max_new_tokens, compiled=True, max_source_length=max_source_length)


class StaticCacheDecoderStep:
    """decoder_step on buffers allocated once per run, so that every step of every rollout has the same shapes and
    addresses and its only per-step input is the token: the self-attention keys/values (a transformers StaticCache
    of max_new_tokens positions, with the decoder's layer count), the cross-attention keys/values, the encoder's
    output and its mask, all padded to max_source_length (the mask 0 there; None: the first rollout's length).

    The first step of each rollout resets the buffers and copies that rollout's keys/values in. Under autocast (the
    CUDA sampler), the decoder's linear weights are read from bf16 copies refreshed once per rollout: what autocast
    casts on every step, the same numbers. compiled=True runs the step through torch.compile(mode="reduce-overhead",
    dynamic=False): one compile per run whatever the article lengths, and on CUDA one CUDA graph recorded once and
    replayed by every step of every rollout (the buffers are marked static addresses, so nothing is copied into the
    graph but the token). Same tokens as decoder_step (tested).
    """

    def __init__(self, max_new_tokens: int, compiled: bool = False, max_source_length: int | None = None,
                 backend="inductor"):
        self.max_new_tokens, self.max_source_length, self.compiled = max_new_tokens, max_source_length, compiled
        self.backend = backend  # torch.compile's backend (tests pass one that counts graphs)
        self.model = self.shape = self.rollout_cache = None

    def __call__(self, model, encoder_outputs, attention_mask, token, cache) -> torch.Tensor:
        if self.rollout_cache is None or self.rollout_cache() is not cache:  # a rollout's first step here
            self.start_rollout(model, encoder_outputs.last_hidden_state, attention_mask, cache)
        if self.compiled:  # each step a new CUDA-graph generation: the same recording replayed
            torch.compiler.cudagraph_mark_step_begin()
        return self.step(token).clone()  # a CUDA graph's output buffer is overwritten by the next replay

    def start_rollout(self, model, hidden: torch.Tensor, attention_mask: torch.Tensor, cache) -> None:
        """Reset the run's buffers (allocated here on the first rollout) and copy this rollout's in; the rollout's
        cache then points at the buffers, so that its own keys/values are freed."""
        import weakref

        length = hidden.size(1)
        if self.max_source_length is not None and length > self.max_source_length:
            raise ValueError(f"articles of {length} tokens exceed the static step's {self.max_source_length}")
        autocast_dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
            else None
        shape = (hidden.size(0), hidden.size(2), hidden.dtype, hidden.device, autocast_dtype)  # else: new buffers
        if model is not self.model or shape != self.shape or length > self.hidden.size(1):
            self.allocate(model, shape, max(length, self.max_source_length or 0))
        self.self_cache.reset()
        self.cross_cache.reset()
        for layer, (keys, values, *_) in enumerate(cache.self_attention_cache):  # the first token's keys/values
            self.self_cache.update(keys, values, layer)
        for layer, (keys, values, *_) in enumerate(cache.cross_attention_cache):  # positions past length stay 0
            self.cross_cache.update(keys, values, layer)
        self.cache.is_updated = {layer: True for layer in range(len(self.cross_cache))}
        self.hidden.zero_()[:, :length].copy_(hidden)
        self.attention_mask.zero_()[:, :length].copy_(attention_mask)
        for name, weight in self.sampling_weights.items():  # once per rollout, not in every step
            weight.copy_(self.sources[name])
        cache.self_attention_cache, cache.cross_attention_cache = self.self_cache, self.cross_cache  # frees its own
        self.rollout_cache = weakref.ref(cache)  # which rollout the buffers hold, without keeping its cache alive

    def allocate(self, model, shape: tuple, length: int) -> None:
        """The buffers, the bf16 weight copies under autocast, and the (compiled) step over them."""
        from transformers import EncoderDecoderCache, StaticCache
        from transformers.modeling_outputs import BaseModelOutput

        rows, width, dtype, device, autocast_dtype = shape
        decoder_config = model.get_decoder().config  # T5's decoder may have more layers than its encoder
        self.self_cache = StaticCache(config=decoder_config, max_cache_len=self.max_new_tokens)
        self.cross_cache = StaticCache(config=decoder_config, max_cache_len=length)
        self.cache = EncoderDecoderCache(self.self_cache, self.cross_cache)
        self.hidden = torch.zeros(rows, length, width, dtype=dtype, device=device)
        self.attention_mask = torch.zeros(rows, length, dtype=torch.long, device=device)
        self.encoder_outputs = BaseModelOutput(last_hidden_state=self.hidden)
        encoder = {id(module) for module in model.get_encoder().modules()}
        self.sources = {f"{name}.{key}": tensor for name, module in model.named_modules()
                        if isinstance(module, torch.nn.Linear) and id(module) not in encoder
                        for key, tensor in (("weight", module.weight), ("bias", module.bias)) if tensor is not None} \
            if autocast_dtype is not None else {}
        self.sampling_weights = {name: torch.empty_like(tensor, dtype=autocast_dtype, requires_grad=False)
                                 for name, tensor in self.sources.items()}
        for tensor in [self.hidden, self.attention_mask, *self.sampling_weights.values()]:
            torch._dynamo.mark_static_address(tensor)
        self.model, self.shape = model, shape
        self.step = torch.compile(self.decode, backend=self.backend, dynamic=False, mode="reduce-overhead"
                                  if self.backend == "inductor" else None) if self.compiled else self.decode

    def decode(self, token: torch.Tensor) -> torch.Tensor:
        """decoder_step on the buffers, the linear layers reading the bf16 weights under autocast."""
        model = self.model
        if self.sampling_weights:
            model = lambda **inputs: torch.func.functional_call(  # noqa: E731
                self.model, self.sampling_weights, (), inputs, tie_weights=False, strict=False)
        return decoder_step(model, self.encoder_outputs, self.attention_mask, token, self.cache)


def fused_adamw(device: torch.device) -> bool:
    """Whether AdamW can run fused (one kernel over all parameters, same math): on CUDA and, since torch 2.4, CPU."""
    torch_version = tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2])
    return device.type == "cuda" or (device.type == "cpu" and torch_version >= (2, 4))


def generation_settings(model, tokenizer, config: Config, sample: bool):
    """A GenerationConfig for greedy evaluation, or for sampling G summaries with plain temperature/top-p (what
    the benchmark's 'before' path and the tests run through generate(); rollouts use sample_completions).

    Built from scratch (and used through generate(), which sets the checkpoint's own generation_config aside)
    so that a checkpoint's defaults (beams, no_repeat_ngram_size, min_length, forced EOS, top_k) cannot change
    the distribution we sample from. What is scored is softmax(logits / temperature), untruncated: with top_p < 1
    the samples come from the renormalised top-p distribution, while pi_theta, pi_old and pi_ref score them on the
    full one (as TRL does).
    """
    from transformers import GenerationConfig

    forced_bos = forced_bos_token_id(model)
    settings = dict(max_new_tokens=config.max_new_tokens, num_beams=1, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=decoder_start_token_id(model),
                    forced_bos_token_id=forced_bos)
    if sample:
        settings.update(do_sample=True, num_return_sequences=config.group_size, temperature=config.temperature,
                        top_p=config.top_p, top_k=0)
    else:
        settings.update(do_sample=False)
    return GenerationConfig(**settings)


@torch.no_grad()
def generate(model, encoded: dict, settings) -> torch.Tensor:
    """model.generate with exactly `settings`.

    transformers fills every field left at its default from model.generation_config, so a checkpoint's
    min_length, no_repeat_ngram_size or forced_eos_token_id would silently change what we sample (and then
    score as if sampled). The model's own generation_config is set aside for the call.
    """
    model = model.get_base_model() if is_lora(model) else model  # the adapters live inside the base model
    saved, model.generation_config = model.generation_config, settings
    try:
        return model.generate(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                              generation_config=settings)
    finally:
        model.generation_config = saved


def evaluation_settings(model, tokenizer, config: Config):
    """Decoding for evaluation: greedy (the rollout's settings without sampling), or with --eval_decoding=checkpoint
    the model's own generation_config (num_beams, length_penalty, no_repeat_ngram_size, min/max_length,
    early_stopping, forced tokens), as papers report it, e.g. facebook/bart-large-cnn's 4 beams; max_new_tokens where
    it sets no length."""
    if config.eval_decoding == "greedy":
        return generation_settings(model, tokenizer, config, sample=False)
    import copy

    settings = copy.deepcopy(model.generation_config)
    if settings.max_length is None and settings.max_new_tokens is None:  # else generate() stops at 20 tokens
        settings.max_new_tokens = config.max_new_tokens
    if settings.pad_token_id is None:
        settings.pad_token_id = tokenizer.pad_token_id
    if settings.eos_token_id is None:
        settings.eos_token_id = tokenizer.eos_token_id
    return settings


# --------------------------------------------------------------------------------------------------
# The run's bookkeeping: process start, logging a step, evaluations, checkpoints, the end
# --------------------------------------------------------------------------------------------------
def join_processes(config: Config) -> tuple["Distributed", typing.Callable[[str], None]]:
    """Quiet transformers' own logging, join torchrun's process group (if any), and a log that writes on rank 0."""
    import transformers
    from tqdm import tqdm

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    dist = setup_distributed(config)

    def log(message: str) -> None:
        if dist.is_main:
            tqdm.write(message, file=sys.stderr)

    return dist, log


def start_process(config: Config, given: set[str]) -> tuple[Config, "Distributed", typing.Callable[[str], None]]:
    """Join torchrun's process group (if any), check and prepare output_dir, choose CPU threads, write the demo's
    data and model (--demo/--benchmark). Returns the config (pointed at the demo's files), processes and log."""
    dist, log = join_processes(config)
    check_output_dir(config)
    if dist.is_main:
        prepare_output_dir(config, log)
        ensure_punkt()
    dist.barrier()
    if dist.device.type == "cpu":
        threads = cpu_thread_count(os.environ, available_cpu_cores())
        if threads is not None:
            torch.set_num_threads(threads)
        log(f"cpu: {torch.get_num_threads()} threads per process (set OMP_NUM_THREADS to choose; runs are bit-exact "
            "only with the same thread count)")
    unused = sorted(f"--{name}" for name in given & SFT_ONLY_FIELDS) if config.sft_steps == 0 else []
    if unused:
        log(f"note: {', '.join(unused)}: no effect, since --sft_steps=0 leaves the SFT warm-up out")
    if config.demo or config.benchmark:
        config = checked_against_model(prepare_demo(config, dist, log, given), given)  # the demo's model exists now
    return config, dist, log


@dataclass
class Run:
    """What a GRPO run holds, built by build_run (the loop above, the benchmark and the tests use it)."""

    config: Config
    dist: "Distributed"
    log: typing.Callable[[str], None]
    train_rows: "datasets.Dataset"
    held_out: "datasets.Dataset"  # eval_samples rows (none with --eval_samples=0)
    policy: torch.nn.Module  # pi_theta (a peft model with LoRA)
    tokenizer: typing.Any
    policy_forward: torch.nn.Module  # GroupedSeq2Seq(policy), compiled and/or DDP-wrapped as asked
    reference_forward: torch.nn.Module  # pi_ref: a frozen copy, or the policy with its adapters off (LoRA)
    optimizer: torch.optim.Optimizer
    scheduler: typing.Any
    state: TrainerState
    trackers: "Trackers"
    fact_names: frozenset[str] = frozenset()  # --invented_fact_penalty: the training texts' names (name_lexicon)


def checkpoint_to_resume(config: Config, dist: "Distributed", log) -> str | None:
    """With --resume: the newest checkpoint, after checking that the new flags would not change the run (before any
    data or model loads). None for a fresh run."""
    if not config.resume:
        return None
    checkpoints = checkpoint_files(config.output_dir)
    if not checkpoints:
        raise UserError(f"--resume=True but {config.output_dir}/checkpoints has no checkpoint; start afresh without "
                        "--resume (add --overwrite_output_dir=True if the directory holds an earlier run)")
    check_resume_config(read_saved_config(checkpoints[-1], config.output_dir), config, log, dist.world_size)
    return checkpoints[-1]


def resume_run(run: Run, checkpoint: str) -> None:
    """Load the checkpoint into the run (weights, optimizer, schedule, counters, random state) and cut the logs back
    to its step, so a resumed run writes what the uninterrupted one would."""
    config, log = run.config, run.log
    run.state = load_checkpoint(checkpoint, run.policy, run.optimizer, run.scheduler, run.dist.rank, log)
    if run.state.step > config.max_steps:
        log(f"note: --max_steps={config.max_steps} is below the checkpoint's step {run.state.step}: no step to run")
    old_lr, new_lr = continue_lr_schedule(run.scheduler, run.optimizer)
    if old_lr != new_lr:
        log(f"--max_steps={config.max_steps}: the {config.lr_scheduler} schedule now runs over {config.max_steps} "
            f"steps; the next update uses lr {new_lr:.4g} (the schedule's value at step {run.state.step}), not {old_lr:.4g}")
    if run.dist.is_main:  # rank 0 alone writes the logs (two writers would race on the .tmp file)
        for name in RUN_LOGS:
            keep_lines_up_to(os.path.join(config.output_dir, name), run.state.step)
    log(f"resumed from {checkpoint} at step {run.state.step}")


def checked_rewards(rewards, predictions: list[str]) -> list[float]:
    """compute_rewards' output, checked against its contract: one finite float per prediction."""
    rewards = [float(r) for r in rewards]
    if len(rewards) != len(predictions) or not all(math.isfinite(r) for r in rewards):
        bad = next((r for r in rewards if not math.isfinite(r)), None)
        raise UserError(f"compute_rewards returned {len(rewards)} rewards for {len(predictions)} summaries"
                        + (f", including {bad}" if bad is not None else "")
                        + "; it must return one finite float per summary")
    return rewards


COMPLETION_ARTICLES = 2  # articles per logged step whose G samples go to completions.jsonl
EQUAL_REWARD_STEPS = 5  # warn after this many steps in a row in which every group had equal rewards


def log_step(run: Run, step: int, indices: list[int], rows: dict, numbers: dict) -> dict:
    """Count NaN/inf steps (stop after max_nonfinite_steps in a row), average the processes' numbers, and append
    them to metrics.jsonl (and the trackers); every log_completions_every steps, the samples to completions.jsonl."""
    config, dist, state, log = run.config, run.dist, run.state, run.log
    samples, G = numbers.pop("samples"), config.group_size  # (summary, reward, advantage) of each sample
    if dist.is_main and config.log_completions_every and step % config.log_completions_every == 0:
        for article in range(min(COMPLETION_ARTICLES, len(indices))):
            append_jsonl(os.path.join(config.output_dir, "completions.jsonl"), {
                "step": step, "article_index": indices[article], "article": rows[config.text_column][article],
                "reference": rows[config.summary_column][article],
                "samples": [{"summary": summary, "reward": reward, "advantage": advantage}
                            for summary, reward, advantage in samples[article * G:(article + 1) * G]]})
    skipped = dist.any(numbers["nonfinite_updates"] == config.num_iterations)
    state.step = step
    state.nonfinite_in_a_row = state.nonfinite_in_a_row + 1 if skipped else 0
    state.nonfinite_total += skipped
    if skipped:
        log(f"warning: step {step} had a NaN/inf loss or gradient and was skipped ({state.nonfinite_in_a_row} in a row)")
    numbers["articles"] = float(len(rows[config.text_column]))
    metrics = {"step": step, **dist.mean(numbers), "lr": run.scheduler.get_last_lr()[0]}
    for count in ("articles", "articles_truncated"):  # counts: all processes together, not their mean
        metrics[count] = round(metrics[count] * dist.world_size)
    state.articles_truncated += metrics["articles_truncated"]
    state.equal_rewards_in_a_row = state.equal_rewards_in_a_row + 1 if metrics["zero_std_groups"] == 1 else 0
    if state.equal_rewards_in_a_row == EQUAL_REWARD_STEPS:  # once per such stretch
        log(f"warning: for {EQUAL_REWARD_STEPS} steps in a row every article's {config.group_size} summaries got "
            f"equal rewards (last mean {metrics['reward_mean']:.3f}), so GRPO has no learning signal; look at "
            "--log_completions_every=1, the reward, --temperature or --rouge_tokenizer")
    metrics.update(nonfinite_steps=state.nonfinite_total, articles_truncated=state.articles_truncated)
    if dist.is_main:
        append_jsonl(os.path.join(config.output_dir, "metrics.jsonl"), metrics)
        run.trackers.log("train", metrics)
    if state.nonfinite_in_a_row >= config.max_nonfinite_steps:
        raise UserError(f"stopping: {state.nonfinite_in_a_row} steps in a row had a NaN/inf loss; "
                        "try a lower --learning_rate or --max_grad_norm")
    finished_step(run)
    return metrics


def evaluate_and_log(run: Run, step: int) -> None:
    """record_evaluation (eval.jsonl, best/), and the same numbers to the trackers. A signal during it saves the step
    with its evaluation pending (state.evaluation_pending), which the resumed run does again."""
    run.state.evaluation_pending = True
    metrics = record_evaluation(run.config, run.dist, step, run.policy, run.tokenizer, run.held_out, run.state, run.log)
    run.state.evaluation_pending = False
    run.trackers.log("eval", {"step": step, **metrics})
    finished_step(run)


def save_run_checkpoint(run: Run, rng: dict | None = None) -> str:
    """checkpoints/step_N.pt with every process's random state (now, or `rng`: the state a finished step left), rank 0
    writes it. Returns what it saved, for the log ("step N")."""
    save_gathered_checkpoint(run.config, run.dist, run.policy, run.optimizer, run.scheduler, run.state,
                             rng_state() if rng is None else rng)
    return f"step {run.state.step}"


def save_gathered_checkpoint(config: Config, dist: "Distributed", policy, optimizer, scheduler, state: TrainerState,
                             rng: dict) -> None:
    """save_checkpoint with every process's random state `rng` gathered (every process calls it; rank 0 writes)."""
    rng_states = dist.gather_in_order([(dist.rank, rng)])
    if dist.is_main:
        save_checkpoint(config.output_dir, policy, optimizer, scheduler, state, rng_states, config.keep_checkpoints,
                        config, dist.world_size)


def finished_step(run: Run) -> None:
    """GRPO step run.state.step (and its evaluation, if any) is finished: until the next one is, a signal saves it,
    with the random state of this moment (the one the next step starts from)."""
    mark_finished(lambda rng: save_run_checkpoint(run, rng))


def stopped_early(run: Run | None, stop: "StopRequest", stopped: "Stopped | None" = None) -> int:
    """After Ctrl-C or SIGTERM (the checkpoint is saved): say how to resume, with a command to paste as is; the exit
    code is 128 + the signal. stopped: raised at a boundary inside SFT, a step or an evaluation (else the end of a
    step), it names the step saved."""
    what = str(stopped) if stopped is not None else f"step {run.state.step}"
    if run is not None:
        log_truncated_articles(run.state, run.config, run.dist, run.log)
    stop.log(f"stopped at {what}; checkpoint saved. Continue with: {continue_command()}")
    return 128 + stop.dist.max(stop.signal_number)


def continue_command(argv: list[str] | None = None, environ: typing.Mapping[str, str] = os.environ) -> str:
    """The command that resumes this run, to paste into a POSIX shell as is: the launcher used (torchrun with its
    process count, else python), the script path as given, every flag but --resume quoted, then --resume=True."""
    argv = sys.argv if argv is None else argv
    flags = [a for a in argv[1:] if a != "--resume" and not a.startswith("--resume=")] + ["--resume=True"]
    world, local = int(environ.get("WORLD_SIZE", "1")), int(environ.get("LOCAL_WORLD_SIZE", "1"))
    if world == 1:
        return shlex.join(["python", argv[0], *flags])
    nodes = ["--standalone"] if world == local else [f"--nnodes={world // local}"]  # many nodes: add the rendezvous
    return shlex.join(["torchrun", *nodes, f"--nproc_per_node={local}", argv[0], *flags]) + (
        "" if world == local else "  (on every node, with your rendezvous flags)")


def finish_run(run: Run) -> None:
    """Check that DDP kept the processes' weights identical; write final/ and curves.png; the demo's report."""
    config, dist, log = run.config, run.dist, run.log
    log_truncated_articles(run.state, config, dist, log)
    if dist.world_size > 1:  # DDP keeps the copies identical; say so, or fail loudly if they drifted apart
        checksums = dist.gather_in_order([(dist.rank, sum(p.double().sum().item() for p in run.policy.parameters()))])
        if len(set(checksums)) > 1:
            raise UserError(f"the {dist.world_size} processes ended with different weights: checksums {checksums}")
        log(f"weights identical on all {dist.world_size} processes (checksum {checksums[0]!r})")
    if dist.is_main:
        save_pretrained_atomic(run.policy, run.tokenizer, os.path.join(config.output_dir, "final"))
        plot_curves(config.output_dir)
        metrics_file = os.path.join(config.output_dir, "metrics.jsonl")  # none with --max_steps=0
        log(f"done: model in {config.output_dir}/final"
            + (f", metrics in {metrics_file}" if os.path.exists(metrics_file) else ""))
    if config.demo:  # the control: the same start, trained max_steps more SFT steps instead of GRPO
        control, control_per_article, control_curve = demo_control(config, run.train_rows, run.held_out,
                                                                   dist.device, dist, log)
        demo_fact_penalty(config, log)  # and the same GRPO steps with --invented_fact_penalty on
        if dist.is_main:
            report_demo(config, control, control_per_article, control_curve)
    log(files_to_open(config))


# --------------------------------------------------------------------------------------------------
# Flags: parsing and validation
# --------------------------------------------------------------------------------------------------
SFT_ONLY_FIELDS = frozenset({"sft_learning_rate", "sft_lr_scheduler", "sft_batch_size", "sft_eval_every"})
TRACKERS = {"wandb": "wandb", "tensorboard": "tensorboard"}  # --report_to name -> package it needs
EVAL_SPLITS = ("validation", "test")  # --eval_split values
EVAL_DECODINGS = ("greedy", "checkpoint")  # --eval_decoding values
ROUGE_TOKENIZERS = ("default", "unicode")  # --rouge_tokenizer values


class UserError(Exception):
    """A problem the user can fix (bad data, unreachable hub, ...): one line on stderr, exit code 1."""

    exit_code = 1


class ConfigError(UserError):
    """A bad command-line flag or value: one line on stderr, exit code 2."""

    exit_code = 2


def parse_value(name: str, text: str, annotation) -> object:
    """Convert the text of --name=text to the field's type (bool, int, float, str, or X | None)."""
    kinds = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if type(None) in kinds and text.lower() == "none":
        return None
    kind = next(k for k in kinds if k is not type(None))
    if kind is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
    else:
        try:
            return kind(text)
        except ValueError:
            pass
    raise ConfigError(f"--{name} expects {kind.__name__}, got {text!r}")


def config_groups() -> list[tuple[str, list[tuple[str, str, str]]]]:
    """Config's fields as written in its source: [(group heading, [(name, default, comment), ...]), ...]."""
    import inspect

    groups: list[tuple[str, list]] = [("", [])]
    for line in inspect.getsource(Config).splitlines():
        if heading := re.fullmatch(r"    # (.+)", line):
            groups.append((heading[1], []))
        elif field := re.fullmatch(r"    (\w+): [^=]+ = (.+?)  # (.*)", line):
            groups[-1][1].append(field.groups())
    return [(heading, fields) for heading, fields in groups if fields]


def help_text() -> str:
    """What --help prints: every flag, grouped as in Config, with its default and its comment."""
    lines = [f"usage: python {os.path.basename(__file__)} [--name=value | --name value ...]   (a bare --name sets a bool "
             "to True)",
             "Every field of Config is a flag; edit its default at the top of the script to change it for good."]
    for heading, fields in config_groups():
        lines.append(f"\n{heading}:")
        lines += [f"  --{name}={default}".ljust(44) + f" {comment}" for name, default, comment in fields]
    lines.append(f"\n--demo sets: {', '.join(f'{k}={v}' for k, v in DEMO_CONFIG.items())}")
    lines.append(f"--benchmark sets the demo's values and: {', '.join(f'{k}={v}' for k, v in BENCHMARK_CONFIG.items())}")
    lines.append("Flags given explicitly win over those.")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> tuple[Config, set[str]]:
    """Parse --name=value or --name value flags (a bare --name sets a bool to True). Returns the config and the names
    given."""
    hints = typing.get_type_hints(Config)
    values: dict[str, object] = {}
    argv = spaced_values_joined(argv, hints)
    for arg in argv:
        name, has_value, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or name not in hints:
            import difflib

            close = difflib.get_close_matches(name.replace("-", "_"), list(hints), n=1)
            raise ConfigError(f"unknown option {arg!r}" + (f" (did you mean --{close[0]}?)" if close else "")
                              + "; options are --name=value, listed with their meaning by --help")
        if not has_value and hints[name] is not bool:
            raise ConfigError(f"--{name} needs a value: --{name}=... or --{name} ...")
        values[name] = parse_value(name, text, hints[name]) if has_value else True
    config = Config(**values)
    if config.demo or config.benchmark:  # demo defaults, except where the user said otherwise
        defaults = {**DEMO_CONFIG, **(BENCHMARK_CONFIG if config.benchmark else {})}
        config = dataclasses.replace(config, **{k: v for k, v in defaults.items() if k not in values})
    return config, set(values)


BOOL_WORDS = ("1", "true", "yes", "0", "false", "no")  # what parse_value reads as a bool


def spaced_values_joined(argv: list[str], hints: dict) -> list[str]:
    """--name value (argparse's form) as --name=value: a flag's next argument is its value unless it starts with --;
    a bool flag takes it only if it is a bool word (true, false, ...)."""
    joined, position = [], 0
    while position < len(argv):
        arg, position = argv[position], position + 1
        name = arg.removeprefix("--")
        if (arg.startswith("--") and "=" not in arg and name in hints and position < len(argv)
                and not argv[position].startswith("--")
                and (hints[name] is not bool or argv[position].lower() in BOOL_WORDS)):
            arg, position = f"{arg}={argv[position]}", position + 1
        joined.append(arg)
    return joined


HUB_PROBE_SECONDS = 3  # how long the start waits to learn whether the Hugging Face hub can be reached


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the hub (HF_ENDPOINT, default huggingface.co) opens within timeout seconds."""
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def go_offline_if_hub_unreachable(config: Config) -> None:
    """When the run needs the hub (a hub model or dataset) and it cannot be reached, switch the libraries to their
    offline mode with a note, so that cached files load and missing ones fail at once instead of after retries."""
    needs_hub = not os.path.isdir(os.path.expanduser(config.model_name)) or not (
        config.train_file or config.validation_file or config.test_file or config.demo or config.benchmark)
    proxy = any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if not needs_hub or hub_offline() or proxy or config.demo or config.benchmark or hub_reachable():
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    for module, attribute in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE")):
        if module in sys.modules:  # already imported: they read the variable at import
            setattr(sys.modules[module], attribute, True)
    note(f"note: the Hugging Face hub ({os.environ.get('HF_ENDPOINT') or 'huggingface.co'}) is unreachable, so only "
         "cached models and datasets are used (HF_HUB_OFFLINE=1)")


def validate_config(config: Config, given: set[str] = frozenset()) -> None:
    """Reject values the math or the loop cannot use, or a given flag that would do nothing, with one line naming
    the flag."""
    schedules = scheduler_names()
    checks = [
        (config.group_size >= 2, "--group_size must be >= 2: advantages compare the G samples of an article"),
        (config.batch_size >= 1, "--batch_size must be >= 1"),
        (config.micro_batch_size >= 1 and config.micro_batch_size % config.group_size == 0,
         f"--micro_batch_size={config.micro_batch_size} must be a positive multiple of --group_size="
         f"{config.group_size} (micro-batches hold whole groups); use e.g. --micro_batch_size="
         f"{max(1, config.micro_batch_size // max(config.group_size, 1)) * max(config.group_size, 1)}"),
        (config.beta >= 0, "--beta must be >= 0"),
        (config.learning_rate > 0 and config.sft_learning_rate > 0, "--learning_rate and --sft_learning_rate must be > 0"),
        (config.weight_decay >= 0 and config.warmup_steps >= 0, "--weight_decay and --warmup_steps must be >= 0"),
        (config.max_grad_norm > 0, "--max_grad_norm must be > 0"),
        (config.epsilon > 0, "--epsilon must be > 0"),
        (config.epsilon_high is None or config.epsilon_high > 0, "--epsilon_high must be > 0"),
        (0 < config.top_p <= 1, "--top_p must be in (0, 1]"),
        (config.temperature > 0, "--temperature must be > 0"),
        (config.num_iterations >= 1, "--num_iterations must be >= 1"),
        (config.loss_type in LOSS_TYPES, f"--loss_type must be one of {', '.join(LOSS_TYPES)}"),
        (config.scale_rewards in SCALE_REWARDS,
         f"--scale_rewards must be one of {', '.join(SCALE_REWARDS)} (the old True is group, False is none)"),
        (config.lora_r >= 0 and config.lora_alpha > 0, "--lora_r must be >= 0 (0: no LoRA) and --lora_alpha > 0"),
        (config.lora_dropout == 0, "--lora_dropout must be 0: GRPO runs the policy with dropout off (so that the "
                                   "ratio is 1 at mu = 1), which switches adapter dropout off too"),
        (config.lora_target_modules.strip(",") != "", "--lora_target_modules must be all-linear or module names, e.g. q,v"),
        (config.log_completions_every >= 0, "--log_completions_every must be >= 0 (0: off)"),
        (all(name in TRACKERS for name in report_to_names(config)),
         f"--report_to must be none or a comma-separated list of {', '.join(TRACKERS)}"),
        (config.max_new_tokens >= 1 and config.max_source_length >= 1, "--max_new_tokens and --max_source_length must be >= 1"),
        (config.max_steps >= 0 and config.sft_steps >= 0, "--max_steps and --sft_steps must be >= 0"),
        (min(config.eval_every, config.save_every, config.eval_batch_size, config.sft_batch_size) >= 1,
         "--eval_every, --save_every, --eval_batch_size and --sft_batch_size must be >= 1"),
        (config.eval_samples >= 0, "--eval_samples must be >= 0 (0 turns held-out evaluation off)"),
        (config.sft_eval_every >= 0, "--sft_eval_every must be >= 0 (0: off)"),
        (config.eval_split in EVAL_SPLITS, f"--eval_split must be one of {', '.join(EVAL_SPLITS)}"),
        (config.eval_decoding in EVAL_DECODINGS, f"--eval_decoding must be one of {', '.join(EVAL_DECODINGS)}"),
        (config.rouge_tokenizer in ROUGE_TOKENIZERS, f"--rouge_tokenizer must be one of {', '.join(ROUGE_TOKENIZERS)}"),
        (config.eval_only or config.eval_split == "validation",
         "--eval_split=test needs --eval_only=True: training picks best/ on validation; score test after training"),
        ((config.eval_only and config.eval_split == "test") or not config.test_file,
         "--test_file is read only with --eval_only=True --eval_split=test"),
        (not (config.eval_only and config.eval_split == "test" and config.validation_file),
         "--eval_only=True --eval_split=test scores --test_file (or the hub test split), not --validation_file"),
        (not config.eval_only or not config.train_file or bool(config.validation_file or config.test_file),
         "--eval_only=True does not score --train_file (training held out some of its rows): pass the articles to "
         "score as --validation_file (or --test_file with --eval_split=test)"),
        (not config.eval_only or config.eval_samples >= 1,
         "--eval_only=True needs --eval_samples >= 1, or leave it out to score every article of the split"),
        (not config.eval_only or not (config.demo or config.benchmark or config.resume),
         "--eval_only=True cannot be combined with --demo, --benchmark or --resume"),
        (not config.demo or config.eval_samples >= 1, "--demo needs --eval_samples >= 1: it reports held-out ROUGE"),
        (config.keep_checkpoints >= 1, "--keep_checkpoints must be >= 1"),
        (config.demo_seeds >= 1, "--demo_seeds must be >= 1"),
        (config.demo_seeds == 1 or config.demo, "--demo_seeds applies to the demo only: add --demo, or leave it out"),
        (config.demo_seeds == 1 or not config.benchmark, "--demo_seeds cannot be combined with --benchmark"),
        (not config.demo or (config.sft_steps >= 1 and config.max_steps >= 1 and config.num_examples >= 1),
         "--demo needs --sft_steps, --max_steps and --num_examples >= 1: it compares SFT, more SFT and GRPO"),
        (not config.demo or int(os.environ.get("WORLD_SIZE", "1")) == 1,
         "--demo runs in one process: start it with python, not torchrun"),
        (config.sft_eval_every == 0 or (config.sft_steps >= 1 and config.eval_samples >= 1),
         "--sft_eval_every scores held-out articles during SFT: it needs --sft_steps >= 1 and --eval_samples >= 1"),
        (config.sft_eval_every == 0 or "sft_eval_every" not in given or config.sft_eval_every < config.sft_steps,
         f"--sft_eval_every={config.sft_eval_every} scores nothing before the last of --sft_steps={config.sft_steps} "
         "SFT steps (the last is scored as GRPO step 0): use a smaller value"),
        (config.best_metric in ROUGE_KEYS, f"--best_metric must be one of {', '.join(ROUGE_KEYS)}"),
        (min(config.rouge1_weight, config.rouge2_weight, config.rougeL_weight, config.rougeLsum_weight) >= 0
         and config.rouge1_weight + config.rouge2_weight + config.rougeL_weight + config.rougeLsum_weight > 0,
         "the rouge*_weight flags must be >= 0 and not all 0"),
        (math.isfinite(config.invented_fact_penalty) and config.invented_fact_penalty >= 0,
         "--invented_fact_penalty must be a finite number >= 0 (0: off)"),
        (not (config.demo and config.invented_fact_penalty), "--invented_fact_penalty and --demo: the demo's grpo row "
         "is plain GRPO, and its grpo_fact_penalty row sets lambda itself (DEMO_FACT_PENALTY); drop the flag"),
        (re.fullmatch(r"auto|cpu|cuda(:\d+)?", config.device) is not None, "--device must be auto, cpu, cuda or cuda:N"),
        (config.lr_scheduler in schedules,
         f"--lr_scheduler={config.lr_scheduler} is not a schedule this script can use; one of: {', '.join(schedules)}"),
        (config.sft_lr_scheduler in schedules,
         f"--sft_lr_scheduler={config.sft_lr_scheduler} is not a schedule this script can use; one of: "
         f"{', '.join(schedules)}"),
        (config.text_column != config.summary_column,
         f"--text_column and --summary_column are both {config.text_column!r}; the article and its reference "
         "summary must be two different columns"),
        (config.gpu_memory_gb > 0, "--gpu_memory_gb must be > 0"),
        (not config.estimate_memory or config.lora_r == 0,
         "--estimate_memory plans full fine-tuning only (peft cannot add adapters to fake tensors): leave --lora_r "
         "out for an upper bound"),
        ("gpu_memory_gb" not in given or config.estimate_memory,
         "--gpu_memory_gb applies to --estimate_memory only: add it, or leave it out"),
        (not config.estimate_memory or not (config.eval_only or config.demo or config.benchmark or config.resume),
         "--estimate_memory cannot be combined with --eval_only, --demo, --benchmark or --resume"),
        (not config.compile_sampler or config.estimate_memory or (torch.cuda.is_available() and config.device != "cpu"),
         "--compile_sampler captures CUDA graphs and needs a CUDA device; drop it on this machine"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    model_path = os.path.expanduser(config.model_name)
    if looks_like_local_path(config.model_name) and not os.path.isdir(model_path):
        raise UserError(f"--model_name={config.model_name}: the directory {model_path} does not exist (a local path; "
                        "for a hub model pass its id, e.g. facebook/bart-base)")
    import importlib.util

    needed = [(TRACKERS[name], f"--report_to={name}") for name in report_to_names(config)]
    needed += [("peft", "--lora_r > 0")] if config.lora_r > 0 else []
    for package, flag in needed:  # optional packages: checked here, imported only where used
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"{flag} needs the {package} package, which is not installed: pip install {package}")


def report_to_names(config: Config) -> list[str]:
    """The trackers named by --report_to (none -> [])."""
    names = [name.strip() for name in config.report_to.split(",") if name.strip()]
    return [] if names == ["none"] else names


def looks_like_local_path(name: str) -> bool:
    """Whether --model_name is meant as a directory: starts with / . or ~, or has more parts than a hub id (org/name)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


@lru_cache(maxsize=1)
def scheduler_names() -> tuple[str, ...]:
    """transformers' scheduler names that work as get_scheduler(name, optimizer, warmup, total) and step per update."""
    from transformers import SchedulerType, get_scheduler

    names = []
    for name in (kind.value for kind in SchedulerType):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        try:
            scheduler = get_scheduler(name, optimizer, num_warmup_steps=1, num_training_steps=10)
        except Exception:  # needs extra arguments (cosine_with_min_lr, ...)
            continue
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):  # not reduce_lr_on_plateau, which needs a metric
            names.append(name)
    return tuple(names)


# --------------------------------------------------------------------------------------------------
# Start-of-run checks: what the model can take, and what the data and flags would do, said before any work
# --------------------------------------------------------------------------------------------------
def note(message: str) -> None:
    """A line on stderr from the first process only (for checks made before join_processes gives a log)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)


def position_limits(model_config) -> tuple[int | None, int | None]:
    """(encoder, decoder) positions the model can embed; None where it has no limit (T5's relative positions)."""
    shared = getattr(model_config, "max_position_embeddings", None)
    encoder = getattr(model_config, "max_encoder_position_embeddings", None) or shared  # LED: one per side
    decoder = getattr(model_config, "max_decoder_position_embeddings", None) or shared
    return encoder, decoder


def fit_lengths(config: Config, model_config, given: set[str] | None = None, log=note) -> Config:
    """--max_source_length and --max_new_tokens checked against the model's encoder and decoder positions: a given
    flag beyond them is refused with one line, a default one is lowered to the limit with a note (given=None: every
    flag counts as given)."""
    encoder, decoder = position_limits(model_config)
    over = [(flag, getattr(config, flag), limit, side) for flag, limit, side in (
        ("max_source_length", encoder, "encoder"), ("max_new_tokens", decoder, "decoder"))
        if limit is not None and getattr(config, flag) > limit]
    for flag, value, limit, side in over:  # every refusal before any note
        if given is None or flag in given:
            raise ConfigError(f"--{flag}={value} exceeds the {limit} positions of the {model_config.model_type} "
                              f"model's {side} (its config's max_position_embeddings): use --{flag}={limit} or less")
    changes = {flag: limit for flag, _, limit, _ in over}
    for flag, value, limit, side in over:
        log(f"note: --{flag} lowered from its default {value} to {limit}, the positions of the model's {side}")
    return dataclasses.replace(config, **changes) if changes else config


ROUGE_CHECK_REFERENCES = 200  # references per split checked at the start for words ROUGE can score


def check_rouge_words(config: Config, *splits) -> None:
    """Stop at the start when most references have no word ROUGE can score (non-Latin text under rouge_score's
    tokenizer): every reward and score would be 0."""
    references = [text for split in splits for text in split.select(range(min(ROUGE_CHECK_REFERENCES, len(split))))[
        config.summary_column]]
    empty = [text for text in references if not rouge_tokens(text, config.rouge_tokenizer)]
    if references and len(empty) * 2 > len(references):
        fix = ("pass --rouge_tokenizer=unicode (words of any script)" if config.rouge_tokenizer == "default"
               else f"check --summary_column={config.summary_column}")
        raise UserError(f"{len(empty)} of {len(references)} reference summaries have no word ROUGE can score with "
                        f"--rouge_tokenizer={config.rouge_tokenizer} (e.g. {empty[0][:40]!r}), so every reward "
                        f"would be 0; {fix}")


LENGTH_CHECK_ROWS = 20_000  # rows per split tokenized at the start to count truncation (evenly spaced beyond)


def token_lengths(tokenizer, texts: list[str], target: bool = False) -> list[int]:
    """Token counts of texts (special tokens included; target: as summaries are tokenized for SFT), in batches."""
    lengths = []
    for start in range(0, len(texts), 1000):
        batch = texts[start:start + 1000]
        lengths += map(len, (tokenizer(text_target=batch) if target else tokenizer(batch))["input_ids"])
    return lengths


def log_lengths(config: Config, tokenizer, log, splits: dict) -> None:
    """One line before any training or evaluation: how many articles of each split max_source_length cuts and by
    how much, and how many reference summaries are longer than max_new_tokens (a tokenizer pass over the data)."""
    parts, long_summaries, summaries = [], 0, 0
    for name, split in splits.items():
        if len(split) == 0:
            continue
        rows = split.select(range(0, len(split), math.ceil(len(split) / LENGTH_CHECK_ROWS)))
        articles = [config.source_prefix + text for text in rows[config.text_column]]
        cut = [n - config.max_source_length for n in token_lengths(tokenizer, articles) if n > config.max_source_length]
        sample = f" (every {math.ceil(len(split) / LENGTH_CHECK_ROWS)}th)" if len(rows) < len(split) else ""
        parts.append(f"{len(cut)} of {len(rows)} {name} articles{sample}"
                     + (f" by {np.mean(cut):.0f} tokens on average (at most {max(cut)})" if cut else ""))
        lengths = token_lengths(tokenizer, rows[config.summary_column], target=True)
        long_summaries += sum(n > config.max_new_tokens for n in lengths)
        summaries += len(lengths)
    if parts:
        log(f"lengths: --max_source_length={config.max_source_length} cuts {'; '.join(parts)}; {long_summaries} of "
            f"{summaries} reference summaries are longer than --max_new_tokens={config.max_new_tokens} tokens")


@torch.no_grad()
def check_data_and_model(config: Config, dist: "Distributed", log, train_rows, held_out, policy, tokenizer,
                         names: frozenset[str]) -> None:
    """The checks a run makes once data and model have loaded, before anything is written: references ROUGE can
    read, the lengths of articles and summaries, a reward that keeps its contract, a model that can sample."""
    check_rouge_words(config, train_rows, held_out)
    check_reward(config, train_rows, names)
    if dist.is_main:
        log_lengths(config, tokenizer, log, {"training": train_rows, "held-out": held_out})
    encoded, sequences = check_model_runs(policy, tokenizer, dist.device)
    if dist.world_size > 1 and config.lora_r == 0:  # DDP stops on a trained parameter that never gets a gradient
        freeze_unused_parameters(policy, encoded, sequences, log)


def check_reward(config: Config, train_rows, names: frozenset[str]) -> None:
    """compute_rewards on a rollout-shaped batch of two training articles (G summaries each: its reference, then
    empty ones), checked against its contract with the random state kept, so that a custom reward that breaks it
    fails at the start rather than after SFT."""
    rows, G = train_rows.select(range(min(2, len(train_rows)))), config.group_size
    references = [text for text in rows[config.summary_column] for _ in range(G)]
    articles = [text for text in rows[config.text_column] for _ in range(G)]
    predictions = [text if i % G == 0 else "" for i, text in enumerate(references)]
    try:
        inspect.signature(compute_rewards).bind(predictions, references, articles, config, names)
    except TypeError as error:
        raise UserError(f"compute_rewards must take (predictions, references, articles, config, names): {error}")
    state = rng_state()  # a reward that draws random numbers leaves the run's draws as they were
    rewards = compute_rewards(predictions, references, articles, config, names)
    set_rng_state(state)
    checked_rewards(rewards, predictions)


def check_model_runs(policy, tokenizer, device) -> tuple[dict, torch.Tensor]:
    """Two tiny samples and their scoring pass at the start (random state kept), so that an architecture which loads
    but cannot run this script's sampler (SwitchTransformers' routers) fails in one line, not mid-run. Returns the
    check's article and samples, the same on every process (seeded), for freeze_unused_parameters."""
    encoded = tokenizer(["a short check"], return_tensors="pt").to(device)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), eval_mode(policy), \
                torch.no_grad():
            torch.manual_seed(0)
            sequences, _ = sample_completions(policy, encoded["input_ids"], encoded["attention_mask"], 2, 2,
                                              tokenizer.eos_token_id, tokenizer.pad_token_id, 1.0, 1.0,
                                              with_logprobs=False)
            GroupedSeq2Seq(policy)(encoded["input_ids"], encoded["attention_mask"], sequences[:, :-1], 2)
    except Exception as error:
        raise UserError(f"{policy.config.model_type} models load but cannot run this script's sampler and scoring "
                        f"pass ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); use "
                        "another encoder-decoder (BART, T5, Pegasus, ...)") from None
    return encoded, sequences


@torch.enable_grad()
def freeze_unused_parameters(policy, encoded: dict, sequences: torch.Tensor, log) -> None:
    """Freeze, and name, the parameters that the backward of check_model_runs' scoring pass (its article and
    samples, the same on every process, so all freeze the same ones) leaves without a gradient (BART's `shared`
    embedding when its embeddings are untied): DDP stops on a trained parameter that never gets one."""
    with eval_mode(policy):  # no dropout: no random draws
        logits = GroupedSeq2Seq(policy)(encoded["input_ids"], encoded["attention_mask"], sequences[:, :-1], 2)
        logits.float().sum().backward()
    unused = [name for name, weight in policy.named_parameters() if weight.requires_grad and weight.grad is None]
    for name, parameter in policy.named_parameters():
        parameter.grad = None
        parameter.requires_grad_(parameter.requires_grad and name not in unused)
    if unused:
        log(f"note: frozen {len(unused)} parameter{'s' if len(unused) > 1 else ''} the model's forward never uses: "
            + ", ".join(unused))


def early_model_config(config: Config):
    """The model's config (config.json only), to check flags against before any data or weights load; None when it
    cannot be read here (load_policy_and_tokenizer then says why)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(os.path.expanduser(config.model_name),
                                          trust_remote_code=config.trust_remote_code)
    except Exception:
        return None


def checked_against_model(config: Config, given: set[str]) -> Config:
    """The config with its lengths fitted to the model (fit_lengths), checked before anything is written."""
    model_config = early_model_config(config)
    return config if model_config is None else fit_lengths(config, model_config, given)


# --------------------------------------------------------------------------------------------------
# Data: the hub dataset or local files, rows with empty text skipped, a seeded order per epoch
# --------------------------------------------------------------------------------------------------
def utf8_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a file, with one clear error at the first line that is not UTF-8."""
    with open(path, "rb") as file:
        for line_number, raw in enumerate(file, start=1):
            try:
                yield line_number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise UserError(f"{path} line {line_number}, byte {error.start + 1} of that line: not UTF-8 text "
                                f"(byte 0x{raw[error.start]:02x}); re-save the file as UTF-8") from None


def check_jsonl(path: str, columns: tuple[str, str]) -> None:
    """Find, with its line number, the first line of a .jsonl file that is not a JSON object with string columns."""
    for line_number, line in utf8_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} line {line_number}: invalid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {line_number}: expected a JSON object, got {type(row).__name__}")
        for column in columns:
            if column in row and row[column] is not None and not isinstance(row[column], str):
                raise UserError(f"{path} line {line_number}: column {column!r} must be a string, "
                                f"got {type(row[column]).__name__}")


def check_json_layout(path: str) -> None:
    """Reject a .json file whose top level is one object of column lists, which datasets would read as a single row."""
    with open(path, encoding="utf-8") as file:
        if file.read(4096).lstrip()[:1] != "{":
            return
        file.seek(0)
        try:
            top = json.load(file)
        except json.JSONDecodeError:  # several objects, one per line: JSON Lines, which datasets reads
            return
    if isinstance(top, dict) and any(isinstance(value, list) for value in top.values()):
        raise UserError(f"{path}: the top level is an object of column lists ({', '.join(map(repr, list(top)[:4]))}); "
                        "use a JSON list of row objects [{\"article\": ..., \"highlights\": ...}, ...] or JSON Lines "
                        "(.jsonl, one row object per line)")


def load_local_file(path: str, columns: tuple[str, str]):
    """A local .jsonl/.json/.csv file as a datasets.Dataset, with clear errors for missing or empty files."""
    import datasets

    if not os.path.isfile(path):
        raise UserError(f"data file {path} does not exist")
    if os.path.getsize(path) == 0:
        raise UserError(f"data file {path} is empty")
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".jsonl", ".json", ".csv"):
        raise UserError(f"data file {path}: use .jsonl, .json or .csv")
    if extension == ".jsonl":
        check_jsonl(path, columns)
    else:
        for _ in utf8_lines(path):  # a clear line for a file that is not UTF-8, before the parser's traceback
            pass
    if extension == ".json":
        check_json_layout(path)
    try:
        return datasets.load_dataset("csv" if extension == ".csv" else "json", data_files=path, split="train")
    except Exception as error:  # datasets wraps parser errors in several types
        raise UserError(f"could not read {path}: {str(error).splitlines()[0]}") from None


def prepare_split(dataset, config: Config, name: str, log) -> "datasets.Dataset":
    """Keep the two text columns, check their type, and skip (and count) rows where either is empty."""
    columns = [config.text_column, config.summary_column]
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise UserError(f"{name} data has no column {missing[0]!r}; its columns are {dataset.column_names} "
                        f"(set --text_column / --summary_column)")
    for column in columns:
        dtype = getattr(dataset.features[column], "dtype", None)
        if dtype not in ("string", "large_string", "null"):
            raise UserError(f"{name} data: column {column!r} must hold strings, it holds {dtype}")
    dataset = dataset.select_columns(columns)
    total = len(dataset)
    dataset = dataset.filter(lambda batch: [bool(a and a.strip()) and bool(s and s.strip())
                                            for a, s in zip(batch[columns[0]], batch[columns[1]])], batched=True)
    if len(dataset) < total:
        log(f"{name}: skipped {total - len(dataset)} of {total} rows with an empty article or summary")
    if len(dataset) == 0:
        raise UserError(f"{name} data has no row with both a non-empty {columns[0]!r} and {columns[1]!r}")
    return dataset


def load_data(config: Config, log) -> tuple["datasets.Dataset", "datasets.Dataset"]:
    """Train and held-out splits: local files when train_file is set, else the hub dataset."""
    import datasets

    datasets.disable_progress_bars()
    columns = (config.text_column, config.summary_column)
    if config.train_file:
        train = prepare_split(load_local_file(config.train_file, columns), config, "train", log)
        if config.eval_samples == 0:  # no held-out evaluation
            if config.validation_file:
                log("--eval_samples=0: held-out evaluation is off, so --validation_file is not read")
            held_out = train.select(range(0))
        elif config.validation_file:
            held_out = prepare_split(load_local_file(config.validation_file, columns), config, "validation", log)
        else:
            if len(train) < 2:
                raise UserError("train data needs at least 2 rows to hold some out; or pass --validation_file")
            count = min(config.eval_samples, len(train) // 10 or 1)
            split = train.train_test_split(test_size=count, seed=config.seed)
            train, held_out = split["train"], split["test"]
            log(f"no --validation_file: holding out {count} training row{'s' if count != 1 else ''} for evaluation")
    else:
        try:
            hub = datasets.load_dataset(config.dataset_name, config.dataset_config)
        except Exception as error:
            raise UserError(f"could not load dataset {config.dataset_name!r} ({str(error).splitlines()[0]}); "
                            f"offline, pass --train_file/--validation_file, or set HF_ENDPOINT to a mirror") from None
        train = prepare_split(hub["train"], config, "train", log)
        held_out = prepare_split(hub["validation"], config, "validation", log) if config.eval_samples else hub["validation"]
    return train, held_out.select(range(min(config.eval_samples, len(held_out))))


def load_eval_split(config: Config, given: set[str], log) -> "datasets.Dataset":
    """The articles --eval_only=True scores: --validation_file or --test_file (by --eval_split), else that split
    of the hub dataset. All its rows, unless --eval_samples was given: then the first eval_samples of them.

    Rows with an empty article or summary are skipped first (and counted), as in training.
    """
    import datasets

    datasets.disable_progress_bars()
    local = config.validation_file if config.eval_split == "validation" else config.test_file
    if local:
        data = load_local_file(local, (config.text_column, config.summary_column))
    else:
        try:
            data = datasets.load_dataset(config.dataset_name, config.dataset_config, split=config.eval_split)
        except Exception as error:
            raise UserError(f"could not load the {config.eval_split} split of {config.dataset_name!r} "
                            f"({str(error).splitlines()[0]}); offline, pass --validation_file or --test_file, "
                            f"or set HF_ENDPOINT to a mirror") from None
    data = prepare_split(data, config, config.eval_split, log)
    return data.select(range(min(config.eval_samples, len(data)))) if "eval_samples" in given else data


@lru_cache(maxsize=2)
def epoch_permutation(num_rows: int, seed: int, epoch: int) -> list[int]:
    """The order of the rows in one epoch: a permutation seeded by (seed, epoch)."""
    return torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def batch_indices(step: int, batch_size: int, num_rows: int, seed: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Rows of one process at one step. A pure function of the step, so a resumed run sees the same data.

    The global batch of a step is world_size * batch_size consecutive positions of the epoch orders;
    process `rank` takes its own slice, so processes never share an article.
    """
    start = (step * world_size + rank) * batch_size
    positions = (divmod(position, num_rows) for position in range(start, start + batch_size))
    return [epoch_permutation(num_rows, seed, epoch)[offset] for epoch, offset in positions]


def tokenize_articles(tokenizer, articles: list[str], config: Config, device) -> tuple[dict, int]:
    """Tokenize a batch of articles, truncated to max_source_length; also returns how many were truncated."""
    texts = [config.source_prefix + article for article in articles]
    rows, limit = tokenizer(texts)["input_ids"], config.max_source_length  # tokenized once, not truncated
    special = set(tokenizer.all_special_ids)
    probe, suffix = tokenizer("a")["input_ids"], 0  # suffix: special tokens the tokenizer appends (</s>: 1)
    while suffix < len(probe) and probe[-1 - suffix] in special and probe[-1 - suffix] != tokenizer.unk_token_id:
        suffix += 1
    cut = [ids if len(ids) <= limit else ids[:limit - suffix] + ids[len(ids) - suffix:] for ids in rows]
    encoded = tokenizer.pad({"input_ids": cut}, padding=True, return_tensors="pt")  # = truncation=True's result
    return encoded.to(device), sum(len(ids) > limit for ids in rows)


# --------------------------------------------------------------------------------------------------
# Evaluation internals: bootstrap confidence intervals, summary quality measures, eval-only mode
# --------------------------------------------------------------------------------------------------
BOOTSTRAP_RESAMPLES = 1000  # resamples of the articles for every bootstrap confidence interval
CONFIDENCE_LEVEL = 0.95  # coverage of the bootstrap intervals (percentiles 2.5 and 97.5)


def bootstrap_ci(scores, seed: int, num_resamples: int = BOOTSTRAP_RESAMPLES,
                 confidence: float = CONFIDENCE_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-article scores (Efron & Tibshirani 1993, ch. 13).

    scores (n,). Draw b = 1..R resamples of n articles with replacement (seeded), mean_b = mean of resample b;
    the interval is the (1 - c)/2 and (1 + c)/2 quantiles of mean_1..mean_R (c = confidence).
    """
    scores = np.asarray(scores, dtype=np.float64)  # (n,)
    if scores.size == 0:
        raise ValueError("bootstrap_ci needs at least one score")
    generator = np.random.default_rng(seed)
    means = np.empty(num_resamples)  # (R,)
    chunk = max(1, 2_000_000 // scores.size)  # resamples per chunk: at most ~2M indices in memory
    for start in range(0, num_resamples, chunk):
        count = min(chunk, num_resamples - start)
        means[start:start + count] = scores[generator.integers(0, scores.size, size=(count, scores.size))].mean(axis=1)
    low, high = np.percentile(means, [100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2])
    return float(low), float(high)


def paired_bootstrap(before, after, seed: int, num_resamples: int = BOOTSTRAP_RESAMPLES,
                     confidence: float = CONFIDENCE_LEVEL) -> tuple[float, float, float]:
    """Mean paired difference "after minus before" on the same articles, and its percentile bootstrap interval.

    before, after (n,): scores of the same n articles. d_i = after_i - before_i; returns (mean(d), low, high)
    with (low, high) = bootstrap_ci(d): the articles are resampled together, so the interval reflects the
    article-to-article variation of the change, not of the scores. Identical scores give (0, 0, 0).
    """
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if before.shape != after.shape:
        raise ValueError(f"paired_bootstrap needs scores of the same articles: {before.shape} vs {after.shape}")
    differences = after - before  # (n,)
    return (float(differences.mean()), *bootstrap_ci(differences, seed, num_resamples, confidence))


def paired_change(before: list[dict], after: list[dict], seed: int) -> dict:
    """For each ROUGE key: the mean change "after minus before" on the same articles and its 95% paired bootstrap
    interval, from two evaluations' per-article records (as in eval_predictions.jsonl)."""
    if [r["index"] for r in before] != [r["index"] for r in after]:
        raise ValueError("paired_change needs the same articles in the same order")
    change = {}
    for key in ROUGE_KEYS:
        mean, low, high = paired_bootstrap([r[key] for r in before], [r[key] for r in after], seed)
        change.update({f"{key}_change": mean, f"{key}_change_ci_low": low, f"{key}_change_ci_high": high})
    return change


def format_scores(metrics: dict) -> str:
    """One line for the log: each ROUGE score with its 95% interval, then the other numbers."""
    parts = [f"{key}={metrics[key]:.4f} [{metrics[f'{key}_ci_low']:.4f}, {metrics[f'{key}_ci_high']:.4f}]"
             for key in ROUGE_KEYS]
    parts += [f"{key}={value:.4f}" for key, value in metrics.items()
              if key not in ROUGE_KEYS and not key.endswith(("_ci_low", "_ci_high")) and isinstance(value, float)]
    return " ".join(parts)


def evaluate_only(config: Config, given: set[str] = frozenset()) -> int:
    """--eval_only=True: score --model_name on --eval_split, with no training data, reference model or optimizer.

    Appends one line to eval.jsonl and writes every article (index, reference, prediction, scores) to
    eval_predictions.jsonl, which it never overwrites.
    """
    config = eval_only_target(config, given)
    if config.eval_decoding == "checkpoint" and "max_new_tokens" in given and checkpoint_sets_length(config):
        raise ConfigError("--max_new_tokens sets the length of greedy decoding; with --eval_decoding=checkpoint the "
                          "model's generation_config sets it (max_length): drop --max_new_tokens")
    unread = sorted(given - EVAL_ONLY_FIELDS)
    if unread:
        note(f"note: --eval_only=True does not read {', '.join(f'--{name}' for name in unread)} (training flags)")
    config = checked_against_model(config, given)
    check_trained_prefix(config)
    predictions_path = os.path.join(config.output_dir, "eval_predictions.jsonl")
    if os.path.exists(predictions_path) and not config.overwrite_output_dir:
        raise ConfigError(f"{predictions_path} exists from an earlier evaluation or run; pass another --output_dir, "
                          "or --overwrite_output_dir=True to replace that file")
    dist, log = join_processes(config)
    if dist.is_main:
        try:
            os.makedirs(config.output_dir, exist_ok=True)
            open(predictions_path + ".tmp", "w").close()
            os.remove(predictions_path + ".tmp")
        except OSError as error:
            raise UserError(f"cannot write to --output_dir={config.output_dir} ({error.strerror})") from None
        ensure_punkt()
    dist.barrier()
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)  # only a checkpoint whose generation_config samples draws random numbers
    held_out = load_eval_split(config, given, log)
    check_rouge_words(config, held_out)
    policy, tokenizer = load_policy_and_tokenizer(config, dist.device)
    if dist.is_main:
        log_lengths(config, tokenizer, log, {config.eval_split: held_out})
    policy.eval()
    settings = evaluation_settings(policy, tokenizer, config)
    data = (config.validation_file if config.eval_split == "validation" else config.test_file) or \
        f"{config.dataset_name} {config.dataset_config}"
    log(f"eval-only: {config.model_name} on {len(held_out)} articles of {data} ({config.eval_split}), "
        f"{config.eval_decoding} decoding")
    metrics, _, per_article = evaluate(policy, tokenizer, held_out, config, dist.device, dist)
    warn_empty_summaries(metrics, len(per_article), log)
    generation = {key: getattr(settings, key, None) for key in (
        "num_beams", "do_sample", "length_penalty", "no_repeat_ngram_size", "min_length", "max_length",
        "max_new_tokens", "early_stopping", "forced_bos_token_id", "forced_eos_token_id")}
    record = dict(model=config.model_name, data=data, eval_split=config.eval_split, articles=len(per_article),
                  max_source_length=config.max_source_length, eval_decoding=config.eval_decoding,
                  generation=generation, sentence_splitter=sentence_splitter(), rouge_tokenizer=config.rouge_tokenizer,
                  source_prefix=config.source_prefix,
                  seed=config.seed, **metrics)
    if dist.is_main:
        write_jsonl_atomic(predictions_path, per_article)
        append_jsonl(os.path.join(config.output_dir, "eval.jsonl"), record)
    log(f"eval-only: {format_scores(metrics)}")
    log(f"written: {config.output_dir}/eval.jsonl (scores, {CONFIDENCE_LEVEL:.0%} bootstrap CIs) and "
        f"{predictions_path} (every article)")
    return 0


EVAL_ONLY_FIELDS = frozenset({  # the flags --eval_only=True reads; any other given flag gets a note
    "model_name", "trust_remote_code", "dataset_name", "dataset_config", "validation_file", "test_file", "text_column",
    "summary_column", "source_prefix", "max_source_length", "max_new_tokens", "rouge_tokenizer", "eval_samples",
    "eval_split", "eval_decoding", "eval_only", "eval_batch_size", "output_dir", "seed", "device",
    "overwrite_output_dir"})


def eval_only_target(config: Config, given: set[str]) -> Config:
    """--eval_only=True pointed at a training run's --output_dir (its run_config.json): score the run's best/ (else
    final/) into output_dir/eval_<best|final>_<split>, not the base --model_name the training command names."""
    saved_path = os.path.join(config.output_dir, RUN_CONFIG_FILE)
    if not os.path.isfile(saved_path):
        return config
    with open(saved_path, encoding="utf-8") as file:
        saved = json.load(file)
    models = {name: os.path.join(config.output_dir, name) for name in ("best", "final")}
    chosen = [name for name, path in models.items()
              if os.path.realpath(os.path.expanduser(config.model_name)) == os.path.realpath(path)]
    if not chosen and "model_name" in given and config.model_name != saved.get("model_name"):
        raise ConfigError(f"--output_dir={config.output_dir} holds a training run of another model; to score "
                          f"--model_name={config.model_name}, pass an --output_dir of its own")
    chosen = chosen or [name for name, path in models.items() if os.path.isdir(path)]
    if not chosen:
        raise UserError(f"--output_dir={config.output_dir} holds a training run with no best/ or final/ model yet; "
                        "let it finish (or continue it with --resume=True), then evaluate again")
    which = chosen[0]
    target = os.path.join(config.output_dir, f"eval_{which}_{config.eval_split}")
    what = (f"the best held-out {saved.get('best_metric', 'score')} of training" if which == "best"
            else "the end of training")
    note(f"eval-only: --output_dir={config.output_dir} is a training run: scoring its {which}/ ({what}) into {target}")
    return dataclasses.replace(config, model_name=models[which], output_dir=target)


def checkpoint_sets_length(config: Config) -> bool:
    """Whether the model's generation_config.json sets a length (max_length or max_new_tokens); True when it cannot
    be read (a hub model offline), so that --max_new_tokens is accepted with --eval_decoding=checkpoint only where
    it is the length used."""
    from transformers import GenerationConfig

    path = os.path.expanduser(config.model_name)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "generation_config.json")):
        return False
    try:
        settings = GenerationConfig.from_pretrained(path)
    except Exception:
        return True
    return settings.max_length is not None or settings.max_new_tokens is not None


def check_trained_prefix(config: Config) -> None:
    """A one-line warning when the model was trained (by this script: run_config.json beside or above it) with
    another --source_prefix than the one it is now scored with."""
    model_dir = os.path.expanduser(config.model_name)
    for path in (os.path.join(model_dir, RUN_CONFIG_FILE), os.path.join(os.path.dirname(model_dir.rstrip("/")),
                                                                        RUN_CONFIG_FILE)):
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as file:
                trained = json.load(file).get("source_prefix", "")
            if trained != config.source_prefix:
                note(f"warning: {config.model_name} was trained with --source_prefix={trained!r} ({path}) but is "
                     f"scored with {config.source_prefix!r}: add --source_prefix={trained!r}")
            return


def special_token_summaries(model, tokenizer, output: torch.Tensor) -> list[bool]:
    """For each generated row (N, T): whether it holds tokens but only special ones beyond the start, end, padding
    and forced first token, so that its decoded summary is empty (e.g. a model that emits only <mask> or <unk>)."""
    structural = {tokenizer.pad_token_id, tokenizer.eos_token_id, decoder_start_token_id(model),
                  forced_bos_token_id(model)}
    special = set(tokenizer.all_special_ids) - structural
    return [bool(row) and all(token in special or token in structural for token in row)
            and any(token in special for token in row) for row in output[:, 1:].tolist()]


def warn_empty_summaries(metrics: dict, count: int, log) -> None:
    """One warning line when some evaluated summaries are empty, saying how many were only special tokens."""
    if metrics.get("empty_summaries"):
        log(f"warning: {round(metrics['empty_summaries'] * count)} of {count} held-out summaries are empty "
            f"({round(metrics['special_token_summaries'] * count)} made only of special tokens): ROUGE, gen_length "
            "and the examples show nothing for them")


def summary_entities(text: str) -> set[str]:
    """Numbers and capitalised words that do not start a sentence (names, places), lowercased.

    A heuristic for facts that works on any English text: "Sales up 4 percent, said Dax Dale." -> {4, dax, dale}.
    """
    entities = set()
    for sentence in re.split(r"(?<=[.!?])\s+|\n", text):
        words = re.findall(r"\w+", sentence)
        entities.update(w.lower() for i, w in enumerate(words) if w.isdigit() or (i > 0 and w[:1].isupper()))
    return entities


def name_lexicon(texts) -> frozenset[str]:
    """Proper names, lowercased: the words the texts write capitalised inside a sentence and never in lowercase."""
    lowercase = {w for text in texts for w in re.findall(r"\w+", text) if w.islower()}
    return frozenset({w for text in texts for w in summary_entities(text) if not w.isdigit()} - lowercase)


NAME_ROWS = 20_000  # --invented_fact_penalty learns its names from this many training rows at most (seconds)


def training_names(train_rows, config: Config, log) -> frozenset[str]:
    """The name_lexicon of the first NAME_ROWS training articles and references (the reward's `names`)."""
    rows = train_rows.select(range(min(len(train_rows), NAME_ROWS)))
    names = name_lexicon((*rows[config.text_column], *rows[config.summary_column]))
    log(f"invented_fact_penalty: {len(names):,} names learned from {len(rows):,} training rows")
    return names


def summary_facts(summary: str, names: frozenset[str]) -> set[str]:
    """The summary's facts, lowercased: its numbers (runs of digits: "1,200" is 1 and 200), its capitalised words
    inside a sentence, and its words among `names` (so a lowercased summary's names count)."""
    return summary_entities(summary) | ({w.lower() for w in re.findall(r"\w+", summary)} & names)


def invented_facts(summary: str, article: str, names: frozenset[str]) -> set[str]:
    """The summary's facts whose word is not in its article: names and numbers made up. The evaluation's
    invented_entities and invented_summaries, and the reward's --invented_fact_penalty, count these."""
    return summary_facts(summary, names) - {w.lower() for w in re.findall(r"\w+", article)}


def summary_quality(predictions: list[str], references: list[str], articles: list[str]) -> dict[str, float]:
    """Content and reward-hacking measures of summaries (words and punctuation are runs of \\w / of other
    non-space characters), each averaged over the summaries:

      entity_recall        share of the reference's entities (summary_entities) found among the summary's words,
                           averaged over the summaries whose reference has entities (None if none has)
      invented_entities    share of the summary's facts (summary_facts, with the names of the articles and
                           references scored with it) that are invented_facts: not in the article, made up
      invented_summaries   share of the summaries with at least one invented fact
      repeated_trigrams    share of the summary's word 3-grams that already occurred earlier in it: loops
      punctuation_fraction share of the summary's tokens that are punctuation: " . . . ." padding costs no ROUGE
      trailing_punctuation punctuation runs after the last word, minus 1 (0 for one ".", "..." or "%."; 3 for ". . . .")
      top_summary_share    share of all summaries equal to the most common one: collapse to a few strings
    """
    totals, recalled = Counter(), []
    names = name_lexicon((*articles, *references))
    for prediction, reference, article in zip(predictions, references, articles):
        words = {w.lower() for w in re.findall(r"\w+", prediction)}
        wanted, made = summary_entities(reference), summary_facts(prediction, names)
        invented = invented_facts(prediction, article, names)
        if wanted:  # a reference without entities leaves the summary out of the mean
            recalled.append(len(wanted & words) / len(wanted))
        totals["invented_entities"] += len(invented) / len(made) if made else 0.0
        totals["invented_summaries"] += bool(invented)
        trigrams = list(zip(*(re.findall(r"\w+", prediction.lower())[i:] for i in range(3))))
        totals["repeated_trigrams"] += (len(trigrams) - len(set(trigrams))) / len(trigrams) if trigrams else 0.0
        tokens = re.findall(r"\w+|[^\w\s]+", prediction)  # punctuation runs: "..." and "%." are one each
        punctuation = [not re.match(r"\w", t) for t in tokens]
        totals["punctuation_fraction"] += sum(punctuation) / len(tokens) if tokens else 0.0
        trailing = len(punctuation) - max((i + 1 for i, p in enumerate(punctuation) if not p), default=0)
        totals["trailing_punctuation"] += max(trailing - 1, 0)
    count = max(len(predictions), 1)
    metrics = {key: totals[key] / count for key in ("invented_entities", "invented_summaries",
                                                    "repeated_trigrams", "punctuation_fraction",
                                                    "trailing_punctuation")}
    metrics = {"entity_recall": float(np.mean(recalled)) if recalled else None, **metrics}
    metrics["top_summary_share"] = Counter(predictions).most_common(1)[0][1] / count if predictions else 0.0
    return metrics


# --------------------------------------------------------------------------------------------------
# Run files: output dir, saved config, checkpoints (atomic, the last few kept, exact resume), logs
# --------------------------------------------------------------------------------------------------
RUN_LOGS = ("metrics.jsonl", "eval.jsonl", "eval_examples.jsonl", "eval_predictions.jsonl", "completions.jsonl")  # cut back to the checkpoint on resume
RUN_CONFIG_FILE = "run_config.json"  # the resolved config of the run, in output_dir (checkpoints hold it too)
# Flags a resumed run may change: they do not alter the training trajectory (every other field does, including
# fields added later). max_steps may change too: the lr schedule is then defined over the new max_steps.
RESUME_BOOKKEEPING_FIELDS = frozenset({
    "eval_every", "eval_batch_size", "num_examples", "save_every", "keep_checkpoints", "max_nonfinite_steps",
    "output_dir", "device", "compile", "gradient_checkpointing", "micro_batch_size", "max_steps",
    "log_completions_every", "report_to"})
RESUME_IGNORED_FIELDS = frozenset({"resume", "overwrite_output_dir"})  # differ on every resume: not compared


def earlier_run_files(output_dir: str) -> list[str]:
    """The files and folders of an earlier run (or benchmark) in output_dir."""
    names = ("metrics.jsonl", "eval.jsonl", "eval_examples.jsonl", "eval_predictions.jsonl", "completions.jsonl",
             "sft_eval.jsonl", "checkpoints", "best", "final", "reference", "curves.png", "tensorboard",
             RUN_CONFIG_FILE, "benchmark.json", "comparison.json", "comparison.png", "control_predictions.jsonl",
             "comparison_seeds.json", FACT_PENALTY_DIR)
    return [name for name in names if os.path.exists(os.path.join(output_dir, name))]


def check_output_dir(config: Config) -> None:
    """A fresh run never deletes an earlier one unless asked to (the Hugging Face convention); every process checks."""
    stale = earlier_run_files(config.output_dir) if not config.resume else []
    if stale and not config.overwrite_output_dir:
        raise ConfigError(f"--output_dir={config.output_dir} holds an earlier run ({', '.join(stale)}); continue it "
                          "with --resume=True, replace it with --overwrite_output_dir=True, or pick another --output_dir")


def prepare_output_dir(config: Config, log) -> None:
    """Create output_dir (clear error if it cannot be written); with --overwrite_output_dir, clear an earlier run."""
    try:
        os.makedirs(config.output_dir, exist_ok=True)
        probe = os.path.join(config.output_dir, ".write_test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as error:
        raise UserError(f"cannot write to --output_dir={config.output_dir} ({error.strerror})") from None
    if config.resume:
        return
    stale = earlier_run_files(config.output_dir)
    if stale:
        log(f"--overwrite_output_dir=True: deleting the earlier run in {config.output_dir} ({', '.join(stale)})")
    for name in stale:
        path = os.path.join(config.output_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def write_json_atomic(path: str, record: dict) -> None:
    """Write one JSON object to path.tmp, then rename it over path: a kill never leaves half a file."""
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        json.dump(record, file, indent=1, ensure_ascii=False)
    os.replace(path + ".tmp", path)


def write_jsonl_atomic(path: str, records: list[dict]) -> None:
    """Write records as JSON Lines to path.tmp, then rename it over path: a kill never leaves half a file."""
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        file.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    os.replace(path + ".tmp", path)


def log_truncated_articles(state: TrainerState, config: Config, dist: "Distributed", log) -> None:
    """Say once, at the end of the run, what share of the training articles max_source_length cut short."""
    seen = state.step * config.batch_size * dist.world_size
    if state.articles_truncated and seen:
        log(f"note: {state.articles_truncated} of {seen} training articles ({state.articles_truncated / seen:.1%}) "
            f"were longer than --max_source_length={config.max_source_length} tokens and were truncated")


def record_evaluation(config, dist, step, policy, tokenizer, held_out, state: TrainerState, log) -> dict:
    """Evaluate, append to eval.jsonl, eval_examples.jsonl and eval_predictions.jsonl, and refresh best/ when
    best_metric improves. The last step also gets the paired bootstrap of the change since step 0 (GRPO's start).
    Nothing with --eval_samples=0."""
    if len(held_out) == 0:
        return {}
    metrics, examples, per_article = evaluate(policy, tokenizer, held_out, config, dist.device, dist)
    warn_empty_summaries(metrics, len(per_article), log)
    metrics.update(articles=len(per_article), eval_decoding=config.eval_decoding, sentence_splitter=sentence_splitter(),
                   rouge_tokenizer=config.rouge_tokenizer)
    predictions_path = os.path.join(config.output_dir, "eval_predictions.jsonl")
    if dist.is_main and step == config.max_steps and step > 0 and os.path.exists(predictions_path):
        with open(predictions_path, encoding="utf-8") as file:
            before = [record for record in map(json.loads, file) if record["step"] == 0]
        if len(before) == len(per_article):
            metrics.update(change_from_step=0, **paired_change(before, per_article, config.seed))
            log(f"after GRPO minus before (step 0), paired bootstrap on the same {len(before)} articles, "
                f"{CONFIDENCE_LEVEL:.0%} CI: " + " ".join(
                    f"{key} {metrics[f'{key}_change']:+.4f} [{metrics[f'{key}_change_ci_low']:+.4f}, "
                    f"{metrics[f'{key}_change_ci_high']:+.4f}]" for key in ROUGE_KEYS))
        else:
            log(f"note: no paired before/after comparison: step 0 scored {len(before)} articles, this evaluation "
                f"{len(per_article)}")
    if dist.is_main:
        append_jsonl(os.path.join(config.output_dir, "eval.jsonl"), {"step": step, **metrics})
        for example in examples:
            append_jsonl(os.path.join(config.output_dir, "eval_examples.jsonl"), {"step": step, **example})
        with open(predictions_path, "a", encoding="utf-8") as file:
            file.writelines(json.dumps({"step": step, **record}, ensure_ascii=False) + "\n" for record in per_article)
        if metrics[config.best_metric] > state.best_score:
            save_pretrained_atomic(policy, tokenizer, os.path.join(config.output_dir, "best"))
    state.best_score = max(state.best_score, metrics[config.best_metric])
    log(f"eval step {step}: " + format_scores(metrics))
    return metrics


@dataclass
class TrainerState:
    step: int = 0  # GRPO steps done
    best_score: float = -1.0  # best held-out best_metric so far
    nonfinite_in_a_row: int = 0  # consecutive steps skipped for a NaN/inf loss
    nonfinite_total: int = 0  # all steps skipped for a NaN/inf loss
    articles_truncated: int = 0  # training articles cut to max_source_length so far
    evaluation_pending: bool = True  # the evaluation after `step` is still to do (step 0's; one a signal interrupted)
    sft_step: int = 0  # a checkpoint saved during the SFT warm-up (sft_N.pt): the SFT steps done
    sft_loss: float = 0.0  # and the loss of its last step
    equal_rewards_in_a_row: int = 0  # consecutive steps where every group's G rewards were equal (no signal)


def rng_state() -> dict:
    """Every random generator the run draws from, so that a resumed run samples what the original would."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, log=None) -> None:
    """Restore rng_state()'s generators; of the CUDA ones, those of the visible devices (saying so if fewer)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        saved, visible = state["cuda"], torch.cuda.device_count()
        if len(saved) > visible and log is not None:
            log(f"note: the checkpoint holds the random state of {len(saved)} GPUs and {visible} are visible: restored "
                f"those of the first {visible} (sampling on the others cannot be reproduced)")
        torch.cuda.set_rng_state_all(saved[:visible])


def checkpoint_files(output_dir: str) -> list[str]:
    """Complete checkpoints in output_dir, oldest first: SFT's (sft_N.pt), then GRPO's (step_N.pt). A .tmp left by
    a killed save is not one."""
    directory = os.path.join(output_dir, "checkpoints")
    names = os.listdir(directory) if os.path.isdir(directory) else []
    names = [n for n in names if re.fullmatch(r"(sft|step)_\d+\.pt", n)]
    return [os.path.join(directory, name) for name in sorted(names, key=lambda n: (n.startswith("step_"), n))]


def is_sft_checkpoint(path: str) -> bool:
    """A checkpoint saved during the SFT warm-up (by a signal): sft_N.pt."""
    return os.path.basename(path).startswith("sft_")


def save_checkpoint(output_dir: str, policy, optimizer, scheduler, state: TrainerState, rng_states: list, keep: int,
                    config: Config | None = None, world_size: int = 1) -> str:
    """Write checkpoints/step_N.pt (sft_N.pt during SFT: state.sft_step) atomically (temporary file, then rename)
    and keep the newest `keep`.

    The checkpoint also holds the run's resolved config and process count, which --resume compares with the new."""
    directory = os.path.join(output_dir, "checkpoints")
    os.makedirs(directory, exist_ok=True)
    name = f"sft_{state.sft_step:08d}.pt" if state.sft_step else f"step_{state.step:08d}.pt"
    path = os.path.join(directory, name)
    payload = {"model": policy.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
               "trainer_state": dataclasses.asdict(state), "rng_states": rng_states,
               "config": dataclasses.asdict(config) if config is not None else None, "world_size": world_size}
    torch.save(payload, path + ".tmp")
    os.replace(path + ".tmp", path)
    stale_temporary = [os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".pt.tmp")]
    for old in checkpoint_files(output_dir)[:-keep] + stale_temporary:  # .tmp: left by a save that was killed
        os.remove(old)
    return path


def check_state_dict_fits(saved: dict, model: torch.nn.Module, path: str) -> None:
    """One line instead of load_state_dict's list of every key when a checkpoint was written by another model."""
    expected = model.state_dict()
    missing, unexpected = expected.keys() - saved.keys(), saved.keys() - expected.keys()
    reshaped = [k for k in expected.keys() & saved.keys() if tuple(expected[k].shape) != tuple(saved[k].shape)]
    if missing or unexpected or reshaped:
        example = sorted(missing or unexpected or reshaped)[0]
        raise UserError(f"{path} was written by a different model ({len(missing)} weights missing, {len(unexpected)} "
                        f"unexpected, {len(reshaped)} of another shape, e.g. {example!r}); resume with the "
                        "--model_name that wrote it, or start afresh with --overwrite_output_dir=True")


def load_checkpoint(path: str, policy, optimizer, scheduler, rank: int, log=None) -> TrainerState:
    """Restore model, optimizer, scheduler, trainer state and this process's random generators."""
    payload = torch.load(path, map_location="cpu", weights_only=False)  # our own file: it holds RNG tuples
    check_state_dict_fits(payload["model"], policy, path)
    policy.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    rng_states = payload["rng_states"]
    set_rng_state(rng_states[rank % len(rng_states)], log)
    return TrainerState(**{"evaluation_pending": False, **payload["trainer_state"]})  # older files: nothing pending


def load_sft_checkpoint(path: str, policy, optimizer, scheduler, config: Config, dist: "Distributed", log
                        ) -> TrainerState:
    """Go on with SFT from a checkpoint saved during it: weights, SFT optimizer and schedule, random state. The logs
    lose what a run killed after it wrote: sft_eval.jsonl's later SFT steps, and every GRPO line (GRPO starts anew)."""
    state = load_checkpoint(path, policy, optimizer, scheduler, dist.rank, log)
    if dist.is_main:  # a pending evaluation is done again: its line, if a killed run wrote it, goes too
        keep_lines_up_to(os.path.join(config.output_dir, "sft_eval.jsonl"), state.sft_step - state.evaluation_pending,
                         key="sft_step")
        for name in RUN_LOGS:
            keep_lines_up_to(os.path.join(config.output_dir, name), -1)
    log(f"resumed from {path} at SFT step {state.sft_step}")
    return state


def finished_sft_step(step: int, loss: float, evaluation_due: bool, policy, optimizer, scheduler, config: Config,
                      dist: "Distributed") -> None:
    """SFT step `step` is finished (its evaluation follows if evaluation_due): a boundary (stop_point), and until the
    next one a signal saves checkpoints/sft_N.pt: weights, SFT optimizer and schedule, the random state of this
    moment. Every save_every SFT steps it is saved anyway, like GRPO's (a SIGKILL then loses at most save_every
    steps). The last SFT step is no boundary (GRPO's first one follows soon, with its own checkpoint)."""
    def save(rng: dict) -> str:
        state = TrainerState(sft_step=step, sft_loss=loss, evaluation_pending=evaluation_due)
        save_gathered_checkpoint(config, dist, policy, optimizer, scheduler, state, rng)
        return f"SFT step {step}"

    mark_finished(save)
    if step < config.sft_steps:
        if step % config.save_every == 0 and StopRequest.active is not None:  # train's SFT, not the demo's control
            save(rng_state())
        stop_point()


def read_saved_config(checkpoint: str, output_dir: str) -> dict | None:
    """The resolved config a run was started with: from its newest checkpoint, else run_config.json (None if neither)."""
    payload = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False)  # mmap: tensors stay on disk
    if payload.get("config") is not None:  # with the process count (world_size), where the checkpoint has it
        return {**payload["config"], **({"world_size": payload["world_size"]} if "world_size" in payload else {})}
    path = os.path.join(output_dir, RUN_CONFIG_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    return None


def changed_on_resume(saved: dict, config: Config, bookkeeping_fields: frozenset = RESUME_BOOKKEEPING_FIELDS
                      ) -> tuple[list[str], list[str]]:
    """(trajectory changes, bookkeeping changes) between a saved config and the new one, each as 'name: old -> new'.

    Every field is trajectory-altering except bookkeeping_fields (by default RESUME_BOOKKEEPING_FIELDS, max_steps
    among them: it has its own rule, see continue_lr_schedule) and RESUME_IGNORED_FIELDS, so a field added later
    is checked by default. A field missing from an older saved config counts as its default.
    """
    def comparable(value):  # as JSON holds it (a tuple and a list of the same items are the same flag value)
        return json.loads(json.dumps(value))

    trajectory, bookkeeping = [], []
    for field in (f for f in dataclasses.fields(Config) if f.name not in RESUME_IGNORED_FIELDS):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        old, new = saved.get(field.name, default), getattr(config, field.name)
        if comparable(old) != comparable(new):
            change = f"--{field.name}: {old!r} -> {new!r}"
            (bookkeeping if field.name in bookkeeping_fields else trajectory).append(change)
    return trajectory, bookkeeping


def check_resume_config(saved: dict | None, config: Config, log, world_size: int = 1) -> None:
    """Stop a resume whose flags (or process count: each process takes its own batch) would change the training
    trajectory; allow bookkeeping changes and say so."""
    if saved is None:
        log("note: this run saved no config (an older version wrote it), so the flags cannot be compared")
        return
    trajectory, bookkeeping = changed_on_resume(saved, config)
    if saved.get("world_size", world_size) != world_size:
        trajectory.append(f"processes (torchrun --nproc_per_node, all nodes): {saved['world_size']} -> {world_size}")
    if trajectory:
        raise ConfigError(f"--resume=True with flags that change the run: {'; '.join(trajectory)}; resume with the "
                          "run's own values (see run_config.json), or start a new run in another --output_dir")
    if bookkeeping:
        log(f"resuming with changed bookkeeping flags: {'; '.join(bookkeeping)}")


def continue_lr_schedule(scheduler, optimizer) -> tuple[float, float]:
    """After loading a checkpoint into a scheduler built for the new max_steps: set the lr of the next update to the
    new schedule's value at the resumed optimizer step (as if the run had asked for the new max_steps from the
    start). The loaded optimizer holds the old schedule's lr, which would otherwise be used for one update.

    Returns (old lr, new lr) of the first parameter group.
    """
    old = optimizer.param_groups[0]["lr"]
    for group, base_lr, lr_lambda in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * lr_lambda(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return old, optimizer.param_groups[0]["lr"]


def save_pretrained_atomic(model, tokenizer, directory: str) -> None:
    """save_pretrained into directory.tmp, then swap it in, so a kill never leaves half a model.

    A LoRA policy is saved merged (a plain model: AutoModelForSeq2SeqLM.from_pretrained loads it), from a merged
    copy so the training model is never changed, and its adapter alone goes to directory/adapter.
    """
    import copy

    temporary = directory.rstrip("/") + ".tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    if is_lora(model):
        copy.deepcopy(model).merge_and_unload().save_pretrained(temporary)
        model.save_pretrained(os.path.join(temporary, "adapter"))
    else:
        model.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(temporary, directory)


def keep_lines_up_to(path: str, step: int, key: str = "step") -> None:
    """Drop the lines of a .jsonl log written after `step` (by a run that died before its next checkpoint)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as file:
        for line in file:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by the kill
                continue
            if record[key] <= step:
                kept.append(json.dumps(record, ensure_ascii=False) + "\n")
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        file.writelines(kept)
    os.replace(path + ".tmp", path)


def append_jsonl(path: str, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(record, ensure_ascii=False) + "\n")  # UTF-8 text, not \u escapes


class Trackers:
    """--report_to: the numbers of metrics.jsonl (as train/<name>) and eval.jsonl (as eval/<name>), at their GRPO
    step, sent to Weights & Biases (a run in output_dir/wandb; project from $WANDB_PROJECT) and/or TensorBoard
    (event files in output_dir/tensorboard). Each package is imported only when named."""

    def __init__(self, config: Config, first_step: int = 1):
        names = report_to_names(config)
        self.wandb_run = self.tensorboard = None
        if "wandb" in names:
            import wandb

            try:
                self.wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", "grpo-summarization"),
                                            dir=config.output_dir, config=dataclasses.asdict(config))
            except Exception as error:  # not logged in, no network, ...
                raise UserError(f"--report_to=wandb: could not start a wandb run ({str(error).splitlines()[0]}); "
                                "run `wandb login`, or set WANDB_MODE=offline to keep the run local") from None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(os.path.join(config.output_dir, "tensorboard"),  # resume: drop the
                                             purge_step=first_step if config.resume else None)  # killed run's tail

    def log(self, prefix: str, record: dict) -> None:
        values = {f"{prefix}/{key}": value for key, value in record.items()
                  if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=record["step"])
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def plot_curves(output_dir: str) -> str | None:
    """curves.png: training reward, KL to the reference, and held-out ROUGE against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def read(name):
        path = os.path.join(output_dir, name)
        return [json.loads(line) for line in open(path, encoding="utf-8")] if os.path.exists(path) else []

    steps, evals = read("metrics.jsonl"), read("eval.jsonl")
    if not steps:
        return None
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    x = [m["step"] for m in steps]
    axes[0].plot(x, [m["reward_mean"] for m in steps], alpha=0.35, label="batch")
    window = max(1, len(steps) // 20)
    smooth = np.convolve([m["reward_mean"] for m in steps], np.ones(window) / window, mode="valid")
    axes[0].plot(x[window - 1:], smooth, label=f"mean of {window}")
    axes[0].set(title="training reward (ROUGE)", xlabel="GRPO step")
    axes[0].legend()
    axes[1].plot(x, [m["kl"] for m in steps])
    axes[1].set(title="KL(policy || reference)", xlabel="GRPO step")
    for key in ROUGE_KEYS:
        axes[2].plot([e["step"] for e in evals], [e[key] for e in evals], marker="o", label=key)
    axes[2].set(title="held-out greedy ROUGE F1", xlabel="GRPO step")
    axes[2].legend()
    return save_figure(figure, os.path.join(output_dir, "curves.png"))


def save_figure(figure, path: str) -> str:
    """Lay out a matplotlib figure, write it as a PNG (110 dpi) and close it; returns the path."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# --------------------------------------------------------------------------------------------------
# Processes: one plain process, or N under torchrun (DDP: NCCL on GPU, gloo on CPU); timers, signals
# --------------------------------------------------------------------------------------------------
@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average of each number over the processes (the numbers themselves in a plain run)."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return dict(zip(values, (tensor / self.world_size).tolist()))

    def max(self, value: int) -> int:
        """The largest of the processes' values (the value itself in a plain run)."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return int(tensor.item())

    def any(self, flag: bool) -> bool:
        """True on every process if it is True on one."""
        return bool(self.mean({"flag": float(flag)})["flag"] > 0)

    def gather_in_order(self, indexed: list[tuple[int, object]]) -> list:
        """Items that the processes hold as (index, item) pairs, gathered everywhere and sorted by index."""
        if self.world_size > 1:
            parts = [None] * self.world_size
            torch.distributed.all_gather_object(parts, indexed)
            indexed = [pair for part in parts for pair in part]
        return [item for _, item in sorted(indexed, key=lambda pair: pair[0])]

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def setup_distributed(config: Config) -> Distributed:
    """Join the torchrun process group if there is one, and pick this process's device."""
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device=cuda but no CUDA device is available; use --device=cpu or auto")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():  # the demo's grpo_fact_penalty row is a second run in the group
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world_size, device)


def batch_reward_std(rewards: torch.Tensor) -> torch.Tensor:
    """Sample std of the rewards of the whole step: under torchrun, of every process's rewards together."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rewards.std()
    parts = [torch.empty_like(rewards) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, rewards)  # every process has B*G rewards
    return torch.cat(parts).std()


def world_token_count(policy_forward, mask: torch.Tensor, loss_type: str) -> tuple[float | None, int]:
    """(token count of the step on all processes, world size) for dapo under DDP; (None, 1) otherwise."""
    if loss_type != "dapo" or not hasattr(policy_forward, "no_sync"):
        return None, 1
    count = mask.sum().double()
    torch.distributed.all_reduce(count)  # once per rollout
    return count.item(), torch.distributed.get_world_size()


def gradient_sync(policy_forward, sync: bool):
    """DDP syncs gradients in the backward of the last micro-batch only (no_sync before); nothing without DDP."""
    return policy_forward.no_sync() if hasattr(policy_forward, "no_sync") and not sync else contextlib.nullcontext()


def add_update_stats(totals: Counter, stats: dict, mask: torch.Tensor, samples: slice, num_iterations: int) -> None:
    """Add a micro-batch's grpo_loss statistics to the update's totals, weighted by its share of the tokens (and
    averaged over the mu updates); its entropy (first update only) as the mean over the step's tokens."""
    token_total = mask.sum().clamp(min=1).item()
    micro_mask = mask[samples]
    if "entropy" in stats:
        totals["entropy"] += (stats.pop("entropy") * micro_mask).sum().item() / token_total
    tokens = micro_mask.sum().item()
    for key, value in stats.items():  # kl, clip_fraction, clip_fraction_low, clip_fraction_high
        totals[key] += value.item() * tokens / token_total / num_iterations


def available_cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a SLURM allocation), not all the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_thread_count(environ: typing.Mapping[str, str], cores: int) -> int | None:
    """Threads per process for a CPU run: None (keep) when OMP_NUM_THREADS is set, else the available cores shared
    by the processes of this machine (LOCAL_WORLD_SIZE under torchrun), so processes never oversubscribe cores."""
    if environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, cores // max(1, int(environ.get("LOCAL_WORLD_SIZE", "1"))))


class PhaseTimer:
    """Seconds spent in each named phase (CUDA is synchronised at phase boundaries for honest numbers)."""

    def __init__(self, device: torch.device):
        self.seconds = Counter()
        self.synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.synchronize()
            self.seconds[name] += time.perf_counter() - start


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (what SLURM, torchrun and other schedulers send before stopping a job) asks the run
    to stop at the next boundary (stop_point: between SFT steps, between a step's phases, between micro-batches of the
    update before its optimizer step, between evaluation batches), save the last finished step with the random state
    it left, and exit with 128 + the signal number, within seconds (torchrun kills its workers 30 s after a SIGTERM
    by default). The unfinished step is dropped; a resumed run does it again, exactly. A second signal aborts.
    train installs it before anything else (the SFT warm-up included); stop_point is a no-op without one."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)  # handled signals
    active: "StopRequest | None" = None  # the one stop_point consults

    def __init__(self, log, dist: "Distributed | None" = None):
        self.requested, self.signal_number, self.log, self.dist = False, 0, log, dist or Distributed()
        self.finished = None  # (random state, save): the last finished step, and how to checkpoint it (mark_finished)
        self.previous = {number: signal.signal(number, self.handle) for number in self.SIGNALS}
        StopRequest.active = self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signal_number = True, signum
        self.log(f"{signal.Signals(signum).name}: stopping at the next boundary and saving the last finished step "
                 "(again to abort)")

    def restore(self):
        for number, previous in self.previous.items():
            signal.signal(number, previous)
        if StopRequest.active is self:
            StopRequest.active = None


class Stopped(Exception):
    """Raised by stop_point on every process after it saved the last finished step (the message names it)."""


def mark_finished(save: typing.Callable[[dict], str]) -> None:
    """A step is finished: until the next one is, a signal calls save(the random state of this moment), which writes
    the checkpoint (on every process: it may gather) and returns what it saved ("step 3")."""
    if StopRequest.active is not None:
        StopRequest.active.finished = (rng_state(), save)


def stop_point() -> None:
    """A boundary where a run may stop: if Ctrl-C or SIGTERM reached any process, save the last finished step and
    raise Stopped. Every process passes the same boundaries, and they agree here (a one-number all_reduce), so none
    waits in a collective alone. A no-op outside train (benchmark, tests, the demo's control)."""
    stop = StopRequest.active
    if stop is None or not stop.dist.any(stop.requested):
        return
    rng, save = stop.finished
    raise Stopped(save(rng))


def tqdm_bar(total: int, description: str, disable: bool, initial: int = 0):
    from tqdm import tqdm

    return tqdm(range(initial, total), initial=initial, total=total, desc=description, disable=disable,
                dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------
# ROUGE internals: rouge_score's tokenizer and stemmer, each text once, bit-parallel LCS
# --------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def have_punkt() -> bool:
    """Whether nltk's punkt sentence model is installed; if not, say once that a simple splitter is used."""
    try:
        import nltk

        nltk.data.find("tokenizers/punkt_tab/english/")
        return True
    except (ImportError, LookupError):
        note("note: nltk punkt_tab is not installed, so ROUGE-Lsum splits sentences at . ! ? "  # rank 0 only
             "(install it with: python -m nltk.downloader punkt_tab)")
        return False


PUNKT_DOWNLOAD_SECONDS = 30  # longest wait for nltk to fetch punkt_tab before ROUGE-Lsum falls back to the regex


def hub_offline() -> bool:
    """Whether the user asked for no network (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE or HF_DATASETS_OFFLINE set)."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


def sentence_splitter() -> str:
    """The splitter ROUGE-Lsum uses in this process, as recorded in eval.jsonl: "punkt_tab" or "regex"."""
    return "punkt_tab" if have_punkt() else "regex"


def ensure_punkt(timeout: float = PUNKT_DOWNLOAD_SECONDS) -> str:
    """Fetch nltk's punkt_tab once if it is missing (as Hugging Face's run_summarization does), then the splitter.

    Never tried when the HF offline variables are set; the download runs in a background thread and is waited
    for at most `timeout` seconds, so an unreachable network never stalls a run. On failure the regex
    splitter is used and have_punkt says so once.
    """
    try:
        import nltk

        nltk.data.find("tokenizers/punkt_tab/english/")
    except ImportError:
        return sentence_splitter()
    except LookupError:
        if not hub_offline():
            import io
            import threading

            fetch = threading.Thread(target=nltk.download, args=("punkt_tab",), daemon=True,
                                     kwargs=dict(quiet=True, raise_on_error=False, print_error_to=io.StringIO()))
            fetch.start()
            fetch.join(timeout)
        have_punkt.cache_clear()
    return sentence_splitter()


def split_sentences(text: str) -> list[str]:
    """Sentences of a text: nltk's sent_tokenize when punkt is installed, else a split after . ! or ?"""
    if have_punkt():
        import nltk

        return [s for line in text.splitlines() for s in nltk.sent_tokenize(line)]
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if s]


@lru_cache(maxsize=1)
def rouge_stemmer():
    """The Porter stemmer rouge_score itself uses with use_stemmer=True."""
    from rouge_score import tokenizers

    return tokenizers.DefaultTokenizer(use_stemmer=True)._stemmer


@lru_cache(maxsize=1 << 17)
def rouge_word(word: str) -> str:
    """A lowercase word as rouge_score scores it: stemmed if longer than 3 characters ("" if nothing is left)."""
    from rouge_score import tokenize

    token = rouge_stemmer().stem(word) if len(word) > 3 else word
    return token if tokenize.VALID_TOKEN_RE.match(token) else ""


def rouge_tokens(text: str, tokenizer: str = "default") -> list[str]:
    """rouge_score's tokenize(text, stemmer): lowercase, non-alphanumerics to spaces, stem (memoized). With
    tokenizer="unicode" (--rouge_tokenizer): the lowercase letter/digit runs of any script, ASCII ones stemmed."""
    from rouge_score import tokenize

    if tokenizer == "unicode":
        return [token for token in (rouge_word(w) if w.isascii() else w for w in UNICODE_WORD_RE.findall(text.lower()))
                if token]
    return [token for token in map(rouge_word, tokenize.NON_ALPHANUM_RE.sub(" ", text.lower()).split()) if token]


UNICODE_WORD_RE = re.compile(r"[^\W_]+")  # --rouge_tokenizer=unicode: runs of letters and digits of any script


@dataclass
class RougeText:
    """What the ROUGE scores need of one text, computed once per distinct text."""

    tokens: list[str]
    positions: dict[str, int]  # token -> bitmask of its positions (for bit-parallel LCS)
    unigrams: Counter
    bigrams: Counter
    sentences: list[list[str]]  # one token list per sentence, for ROUGE-Lsum
    sentence_positions: list[dict[str, int]]
    sentence_tokens: Counter

    @classmethod
    def of(cls, text: str, tokenizer: str = "default") -> "RougeText":
        tokens = rouge_tokens(text, tokenizer)
        sentences = [rouge_tokens(sentence, tokenizer) for sentence in split_sentences(text)]
        sentences = [sentence for sentence in sentences if sentence]
        return cls(tokens, position_masks(tokens), Counter(tokens), Counter(zip(tokens, tokens[1:])), sentences,
                   [position_masks(sentence) for sentence in sentences], Counter(t for s in sentences for t in s))


def position_masks(tokens: list[str]) -> dict[str, int]:
    masks: dict[str, int] = {}
    for position, token in enumerate(tokens):
        masks[token] = masks.get(token, 0) | (1 << position)
    return masks


def lcs_columns(masks: dict[str, int], length: int, candidate: list[str]) -> list[int]:
    """Bit-parallel LCS (Allison-Dix / Hyyro): column j of the LCS table as an integer bitmask.

    Bit i of columns[j] is 0 iff table[i+1][j] == table[i][j] + 1, so table[i][j] = i - popcount(columns[j] & (2^i - 1)).
    """
    full = (1 << length) - 1
    column, columns = full, [full]
    for token in candidate:
        matches = column & masks.get(token, 0)
        column = ((column + matches) | (column - matches)) & full
        columns.append(column)
    return columns


def lcs_reference_positions(reference: list[str], masks: dict[str, int], candidate: list[str]) -> list[int]:
    """Positions in `reference` of the LCS that rouge_score's backtrack picks (same tie-breaking)."""
    columns = lcs_columns(masks, len(reference), candidate)
    i, j, positions = len(reference), len(candidate), []
    while i > 0 and j > 0:
        if reference[i - 1] == candidate[j - 1]:
            i, j = i - 1, j - 1
            positions.append(i)
        elif (i - (columns[j - 1] & ((1 << i) - 1)).bit_count()
              > i - 1 - (columns[j] & ((1 << (i - 1)) - 1)).bit_count()):  # table[i][j-1] > table[i-1][j]
            j -= 1
        else:
            i -= 1
    return positions


def f1(hits: int, prediction_count: int, reference_count: int) -> float:
    """rouge_score's F-measure from counts (same float operations, so the same numbers)."""
    precision, recall = hits / prediction_count, hits / reference_count
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rouge_pair(prediction: RougeText, reference: RougeText) -> dict[str, float]:
    """ROUGE-1, -2, -L and -Lsum F1 of one prediction against one reference."""
    scores = {}
    for key, ours, theirs in (("rouge1", prediction.unigrams, reference.unigrams),
                              ("rouge2", prediction.bigrams, reference.bigrams)):
        hits = sum((ours & theirs).values())
        scores[key] = f1(hits, max(sum(ours.values()), 1), max(sum(theirs.values()), 1))
    if not prediction.tokens or not reference.tokens:
        return {**scores, "rougeL": 0.0, "rougeLsum": 0.0}
    length = len(reference.tokens)
    lcs = length - lcs_columns(reference.positions, length, prediction.tokens)[-1].bit_count()
    scores["rougeL"] = f1(lcs, len(prediction.tokens), length)
    union = Counter()  # ROUGE-Lsum: union of the LCS hits of each reference sentence with every predicted one
    for sentence, masks in zip(reference.sentences, reference.sentence_positions):
        hit_positions = set()
        for candidate in prediction.sentences:
            hit_positions.update(lcs_reference_positions(sentence, masks, candidate))
        union.update(sentence[position] for position in hit_positions)
    hits = sum((union & prediction.sentence_tokens).values())
    scores["rougeLsum"] = f1(hits, sum(map(len, prediction.sentences)), sum(map(len, reference.sentences)))
    return scores


def rouge_f1(predictions: list[str], references: list[str], tokenizer: str = "default") -> dict[str, list[float]]:
    """ROUGE-1/2/L/Lsum F1 (stemmed) of each prediction against its reference: rouge_score's numbers, faster.

    Every distinct text is tokenized, stemmed and split into sentences once per call, so a reference shared by
    the G samples of an article is processed once; LCS uses bit-parallel integer arithmetic.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    analyzed: dict[str, RougeText] = {}
    for text in (*predictions, *references):
        if text not in analyzed:
            analyzed[text] = RougeText.of(text, tokenizer)
    pairs = [rouge_pair(analyzed[p], analyzed[r]) for p, r in zip(predictions, references)]
    return {key: [pair[key] for pair in pairs] for key in ROUGE_KEYS}


# --------------------------------------------------------------------------------------------------
# The demo world: invented news articles written to .jsonl, a tiny BART built from a config
# --------------------------------------------------------------------------------------------------
# The offline demo changes only these constants; the code path is the one a real run takes.
DEMO_CONFIG = dict(
    output_dir="runs/demo", max_source_length=160, max_new_tokens=40, group_size=8, batch_size=8,
    micro_batch_size=64, temperature=0.7, learning_rate=1e-4, beta=0.02, warmup_steps=5,
    lr_scheduler="constant_with_warmup", sft_steps=800, sft_learning_rate=2e-3, sft_batch_size=32,
    sft_eval_every=200, max_steps=150,
    eval_every=50, eval_samples=200, eval_batch_size=100, save_every=50,
)
DEMO_TRAIN_ARTICLES = 4000  # synthetic training articles written by the demo
FIRST = "Arlo Bryn Cora Dax Elin Fenn Greta Hale".split()
LAST = "Abbot Brask Corrin Dale Elmsworth Fairley Gorse Hallam".split()
TOWNS = "Ashgrove Bellmoor Carrow Dunmere Eastwick Fallowby Glenhollow Harrowdale".split()
COMPANIES = "Brightwell Corvane Dellmark Everline Fernhold Glimmer".split()
TEAMS = "Rovers United Wanderers Athletic Rangers Harriers Comets Falcons".split()
PRODUCTS = "bicycles kettles lamps boots tractors radios windows chairs".split()
FACILITIES = "library|bridge|swimming pool|school|bus station|park".split("|")
STORMS = "rain storms winds flooding snow hail".split()
FINDS = "beetle moss fish frog fungus worm".split()
PLACES = "the northern hills|a flooded cave|the old harbour|the southern marshes|a forest lake".split("|")
JOURNALS = "Field Notes|Natural Letters|Open Biology|The Survey Review".split("|")
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
FILLER = [
    "The weather in {town2} was {sky} for most of the week.",
    "{town2} is known for its old {building} and quiet streets.",
    "Local shops reported a busy weekend as families visited the market.",
    "A spokesman declined to comment on other matters.",
    "The {river} river runs through the centre of {town2}.",
    "Tickets for the summer festival went on sale last month.",
    "Many residents travel to {town2} by train each morning.",
    "Earlier this year the town hosted a {event} that drew visitors from abroad.",
    "The local radio station covered the story live.",
    "Traffic was slow on the main road near the {building}.",
    "Some people said they had not heard the news until later.",
    "The region has a population of about {num3} thousand.",
    "Parking remains a common complaint in the area.",
    "Dogs and cyclists share the path along the {river} river.",
    "A new cafe opened near the {building} on {day2}.",
]
SKY = "grey sunny cold mild windy cloudy".split()
BUILDINGS = "church|mill|castle|market hall|clock tower".split("|")
RIVERS = "Ash Brill Coombe Dove Elder".split()
EVENTS = "music festival|cheese fair|boat race|book fair".split("|")
# Each event: lead variants, fact sentences, a quote, and two highlight lines (all in distinct wording). The first
# highlight line has valid phrasings of two kinds: a vague one, and a factual one that comes in three variants
# differing only in its first words. The vague one is the most frequent single phrasing, so a model trained by
# maximum likelihood writes it when decoding greedily; the factual variants are more frequent together and share
# most of their words, so a summary in the factual phrasing overlaps more with the reference on average (ROUGE).
EVENTS_TEMPLATES = [
    {"lead": ["{company} said on {day} that its profit rose to {amount} million crowns last year.",
              "Shares in {company} climbed on {day} after the firm reported a profit of {amount} million crowns."],
     "facts": ["Sales grew by {pct} percent, helped by strong demand for its {product}.",
               "The company, based in {town}, was founded in {year} and employs {num} people."],
     "quote": "\"This has been a very good year for all of us,\" said chief executive {person}.",
     "high": [["A good year for {company}, its boss says.",
               "{variant} {company} of {town} makes {amount} million crowns profit."],
              "Sales up {pct} percent, chief executive {person} says."], "variants": ["Firm", "Local firm", "The firm"]},
    {"lead": ["The {team} beat the {team2} {a} - {b} in {town} on {day}.",
              "A late goal on {day} helped the {team} to a {a} - {b} win over the {team2} in {town}."],
     "facts": ["{person} scored {k} of the goals for the home side.",
               "A crowd of {num} thousand watched the match."],
     "quote": "\"We played with real heart tonight,\" said coach {person2}.",
     "high": [["What a night for the {team} and their fans.",
               "{variant} {person} scores {k} as {team} defeat {team2} {a} - {b}."],
              "Coach {person2} praises his players after the win in {town}."],
     "variants": ["Striker", "Home striker", "The striker"]},
    {"lead": ["The council of {town} voted on {day} to spend {amount} million crowns on a new {facility}.",
              "Councillors in {town} have approved a new {facility} that will cost {amount} million crowns."],
     "facts": ["The plan was passed by {num} votes to {num2}.",
               "Work on the {facility} is due to start in {year}."],
     "quote": "\"People here have waited a long time for this,\" said mayor {person}.",
     "high": [["A long wait ends for the people of {town}.",
               "{variant} {town} backs {amount} million crowns plan for new {facility}."],
              "Building starts in {year}, mayor {person} says."], "variants": ["Council in", "Town council in", "The council in"]},
    {"lead": ["Heavy {storm} hit {town} on {day}, closing roads and schools across the region.",
              "Roads and schools in {town} were closed on {day} as heavy {storm} swept the area."],
     "facts": ["Forecasters said {num} millimetres of rain fell in just {hours} hours.",
               "About {num2} thousand homes lost power, according to {company}."],
     "quote": "\"We have not seen anything like this since {year},\" said local farmer {person}.",
     "high": [["Stormy day brings {town} to a halt.",
               "{variant} {num} millimetres of rain fall on {town} in {hours} hours."],
              "{company} says {num2} thousand homes lost power."], "variants": ["Record", "New record", "Another record"]},
    {"lead": ["Researchers at the University of {town} say they have found a new kind of {find} in {place}.",
              "A new kind of {find} has been found in {place} by a team from the University of {town}."],
     "facts": ["The team studied {num} samples over {span} years.",
               "The finding was published in the journal {journal} in {year}."],
     "quote": "\"It was a real surprise to everyone in the lab,\" said professor {person}.",
     "high": [["A big surprise for the lab at {town}.",
               "{variant} scientists in {town} discover new {find} after {span} years of work."],
              "Professor {person} led the team, which studied {num} samples."],
     "variants": ["University", "Local university", "The university"]},
    {"lead": ["{person} was elected mayor of {town} on {day} after a close race against {person2}.",
              "Voters in {town} chose {person} as their new mayor on {day}, ending a long campaign."],
     "facts": ["{person} won {share} percent of the vote.",
               "Turnout was {num} percent, the highest since {year}."],
     "quote": "\"This victory belongs to every family in {town},\" said {person}.",
     "high": [["A new face at the top in {town}.",
               "{variant} {person} beats {person2} to become mayor of {town}."],
              "Winner takes {share} percent of the vote as turnout hits {num} percent."],
     "variants": ["Candidate", "Local candidate", "The candidate"]},
]


DEMO_PHRASING_WEIGHTS = (0.34, 0.22, 0.22, 0.22)  # first highlight line: P(vague), then P(each factual variant)
DEMO_ARTICLE_WORDS = (30, 55)  # fillers are added below a length drawn from here (lead+facts+quote: 41-60 words)
# the years of the world, each one word of the tiny vocabulary. With 30 (2000-2029), the starts of seeds 0/1/2 wrote
# a wrong year in 29/110/85 of 300 training summaries that hold one; with these 10, in 126/7/0
DEMO_YEARS = (2015, 2024)


def demo_slots(rng: random.Random) -> dict:
    """Draw one consistent set of slot values (names, places, numbers) for an article."""
    first, last = rng.sample(FIRST, 2), rng.sample(LAST, 2)
    towns, teams, a = rng.sample(TOWNS, 2), rng.sample(TEAMS, 2), rng.randint(1, 6)
    num = rng.randint(20, 49)
    return {"person": f"{first[0]} {last[0]}", "person2": f"{first[1]} {last[1]}", "town": towns[0],
            "town2": towns[1], "company": rng.choice(COMPANIES), "team": teams[0], "team2": teams[1],
            "a": a, "b": rng.randint(0, a - 1), "k": rng.randint(1, a), "num": num,
            "num2": rng.randint(2, num - 1), "num3": rng.randint(10, 99), "pct": rng.randint(2, 30),
            "share": rng.randint(51, 69), "hours": rng.randint(2, 12), "span": rng.randint(2, 9),
            "amount": rng.randint(2, 30), "year": rng.randint(*DEMO_YEARS), "day": rng.choice(DAYS),
            "day2": rng.choice(DAYS), "product": rng.choice(PRODUCTS), "facility": rng.choice(FACILITIES),
            "storm": rng.choice(STORMS), "find": rng.choice(FINDS), "place": rng.choice(PLACES),
            "journal": rng.choice(JOURNALS), "sky": rng.choice(SKY), "building": rng.choice(BUILDINGS),
            "river": rng.choice(RIVERS), "event": rng.choice(EVENTS)}


def demo_row(rng: random.Random) -> dict:
    """Build one article (lead first, then shuffled facts/quote/filler) and its 2-line highlights (a random phrasing)."""
    event, slots = rng.choice(EVENTS_TEMPLATES), demo_slots(rng)
    body = [s.format(**slots) for s in event["facts"] + [event["quote"]]]
    lead = rng.choice(event["lead"]).format(**slots)
    target_words = rng.randint(*DEMO_ARTICLE_WORDS)
    for filler in (f.format(**slots) for f in rng.sample(FILLER, len(FILLER))):
        words = len(" ".join([lead] + body).split())
        if words >= target_words or words + len(filler.split()) > DEMO_ARTICLE_WORDS[1] + 5:
            break
        body.append(filler)
    rng.shuffle(body)
    choice = rng.choices(range(len(DEMO_PHRASING_WEIGHTS)), weights=DEMO_PHRASING_WEIGHTS)[0]
    first = event["high"][0][0] if choice == 0 else event["high"][0][1].replace("{variant}", event["variants"][choice - 1])
    return {"article": " ".join([lead] + body), "highlights": "\n".join(h.format(**slots) for h in [first, event["high"][1]])}


def unique_demo_rows(seed: int, exclude: frozenset = frozenset()) -> Iterator[dict]:
    """Yield rows with distinct articles (skipping any in `exclude`) from a seeded private RNG."""
    rng, seen = random.Random(seed), set(exclude)
    while True:
        row = demo_row(rng)
        if row["article"] not in seen:
            seen.add(row["article"])
            yield row


def make_synthetic_corpus(num_articles: int, seed: int) -> list[dict]:
    """Return `num_articles` deterministic {"article", "highlights"} rows for the given seed."""
    rows = unique_demo_rows(seed)
    return [next(rows) for _ in range(num_articles)]


def write_demo_splits(directory: str, num_train: int, num_eval: int, seed: int) -> tuple[str, str]:
    """Write disjoint train.jsonl / validation.jsonl (different seeds, deduplicated); return their paths."""
    os.makedirs(directory, exist_ok=True)
    train = make_synthetic_corpus(num_train, seed)
    held_out = unique_demo_rows(seed + 1_000_003, exclude=frozenset(r["article"] for r in train))
    splits = {"train.jsonl": train, "validation.jsonl": [next(held_out) for _ in range(num_eval)]}
    paths = []
    for name, rows in splits.items():
        paths.append(os.path.join(directory, name))
        with open(paths[-1], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return paths[0], paths[1]


def build_word_tokenizer(texts: list[str], directory: str, model_type: str = "bart"):
    """Train a lowercase word-level tokenizer offline, save it for `model_type` ("bart"/"t5"), reload via AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    is_bart = model_type == "bart"
    specials = ["<s>", "<pad>", "</s>", "<unk>"] if is_bart else ["<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs become separate tokens
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # space-join, then glue " ." / " ," back
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials))
    eos = ("</s>", tok.token_to_id("</s>"))
    if is_bart:
        bos = ("<s>", tok.token_to_id("<s>"))
        post = TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[bos, eos])
    else:
        post = TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[eos])
    tok.post_processor = post
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", bos_token="<s>" if is_bart else None)
    fast.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def build_demo_model(directory: str, tokenizer, seed: int) -> None:
    """A tiny BART (2+2 layers, d=128, no dropout) from a config, saved like a hub checkpoint.

    Its embeddings are untied: encoder, decoder and LM head each have their own (BART's `shared` one is then
    unused; under torchrun the start check freezes it). Tied, SFT pulled the six firm names together (cosines up
    to 0.98 on seeds 0 and 1), so the model could not copy a firm and swapped them before any GRPO step."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    model_config = BartConfig(
        vocab_size=len(tokenizer), d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id, forced_bos_token_id=tokenizer.bos_token_id, dropout=0.0,
        tie_word_embeddings=False)
    BartForConditionalGeneration(model_config).save_pretrained(directory)


def prepare_demo(config: Config, dist: "Distributed", log, given: set[str] = frozenset()) -> Config:
    """Write the synthetic splits and the tiny model into output_dir/demo (a resumed run keeps them), and point
    the config at them (except where --model_name, --train_file or --validation_file were given)."""
    directory = os.path.join(config.output_dir, "demo")
    model_dir = os.path.join(directory, "model")
    resuming = config.resume and os.path.exists(os.path.join(model_dir, "config.json"))
    if dist.is_main and not resuming:  # a fresh run writes them anew, so they always follow its seed
        log(f"demo: writing synthetic articles and a tiny BART to {directory}")
        train_file, _ = write_demo_splits(directory, DEMO_TRAIN_ARTICLES, config.eval_samples, config.seed)
        with open(train_file, encoding="utf-8") as file:
            rows = [json.loads(line) for line in file]
        tokenizer = build_word_tokenizer([r["article"] for r in rows] + [r["highlights"] for r in rows], model_dir)
        build_demo_model(model_dir, tokenizer, config.seed)
    dist.barrier()
    return pointed_at_demo_files(config, given)


def pointed_at_demo_files(config: Config, given: set[str] = frozenset()) -> Config:
    """The config with model_name, train_file and validation_file at the demo's files in output_dir/demo (except
    where they were given)."""
    directory = os.path.join(config.output_dir, "demo")
    paths = dict(model_name=os.path.join(directory, "model"), train_file=os.path.join(directory, "train.jsonl"),
                 validation_file=os.path.join(directory, "validation.jsonl"))
    return dataclasses.replace(config, **{k: v for k, v in paths.items() if k not in given})


COMPARISON_KEYS = (*ROUGE_KEYS, "gen_length", "ref_length", "distinct_fraction", "entity_recall", "invented_entities",
                   "invented_summaries", "repeated_trigrams", "punctuation_fraction", "trailing_punctuation",
                   "top_summary_share")
DEMO_REPORT_KEYS = ("curves", "grpo_minus_control", "grpo_minus_start", "control_minus_start", "best_sft_rougeL",
                    "grpo_minus_best_sft_rougeL", "invented_fact_penalty", "grpo_fact_penalty_minus_grpo",
                    "grpo_fact_penalty_minus_control")  # what report_demo writes beside the rows and steps
DEMO_ROWS = ("start", "control", "grpo", "grpo_fact_penalty")  # the rows of the demo's table
# lambda of the grpo_fact_penalty row, chosen on training articles only: the seed-0 start sampled G=8 summaries (T=0.7)
# for 200 training articles its 150 GRPO steps never draw; 0.8 is the smallest of 0.025, 0.05, ..., 3.2 at which no
# group's top-reward sample (where GRPO moves the policy) has an invented fact if another sample has none (0.4: 6 do)
DEMO_FACT_PENALTY = 0.8
FACT_PENALTY_DIR = "fact_penalty"  # the grpo_fact_penalty row's run, inside the demo's output_dir
CURVE_KEYS = ("rougeL", "entity_recall", "distinct_fraction")  # per evaluation in comparison.json's curves


def demo_control(config: Config, train_rows, held_out, device, dist: "Distributed",
                 log) -> tuple[dict, list[dict], list[dict]]:
    """The control row of the demo: the model GRPO started from (output_dir/reference), trained max_steps more
    SFT steps instead of GRPO (sft_warmup as configured, with a fresh optimizer and schedule; the data order
    starts again, so these are more epochs over the same training set), then evaluated like the GRPO model.
    Returns its metrics, per-article records (for the paired comparison with GRPO) and its held-out evaluations
    every eval_every steps, as GRPO's."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    start_dir = os.path.join(config.output_dir, "reference")
    policy = AutoModelForSeq2SeqLM.from_pretrained(start_dir, dtype=torch.float32).to(device)
    tokenizer = AutoTokenizer.from_pretrained(start_dir)
    torch.manual_seed(config.seed)  # any randomness of the extra SFT steps (dropout, if the model has any)
    control = dataclasses.replace(config, sft_steps=config.max_steps, sft_eval_every=config.eval_every)
    curve = sft_warmup(GroupedSeq2Seq(policy), policy, tokenizer, train_rows, control, device, dist, log, held_out)
    metrics, _, per_article = evaluate(policy, tokenizer, held_out, config, device, dist)
    log("control (start + more SFT): " + format_scores(metrics))
    return metrics, per_article, curve


def demo_fact_penalty(config: Config, log) -> None:
    """The grpo_fact_penalty row of the demo: the same start (output_dir/reference) and the same max_steps GRPO
    steps (articles, seed, settings) as the grpo row, with --invented_fact_penalty=DEMO_FACT_PENALTY, run as a plain
    GRPO run in output_dir/fact_penalty (its eval.jsonl and eval_predictions.jsonl feed report_demo)."""
    directory = os.path.join(config.output_dir, FACT_PENALTY_DIR)
    penalized = dataclasses.replace(config, output_dir=directory, model_name=os.path.join(config.output_dir, "reference"),
                                    sft_steps=0, sft_eval_every=0, demo=False, demo_seeds=1,
                                    invented_fact_penalty=DEMO_FACT_PENALTY, overwrite_output_dir=True,
                                    resume=config.resume and bool(checkpoint_files(directory)))
    log(f"grpo_fact_penalty: the start + {config.max_steps} GRPO steps with --invented_fact_penalty="
        f"{DEMO_FACT_PENALTY}, in {directory}")
    code = train(penalized)
    if code != 0:  # stopped by Ctrl-C or SIGTERM: --resume=True continues it
        raise SystemExit(code)


def report_demo(config: Config, control: dict, control_per_article: list[dict], control_curve: list[dict]) -> dict:
    """Write comparison.json: the start, control, grpo and grpo_fact_penalty rows and steps; the held-out curves
    (along SFT up to the start, then along the control's and both GRPO runs' steps); the paired bootstrap on the
    same articles of GRPO minus the control, GRPO minus the start, the control minus the start (does more SFT
    still help?), and grpo_fact_penalty minus GRPO and minus the control. Print the table, the curves and three
    held-out examples."""
    def read(name):
        with open(os.path.join(config.output_dir, name), encoding="utf-8") as file:
            return [json.loads(line) for line in file]

    evals, examples = read("eval.jsonl"), read("eval_examples.jsonl")
    penalized_evals = read(os.path.join(FACT_PENALTY_DIR, "eval.jsonl"))
    before, after = evals[0], evals[-1]
    rows = {"start": before, "control": control, "grpo": after, "grpo_fact_penalty": penalized_evals[-1]}
    comparison = {name: {key: row[key] for key in COMPARISON_KEYS} for name, row in rows.items()}
    predictions = read("eval_predictions.jsonl")
    grpo_per_article = [r for r in predictions if r["step"] == after["step"]]
    start_per_article = [r for r in predictions if r["step"] == before["step"]]
    penalized_per_article = [r for r in read(os.path.join(FACT_PENALTY_DIR, "eval_predictions.jsonl"))
                             if r["step"] == after["step"]]

    def point(step, metrics):
        return {"step": step, **{key: metrics[key] for key in CURVE_KEYS}}

    scored_during_sft = os.path.exists(os.path.join(config.output_dir, "sft_eval.jsonl"))  # sft_eval_every < sft_steps
    sft_evaluations = read("sft_eval.jsonl") if scored_during_sft else []
    curves = {"sft": [point(r["sft_step"], r) for r in sft_evaluations] + [point(config.sft_steps, before)],
              "control": [point(0, before)] + [point(r["sft_step"], r) for r in control_curve]
              + [point(after["step"], control)],
              "grpo": [point(e["step"], e) for e in evals],
              "grpo_fact_penalty": [point(e["step"], e) for e in penalized_evals]}
    best_sft = max(p["rougeL"] for p in curves["sft"] + curves["control"])  # picked on held-out: favours SFT
    comparison.update(steps=after["step"], sft_steps=config.sft_steps, seed=config.seed,
                      invented_fact_penalty=DEMO_FACT_PENALTY,  # of the grpo_fact_penalty row
                      torch_threads=torch.get_num_threads(), curves=curves, best_sft_rougeL=best_sft,
                      grpo_minus_best_sft_rougeL=after["rougeL"] - best_sft,
                      grpo_minus_control=paired_change(control_per_article, grpo_per_article, config.seed),
                      grpo_minus_start=paired_change(start_per_article, grpo_per_article, config.seed),
                      control_minus_start=paired_change(start_per_article, control_per_article, config.seed),
                      grpo_fact_penalty_minus_grpo=paired_change(grpo_per_article, penalized_per_article, config.seed),
                      grpo_fact_penalty_minus_control=paired_change(control_per_article, penalized_per_article,
                                                                    config.seed))
    write_json_atomic(os.path.join(config.output_dir, "comparison.json"), comparison)
    write_jsonl_atomic(os.path.join(config.output_dir, "control_predictions.jsonl"), control_per_article)  # audit
    plot_comparison(config.output_dir, curves, config.sft_steps)
    print(f"\nheld-out greedy decoding on {config.eval_samples} synthetic articles, seed {config.seed}: start = "
          f"{config.sft_steps} SFT steps; control = start + {after['step']} SFT steps; grpo = start + "
          f"{after['step']} GRPO steps; grpo_fact_penalty = the same with --invented_fact_penalty={DEMO_FACT_PENALTY}")
    print_comparison({name: {key: [value] for key, value in row.items()} for name, row in comparison.items()
                      if name in rows})
    print("held-out ROUGE-L along SFT (step: score; the last is the start): "
          + ", ".join(f"{p['step']}: {p['rougeL']:.4f}" for p in curves["sft"]))
    for name in ("control", "grpo", "grpo_fact_penalty"):
        print(f"held-out ROUGE-L along the {name}'s steps after the start: "
              + ", ".join(f"{p['step']}: {p['rougeL']:.4f}" for p in curves[name]))
    print(f"best held-out ROUGE-L of any SFT checkpoint above (chosen on these articles, which favours SFT): "
          f"{best_sft:.4f}; grpo minus it: {after['rougeL'] - best_sft:+.4f}")
    for name in ("grpo_minus_control", "grpo_minus_start", "control_minus_start", "grpo_fact_penalty_minus_grpo",
                 "grpo_fact_penalty_minus_control"):
        change = comparison[name]
        print(f"{name}, paired bootstrap over the same {len(grpo_per_article)} articles, {CONFIDENCE_LEVEL:.0%} CI: "
              + "  ".join(f"{key} {change[f'{key}_change']:+.4f} [{change[f'{key}_change_ci_low']:+.4f}, "
                          f"{change[f'{key}_change_ci_high']:+.4f}]" for key in ("rougeL", "rouge1")))
    first = [e for e in examples if e["step"] == before["step"]]
    last = [e for e in examples if e["step"] == after["step"]]
    penalized = [e for e in read(os.path.join(FACT_PENALTY_DIR, "eval_examples.jsonl")) if e["step"] == after["step"]]
    for number, (old, new, fact) in enumerate(zip(first, last, penalized), start=1):
        print(f"\nexample {number}: {old['article'][:160]}...")
        print(f"  reference:    {old['reference']!r}")
        print(f"  before GRPO:  {old['prediction']!r}")
        print(f"  after GRPO:   {new['prediction']!r}")
        print(f"  with penalty: {fact['prediction']!r}")
    return comparison


def plot_comparison(output_dir: str, curves: dict[str, list[dict]], sft_steps: int) -> str:
    """comparison.png: held-out ROUGE-L and entity recall against training steps: along SFT up to the start, then
    the control (more SFT) and GRPO branching from it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for axis, key, title in zip(axes, ("rougeL", "entity_recall"), ("held-out greedy ROUGE-L F1",
                                                                   "entity recall (reference names and numbers)")):
        axis.plot([p["step"] for p in curves["sft"]], [p[key] for p in curves["sft"]], marker="o", color="grey",
                  label="SFT (to the start)")
        for name, color in (("control", "tab:blue"), ("grpo", "tab:red"), ("grpo_fact_penalty", "tab:green")):
            axis.plot([sft_steps + p["step"] for p in curves[name]], [p[key] for p in curves[name]], marker="o",
                      color=color, label=f"{name}: start + {'SFT' if name == 'control' else 'GRPO'} steps")
        axis.axvline(sft_steps, color="black", linewidth=0.8, linestyle=":")
        axis.set(title=title, xlabel="training steps (SFT, then control or GRPO)")
    axes[0].legend()
    return save_figure(figure, os.path.join(output_dir, "comparison.png"))


def print_comparison(rows: dict[str, dict[str, list[float]]]) -> None:
    """One line per measure, one column per row (start, control, grpo, grpo_fact_penalty): the mean, and +-half the
    range over seeds when there are several."""
    print(f"{'measure':<22}" + "".join(f"{name:>18}" for name in rows))
    for key in COMPARISON_KEYS:
        cells = []
        for values in (rows[name][key] for name in rows):
            spread = f" +-{(max(values) - min(values)) / 2:.4f}" if len(values) > 1 else ""
            cells.append(f"{np.mean(values):.4f}{spread}")
        print(f"{key:<22}" + "".join(f"{cell:>18}" for cell in cells))
    for name, label in (("grpo", "grpo"), ("grpo_fact_penalty", "fact_penalty")):
        gaps = [g - c for g, c in zip(rows[name]["rougeL"], rows["control"]["rougeL"])]
        print(f"{f'rougeL {label} - control':<22}{np.mean(gaps):>+18.4f} (per seed: "
              f"{', '.join(f'{g:+.4f}' for g in gaps)})")


def check_finished_demo_seed(output_dir: str, config: Config) -> None:
    """A finished seed that --resume reads back must come from the same flags (max_steps and eval_every included:
    they set the comparison's N and its curves) and from this script's report."""
    with open(os.path.join(output_dir, RUN_CONFIG_FILE), encoding="utf-8") as file:
        changes, _ = changed_on_resume(json.load(file), config, RESUME_BOOKKEEPING_FIELDS - {"max_steps", "eval_every"})
    with open(os.path.join(output_dir, "comparison.json"), encoding="utf-8") as file:
        comparison = json.load(file)
    missing = [key for key in DEMO_REPORT_KEYS if key not in comparison]
    missing += [f"{row}.{key}" for row in DEMO_ROWS for key in COMPARISON_KEYS if key not in comparison.get(row, {})]
    if comparison.get("invented_fact_penalty", DEMO_FACT_PENALTY) != DEMO_FACT_PENALTY:
        changes.append(f"the grpo_fact_penalty row's lambda {comparison['invented_fact_penalty']!r}, not "
                       f"{DEMO_FACT_PENALTY!r}")
    if changes:
        problem = f"it was run with other flags ({'; '.join(changes)})"
    elif missing:
        problem = f"its comparison.json lacks {', '.join(missing)} (an older version of this script wrote it)"
    else:
        return
    raise ConfigError(f"--resume=True reads {output_dir} back as finished, but {problem}; run the seeds again with "
                      "--overwrite_output_dir=True instead of --resume=True")


def files_to_open(config: Config) -> str:
    """The last line of a run: the files a user should open."""
    out = config.output_dir
    if config.demo:
        return (f"open: {out}/comparison.json (the table, curves and paired intervals), {out}/comparison.png (the "
                f"curves), {out}/eval_examples.jsonl (summaries before and after GRPO)")
    if config.max_steps == 0:
        return f"open: {out}/final (the model){f', {out}/eval.jsonl (held-out scores)' if config.eval_samples else ''}"
    held_out = f"{out}/eval.jsonl (held-out scores), {out}/best (the best model so far), " if config.eval_samples else ""
    return (f"open: {out}/curves.png (reward, KL, held-out ROUGE), {held_out}{out}/metrics.jsonl (every step), "
            f"{out}/final (the model)")


def finished_demo(config: Config, given: set[str]) -> int:
    """--demo --resume=True on a finished demo: check it was run with these flags, name its files, exit 0."""
    check_finished_demo_seed(config.output_dir, pointed_at_demo_files(config, given))
    note(f"the demo in {config.output_dir} is finished; nothing to resume. {files_to_open(config)}")
    return 0


def run_demo_seeds(config: Config, given: set[str]) -> int:
    """--demo --demo_seeds=n: the demo for seeds seed..seed+n-1, each in output_dir/seed_N; then the table of
    means and spreads over seeds, also written to output_dir/comparison_seeds.json."""
    summary_file = os.path.join(config.output_dir, "comparison_seeds.json")
    if os.path.exists(summary_file) and not (config.resume or config.overwrite_output_dir):
        raise ConfigError(f"{config.output_dir} holds an earlier --demo_seeds run ({summary_file}); continue "
                          "it with --resume=True, replace it with --overwrite_output_dir=True, or pick another folder")
    runs = []  # (output_dir, config, finished) per seed; --resume reads finished seeds back, continues a stopped one
    for seed in range(config.seed, config.seed + config.demo_seeds):
        output_dir = os.path.join(config.output_dir, f"seed_{seed}")
        finished = config.resume and os.path.exists(os.path.join(output_dir, "comparison.json"))
        one = dataclasses.replace(config, seed=seed, demo_seeds=1, output_dir=output_dir,
                                  resume=config.resume and bool(checkpoint_files(output_dir)))
        if finished:  # checked before any seed trains, so a mismatch stops the run at once
            check_finished_demo_seed(output_dir, pointed_at_demo_files(one, given))
        runs.append((output_dir, one, finished))
    results = []
    for output_dir, one, finished in runs:
        if not finished:
            code = train(one, given)
            if code != 0:
                return code
        with open(os.path.join(output_dir, "comparison.json"), encoding="utf-8") as file:
            results.append(json.load(file))
    rows = {name: {key: [r[name][key] for r in results] for key in COMPARISON_KEYS} for name in DEMO_ROWS}
    best_sft_gaps = [r["grpo_minus_best_sft_rougeL"] for r in results]
    summary = {name: {key: {"mean": float(np.mean(v)), "min": min(v), "max": max(v), "values": v}
                      for key, v in row.items()} for name, row in rows.items()}
    summary.update(seeds=[r["seed"] for r in results], steps=results[0]["steps"], sft_steps=results[0]["sft_steps"],
                   torch_threads=torch.get_num_threads(),
                   grpo_minus_control=[r["grpo_minus_control"] for r in results],  # per seed, paired bootstrap
                   control_minus_start=[r["control_minus_start"] for r in results],
                   grpo_fact_penalty_minus_grpo=[r["grpo_fact_penalty_minus_grpo"] for r in results],
                   grpo_fact_penalty_minus_control=[r["grpo_fact_penalty_minus_control"] for r in results],
                   grpo_minus_best_sft_rougeL=best_sft_gaps)
    write_json_atomic(summary_file, summary)
    print(f"\n{len(results)} seeds ({', '.join(str(r['seed']) for r in results)}): mean +- half the range over seeds; "
          f"{config.eval_samples} held-out articles each; written to {config.output_dir}/comparison_seeds.json")
    print_comparison(rows)
    print(f"{'rougeL grpo - best SFT':<22}{np.mean(best_sft_gaps):>+18.4f} (per seed: "
          f"{', '.join(f'{g:+.4f}' for g in best_sft_gaps)}; best SFT checkpoint chosen on the held-out articles)")
    for r in results:
        print(f"seed {r['seed']}: rougeL, paired {CONFIDENCE_LEVEL:.0%} CI: " + "; ".join(
            f"{name.replace('_minus_', ' - ')} {r[name]['rougeL_change']:+.4f} "
            f"[{r[name]['rougeL_change_ci_low']:+.4f}, {r[name]['rougeL_change_ci_high']:+.4f}]"
            for name in ("grpo_minus_control", "control_minus_start", "grpo_fact_penalty_minus_grpo",
                         "grpo_fact_penalty_minus_control")))
    note(f"open: {summary_file} (the table over seeds), {config.output_dir}/seed_N/comparison.png (each seed's curves)")
    return 0


# --------------------------------------------------------------------------------------------------
# Memory plan: one GRPO step traced on fake tensors, the peak memory of each phase (--estimate_memory)
# --------------------------------------------------------------------------------------------------
MEMORY_HEADROOM = 0.9  # a micro_batch_size fits when its step peak is under this share of the GPU (allocator cache, context)
CUDA_FLOAT32_OPS = frozenset({"layer_norm", "group_norm", "softmax", "log_softmax", "logsumexp", "cumsum", "pow", "rsqrt",
                              "exp", "log", "cross_entropy", "nll_loss", "mse_loss"})  # CUDA autocast: fp32; CPU's: bf16


class MemoryTracker(torch.utils._python_dispatch.TorchDispatchMode):
    """Live and peak bytes of the tensor storages created under it (or handed to track), as CUDA's
    torch.cuda.memory_allocated counts them.

    A storage counts from the op that creates it until its last reference is gone (a weakref finalizer on the
    storage object), rounded up to `block` bytes (CUDA's caching allocator rounds to 512); views share their base's
    storage and count once. Fake tensors hold no values, so with `scalar` set a scalar read (.item(), bool(), int())
    returns it (a bool: False): the sampler never sees every sample ended and runs to max_new_tokens (the worst case).
    """

    def __init__(self, scalar: int | None = None, block: int = 512):
        super().__init__()
        self.scalar, self.block, self.live, self.peak, self.storages = scalar, block, 0, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and self.scalar is not None:
            return False if args[0].dtype == torch.bool else self.scalar
        out = func(*args, **(kwargs or {}))
        self.track(torch.utils._pytree.tree_leaves(out))
        return out

    def track(self, tensors) -> None:
        """Count the storages of these tensors (once each) until they are freed."""
        import weakref

        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and id(storage := tensor.untyped_storage()) not in self.storages:
                size = -(-storage.nbytes() // self.block) * self.block
                self.live += size
                self.peak = max(self.peak, self.live)
                self.storages[id(storage)] = weakref.finalize(storage, self.free, id(storage), size)

    def free(self, key: int, size: int) -> None:
        self.live -= size
        self.storages.pop(key, None)

    @contextlib.contextmanager
    def phase_peak(self, peaks: dict, name):
        """Record in peaks[name] the highest live bytes inside the block (the live bytes at its start included)."""
        self.peak = self.live
        yield
        peaks[name] = max(peaks.get(name, 0), self.peak)


class CudaAutocastFloat32(torch.overrides.TorchFunctionMode):
    """What CUDA's bf16 autocast adds to CPU's: the ops of its float32 list (layer norm, softmax, pow, rsqrt, exp, log,
    logsumexp, cumsum, losses) take float32 inputs. With torch.autocast("cpu", bfloat16), which casts the matrix
    products (linear, matmul, bmm, scaled_dot_product_attention) to bf16 as CUDA's does, a CPU trace allocates what
    a CUDA run would (this torch may have no CUDA: fake CUDA tensors need its device guard)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in CUDA_FLOAT32_OPS and kwargs.get("dtype") is None:
            upcast = lambda x: x.float() if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 else x  # noqa: E731
            args, kwargs = torch.utils._pytree.tree_map(upcast, (args, kwargs))
        return func(*args, **kwargs)


@contextlib.contextmanager
def emulated_cuda_autocast(device: torch.device):
    """autocast(device) of the plan: CUDA's bf16 autocast rules on CPU tensors (CudaAutocastFloat32)."""
    with torch.autocast("cpu", dtype=torch.bfloat16), CudaAutocastFloat32():
        yield


def memory_plan(model_config, config: Config, micro_batch_sizes: list[int], cuda: bool = True) -> dict:
    """Peak allocated bytes of each phase of a GRPO step at config's sizes: {"rollout": n, "steady": n,
    "reference": {micro_batch_size: n}, "update": {micro_batch_size: n}}, each peak with what stays allocated.

    The model is built from its config on fake tensors (FakeTensorMode: shapes and dtypes, no memory, no weights
    read), and one step is run through the script's own functions (sample_completions, sequence_logprobs_no_grad,
    grpo_update) with AdamW: a first update (on a rollout of zeros) allocates AdamW's state and the gradients, the
    second step is measured, every summary at max_new_tokens and every article at max_source_length; with
    --compile_sampler, through StaticCacheDecoderStep's buffers (eager: the same memory as compiled, CUDA graph pools
    aside). MemoryTracker counts the live storages. cuda=True: under CUDA's bf16 autocast (emulated on CPU), as a
    CUDA run; False: no autocast, as a CPU run.
    """
    import unittest.mock

    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForSeq2SeqLM

    device, batch, group = torch.device("cpu"), config.batch_size, config.group_size
    tracker, peaks = MemoryTracker(config.max_new_tokens, 512 if cuda else 1), {"reference": {}, "update": {}}
    patched = unittest.mock.patch.object(sys.modules[__name__], "autocast", emulated_cuda_autocast) if cuda \
        else contextlib.nullcontext()
    with FakeTensorMode(), tracker, patched, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft and transformers warn about fake-tensor details
        policy = AutoModelForSeq2SeqLM.from_config(model_config, dtype=torch.float32)
        set_grpo_mode(policy, config)
        reference = AutoModelForSeq2SeqLM.from_config(model_config, dtype=torch.float32).eval()  # frozen_copy's size
        reference_forward = GroupedSeq2Seq(reference.requires_grad_(False))  # (a deepcopy leaves the fake mode)
        policy_forward = GroupedSeq2Seq(policy)
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=config.learning_rate,
                                      weight_decay=config.weight_decay, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        input_ids = torch.full((batch, config.max_source_length), 5, dtype=torch.long)
        attention_mask = torch.ones_like(input_ids)
        eos = model_config.eos_token_id if model_config.eos_token_id is not None else 1
        step_function = StaticCacheDecoderStep(config.max_new_tokens, max_source_length=config.max_source_length) \
            if config.compile_sampler else decoder_step  # compiled or not: the same buffers
        for step, sizes in ((0, [config.micro_batch_size]), (1, micro_batch_sizes)):  # 0: AdamW's state
            sequences = torch.zeros(batch * group, 1 + config.max_new_tokens, dtype=torch.long)
            with tracker.phase_peak(peaks, "rollout"), autocast(device), eval_mode(policy):
                if step == 1:
                    sequences, _ = sample_completions(policy, input_ids, attention_mask, group, config.max_new_tokens,
                                                      eos, 0, config.temperature, config.top_p, with_logprobs=False,
                                                      step_function=step_function)
            completion_ids = sequences[:, 1:]
            rollout = Rollout(input_ids, attention_mask, sequences[:, :-1], completion_ids,
                              torch.ones(completion_ids.shape), torch.zeros(batch * group))
            for size in sizes:
                sized = dataclasses.replace(config, micro_batch_size=size)
                with tracker.phase_peak(peaks["reference"] if step else {}, size):
                    rollout.ref_logprobs = sequence_logprobs_no_grad(reference_forward, rollout, sized, device)
                    if config.num_iterations > 1:
                        rollout.old_logprobs = sequence_logprobs_no_grad(policy_forward, rollout, sized, device)
                with tracker.phase_peak(peaks["update"] if step else {}, size):
                    grpo_update(policy_forward, optimizer, scheduler, rollout, sized, device, PhaseTimer(device))
            del rollout, sequences, completion_ids
        peaks["steady"] = tracker.live  # weights, pi_ref, AdamW's state, the gradients kept until the next update
    return peaks


def estimate_memory(config: Config) -> int:
    """--estimate_memory: print the GPU memory a GRPO step needs at the configured sizes, per phase and per
    micro_batch_size, and the largest micro_batch_size that fits --gpu_memory_gb; reads the model's config only."""
    from transformers import AutoConfig

    name = os.path.expanduser(config.model_name)
    try:
        model_config = AutoConfig.from_pretrained(name, trust_remote_code=config.trust_remote_code)
    except Exception as error:
        raise UserError(f"could not load the config of {name!r} ({str(error).splitlines()[0]})") from None
    cuda = config.device != "cpu"
    total = config.batch_size * config.group_size
    sizes = sorted({config.group_size * 2 ** k for k in range(12) if config.group_size * 2 ** k < total}
                   | {total, config.micro_batch_size})
    peaks = memory_plan(model_config, config, sizes, cuda)
    gb, budget = 1e9, config.gpu_memory_gb * MEMORY_HEADROOM
    print(f"memory plan: {config.model_name}, B={config.batch_size} G={config.group_size}, {config.max_source_length} "
          f"source and {config.max_new_tokens} new tokens, {'CUDA bf16 autocast' if cuda else 'CPU float32'}"
          f"{', --compile_sampler' if config.compile_sampler else ''} (allocated GB, fake tensors: an estimate)")
    print(f"steady state (weights, pi_ref, AdamW, gradients) {peaks['steady'] / gb:8.2f}")
    print(f"rollout peak (sampling)                          {peaks['rollout'] / gb:8.2f}")
    print(f"{'micro_batch_size':>16} {'reference':>10} {'update':>10} {'step peak':>10}  fits {config.gpu_memory_gb:g} GB")
    fitting = []
    for size in sizes:
        step_peak = max(peaks["rollout"], peaks["reference"][size], peaks["update"][size])
        fitting += [size] if step_peak <= budget * gb else []
        print(f"{size:>16} {peaks['reference'][size] / gb:>10.2f} {peaks['update'][size] / gb:>10.2f} "
              f"{step_peak / gb:>10.2f}  {'yes' if step_peak <= budget * gb else 'no'}")
    print(f"largest micro_batch_size that fits {MEMORY_HEADROOM:.0%} of {config.gpu_memory_gb:g} GB: "
          f"{max(fitting) if fitting else 'none (lower --batch_size, --max_source_length or use --lora_r)'}")
    return 0


# --------------------------------------------------------------------------------------------------
# Benchmark: a fixed, seeded workload timed phase by phase (--benchmark)
# --------------------------------------------------------------------------------------------------
BENCHMARK_CONFIG = dict(output_dir="runs/benchmark", max_steps=10, sft_steps=0, sft_eval_every=0)  # the demo's setup
BENCHMARK_WARMUP_STEPS = 2  # steps run before timing starts (allocator and caches warm up)
BART_VOCABULARY_SIZE = 50265  # vocabulary at which the two log-prob paths are compared


def best_time_ms(function, repeats: int = 5) -> float:
    """The fastest of `repeats` calls of function(), in milliseconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def interleaved_best_ms(functions: dict, repeats: int = 3) -> dict[str, float]:
    """The fastest call of each function in milliseconds, the functions called in turn (A B A B ...), so that a
    change in machine load during the measurement hits all of them alike."""
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            times[name].append(best_time_ms(function, 1))
    return {name: min(values) for name, values in times.items()}


def time_rouge(pairs: int = 64, group_size: int = 8) -> dict[str, float]:
    """Milliseconds for the reward's ROUGE on B*G = `pairs` (summary, reference) pairs of 55 words (the length
    of CNN/DailyMail highlights), G summaries per reference: ours vs rouge_score."""
    from rouge_score import rouge_scorer

    texts = [" ".join(row["article"].split()[:55]) for row in make_synthetic_corpus(pairs + pairs // group_size, 123)]
    references = [texts[i // group_size] for i in range(pairs)]
    predictions = texts[pairs // group_size:]
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    split = ["\n".join(split_sentences(text)) for text in predictions + references]
    return {"rouge_pairs": pairs, "rouge_ms": best_time_ms(lambda: rouge_f1(predictions, references)),
            "rouge_score_ms": best_time_ms(lambda: [scorer.score(r, p) for p, r in zip(split[:pairs], split[pairs:])])}


@torch.no_grad()
def time_scoring_choices(policy, tokenizer, rows: dict, config: Config, device) -> dict[str, float]:
    """Milliseconds of one scoring pass, each choice against the naive one it replaced, on one rollout."""
    rollout, _ = rollout_step(policy, tokenizer, rows, config, device, PhaseTimer(device))
    grouped, G = GroupedSeq2Seq(policy), config.group_size

    def encoder_once():
        return grouped(rollout.input_ids, rollout.attention_mask, rollout.decoder_input_ids, G)

    def encoder_per_sample():  # the article repeated G times through the encoder
        return policy(input_ids=rollout.input_ids.repeat_interleave(G, 0), decoder_input_ids=rollout.decoder_input_ids,
                      attention_mask=rollout.attention_mask.repeat_interleave(G, 0), use_cache=False).logits

    def cross_attention_per_sample():  # the scoring pass before the shared cross-attention keys/values
        from transformers.modeling_outputs import BaseModelOutput

        hidden = policy.get_encoder()(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask)[0]
        return policy(encoder_outputs=BaseModelOutput(last_hidden_state=hidden.repeat_interleave(G, 0)),
                      attention_mask=rollout.attention_mask.repeat_interleave(G, 0),
                      decoder_input_ids=rollout.decoder_input_ids, use_cache=False).logits

    encoded = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask}
    settings = generation_settings(policy, tokenizer, config, sample=True)
    sampler = lambda: sample_completions(policy, rollout.input_ids, rollout.attention_mask, G,  # noqa: E731
                                         config.max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                         config.temperature, config.top_p, with_logprobs=False)
    with autocast(device):  # before and after this change, side by side
        rollouts = interleaved_best_ms({"rollout_hf_generate_ms": lambda: generate(policy, encoded, settings),
                                        "rollout_our_sampler_ms": sampler})
        rollouts.update(interleaved_best_ms({"score_cross_attention_per_sample_ms": cross_attention_per_sample,
                                             "score_cross_attention_shared_ms": encoder_once}))
    tokens = rollout.completion_ids  # log-probs are timed at BART's vocabulary, where their cost matters
    logits = torch.randn(*tokens.shape, BART_VOCABULARY_SIZE, device=device)
    with autocast(device):
        return {**rollouts, "score_encoder_once_ms": best_time_ms(encoder_once),
                "score_encoder_per_sample_ms": best_time_ms(encoder_per_sample),
                "logprobs_v50k_logsumexp_per_row_ms": best_time_ms(lambda: token_logprobs(logits, tokens)),
                "logprobs_v50k_log_softmax_ms": best_time_ms(
                    lambda: torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1))}


def run_benchmark(config: Config, dist: "Distributed", log) -> int:
    """GRPO steps on the demo's tiny model (untrained, so every sample runs to max_new_tokens) and data."""
    import resource

    device = dist.device
    run = build_run(config, dist, log)  # what train() builds: data, policy, pi_ref, fused AdamW and its schedule
    run.trackers.close()  # the benchmark logs to benchmark.json only
    train_rows, policy, tokenizer = run.train_rows, run.policy, run.tokenizer
    policy_forward, reference_forward, optimizer, scheduler = (run.policy_forward, run.reference_forward,
                                                               run.optimizer, run.scheduler)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    totals = Counter()
    for step in range(BENCHMARK_WARMUP_STEPS + config.max_steps):
        rows = train_rows[batch_indices(step, config.batch_size, len(train_rows), config.seed)]
        numbers = grpo_step(policy, policy_forward, reference_forward, tokenizer, rows, optimizer, scheduler, config,
                            device, run.fact_names)
        if step >= BENCHMARK_WARMUP_STEPS:  # time_update is the sum of forward, backward, optimizer
            totals.update({k: v for k, v in numbers.items() if k.startswith("time_") and k != "time_update"
                           or k in ("seconds", "generated_tokens")})
    seconds = totals.pop("seconds")
    result = {"device": str(device), "steps": config.max_steps, "batch_size": config.batch_size,
              "group_size": config.group_size, "max_new_tokens": config.max_new_tokens,
              "num_iterations": config.num_iterations, "lora_r": config.lora_r,
              "trained_parameters": sum(p.numel() for p in policy.parameters() if p.requires_grad),
              "total_parameters": sum(p.numel() for p in policy.parameters()),
              "steps_per_second": config.max_steps / seconds,
              "articles_per_second": config.max_steps * config.batch_size / seconds,
              "generated_tokens_per_second": totals.pop("generated_tokens") / seconds,
              **{f"share_{k.removeprefix('time_')}": v / seconds for k, v in sorted(totals.items())},
              "peak_cpu_memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    result["threads"] = torch.get_num_threads()
    if device.type == "cuda":
        result["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    result.update(time_scoring_choices(policy, tokenizer, rows, config, device))
    result.update(time_rouge())
    with open(os.path.join(config.output_dir, "benchmark.json"), "w", encoding="utf-8") as file:
        json.dump(result, file, indent=1)
    for key, value in result.items():
        print(f"{key:<30}{value:>14.4f}" if isinstance(value, float) else f"{key:<30}{value!s:>14}")
    note(f"open: {config.output_dir}/benchmark.json (these numbers)")
    return 0


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    try:
        config, given = parse_args(argv)
        go_offline_if_hub_unreachable(config)
        validate_config(config, given)
        if config.eval_only:
            return evaluate_only(config, given)
        if config.demo and config.demo_seeds > 1:
            return run_demo_seeds(config, given)
        if config.benchmark:
            return run_benchmark(*start_process(config, given))
        if config.estimate_memory:
            return estimate_memory(config)
        if config.demo and config.resume and os.path.exists(os.path.join(config.output_dir, "comparison.json")):
            return finished_demo(config, given)
        code = train(config if config.demo else checked_against_model(config, given), given)
        if torch.distributed.is_initialized():  # no process tears the group down while another works (gloo aborts)
            torch.distributed.barrier()
        return code
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
