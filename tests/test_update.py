"""The update: grpo_step and grpo_update on the tiny models (one encoder pass per article, gradients that reach
encoder and decoder, micro-batched == whole batch for every loss type, gradient checkpointing == plain, the token
entropy, truncated and forced tokens left out of the loss, NaN/inf losses skipped), the SFT warm-up, and LoRA through
peft (which layers get adapters, the reference as the same model with its adapters off, adapter dropout off).

Everything runs offline on the tiny models of conftest.py.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from conftest import TINY, build_in_process, data_args, needs_peft, read_jsonl, tiny_policy_and_batch


# --------------------------------------------------------------------------------------------------
# grpo_step: the encoder runs once per article per pass, not once per sample
# --------------------------------------------------------------------------------------------------
def count_encoder_rows(encoder, log: list, phase: list):
    """A forward hook that appends (phase, rows of input_ids) for each encoder call."""

    def hook(module, args, kwargs, output):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        assert input_ids is not None, "the encoder was called without input_ids"
        log.append((phase[0], int(input_ids.shape[0])))

    return encoder.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("model", ["bart", "t5"])
@pytest.mark.parametrize("whole_batch", [True, False], ids=["one-micro-batch", "one-article-per-micro-batch"])
def test_encoder_sees_each_article_once_per_pass(grpo, model, whole_batch, tiny_bart_dir, tiny_t5_dir, data_files,
                                                 monkeypatch):
    model_dir = {"bart": tiny_bart_dir, "t5": tiny_t5_dir}[model]
    B, G = 3, 4
    # num_iterations=2: the old-policy pass runs and the update makes two passes
    config, device, policy, tokenizer, reference, optimizer, scheduler, rows = build_in_process(
        grpo, model_dir, data_files, batch_size=B, group_size=G, micro_batch_size=B * G if whole_batch else G,
        num_iterations=2)
    phase = ["none"]
    rollouts = []

    # Label the phases by wrapping the functions grpo_step calls (it looks them up in the module at call time).
    def labelled(name, function, label=None):
        def wrapper(*args, **kwargs):
            phase[0] = label(*args) if label else name
            try:
                result = function(*args, **kwargs)
            finally:
                phase[0] = "none"
            if name == "generate":
                rollouts.append(result[0])
            return result
        return wrapper

    monkeypatch.setattr(grpo, "rollout_step", labelled("generate", grpo.rollout_step))
    monkeypatch.setattr(grpo, "sequence_logprobs_no_grad", labelled(
        "score", grpo.sequence_logprobs_no_grad, lambda forward, *_: "reference" if forward.model is reference else "old"))
    monkeypatch.setattr(grpo, "grpo_update", labelled("update", grpo.grpo_update))

    policy_calls, reference_calls = [], []
    # Hooks go on after frozen_copy: a deep copy would copy the policy's hook onto the reference too.
    handles = [count_encoder_rows(policy.get_encoder(), policy_calls, phase),
               count_encoder_rows(reference.get_encoder(), reference_calls, phase)]
    try:
        # The step exactly as train() runs it: rollout, reference log-probs, old log-probs, mu updates.
        numbers = grpo.grpo_step(policy, grpo.GroupedSeq2Seq(policy), grpo.GroupedSeq2Seq(reference), tokenizer, rows,
                                 optimizer, scheduler, config, device)
    finally:
        for handle in handles:
            handle.remove()

    (rollout,) = rollouts
    assert rollout.input_ids.shape[0] == B
    assert rollout.completion_ids.shape[0] == B * G and rollout.decoder_input_ids.shape[0] == B * G
    assert rollout.advantages.shape == (B * G,)
    assert torch.all(rollout.decoder_input_ids[:, 0] == policy.config.decoder_start_token_id)
    assert rollout.ref_logprobs.shape == rollout.completion_ids.shape == rollout.old_logprobs.shape
    assert numbers["nonfinite_updates"] == 0
    per_pass = [B] if whole_batch else [1] * B  # rows per encoder call within one pass over the rollout
    assert [rows for p, rows in policy_calls if p == "generate"] == [B]
    assert [rows for p, rows in reference_calls if p == "reference"] == per_pass
    assert [rows for p, rows in policy_calls if p == "old"] == per_pass
    assert [rows for p, rows in policy_calls if p == "update"] == per_pass * config.num_iterations
    assert [p for p, _ in policy_calls] == ["generate"] + ["old"] * len(per_pass) + ["update"] * 2 * len(per_pass)
    assert [p for p, _ in reference_calls] == ["reference"] * len(per_pass)
    assert all(rows != B * G for _, rows in policy_calls + reference_calls)


# --------------------------------------------------------------------------------------------------
# grpo_update: gradients reach encoder and decoder; micro-batching and checkpointing change no gradient
# --------------------------------------------------------------------------------------------------
def rollout_with_advantages(grpo, policy, tokenizer, reference, rows, config, device):
    """A rollout with reference log-probs and fixed non-zero advantages (a random tiny model often earns the same
    zero ROUGE for every sample, which would leave nothing to learn)."""
    rollout, _ = grpo.rollout_step(policy, tokenizer, rows, config, device, grpo.PhaseTimer(device))
    rollout.ref_logprobs = grpo.sequence_logprobs_no_grad(grpo.GroupedSeq2Seq(reference), rollout, config, device)
    rollout.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5] * config.batch_size)
    return rollout


def layer_weights(policy) -> dict[str, torch.nn.Parameter]:
    """One weight matrix of the first encoder layer and of the first decoder layer (BART or T5)."""
    named = dict(policy.named_parameters())
    encoder = next(n for n in named if "encoder" in n and ".0." in n and n.endswith("weight") and named[n].dim() == 2)
    decoder = next(n for n in named if "decoder" in n and ".0." in n and n.endswith("weight") and named[n].dim() == 2)
    return {encoder: named[encoder], decoder: named[decoder]}


@pytest.mark.parametrize("model", ["bart", "t5"])
def test_update_reaches_encoder_and_decoder(grpo, model, tiny_bart_dir, tiny_t5_dir, data_files):
    model_dir = {"bart": tiny_bart_dir, "t5": tiny_t5_dir}[model]
    config, device, policy, tokenizer, reference, optimizer, scheduler, rows = build_in_process(
        grpo, model_dir, data_files, num_iterations=1)
    rollout = rollout_with_advantages(grpo, policy, tokenizer, reference, rows, config, device)
    watched = layer_weights(policy)
    before = {name: p.detach().clone() for name, p in watched.items()}
    encoder_ids = {id(p) for p in policy.get_encoder().parameters()}
    assert sum(id(p) in encoder_ids for p in watched.values()) == 1  # one encoder and one decoder weight

    stats = grpo.grpo_update(grpo.GroupedSeq2Seq(policy), optimizer, scheduler, rollout, config, device,
                             grpo.PhaseTimer(device))

    assert stats["grad_norm"] > 0 and stats.get("nonfinite_updates", 0) == 0
    for name, parameter in watched.items():
        assert parameter.grad is not None, f"no gradient reached {name}"
        assert parameter.grad.abs().sum() > 0, f"zero gradient at {name}"
        assert not torch.equal(parameter.detach(), before[name]), f"{name} did not change"
    for name, parameter in reference.named_parameters():  # pi_ref stays frozen
        assert parameter.grad is None and not parameter.requires_grad, name


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "gspo", "gspo_token"])
def test_micro_batched_update_gives_the_whole_batch_gradients(grpo, loss_type, tiny_bart_dir, data_files):
    """grpo_update with one article per micro-batch (the parts weighted by micro_batch_weight) gives the gradients
    of one pass over the whole batch, for every loss type: the same rollout, old and reference log-probs that
    differ from the policy's (so some tokens are clipped), no gradient clipping, lr 0 (the weights stay put)."""
    assert set(grpo.LOSS_TYPES) == {"grpo", "dapo", "dr_grpo", "gspo", "gspo_token"}  # a new one is listed here too
    gradients, clipped = {}, {}
    for micro_batch_size in (4, 12):  # G, and B * G with B = 3
        config, device, policy, tokenizer, reference, _, _, rows = build_in_process(
            grpo, tiny_bart_dir, data_files, num_iterations=1, loss_type=loss_type, max_grad_norm=1e9,
            micro_batch_size=micro_batch_size)
        torch.manual_seed(0)
        rollout = rollout_with_advantages(grpo, policy, tokenizer, reference, rows, config, device)
        noise = torch.randn(rollout.ref_logprobs.shape, generator=torch.Generator().manual_seed(1))
        rollout.old_logprobs = rollout.ref_logprobs + 0.3 * noise
        optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        stats = grpo.grpo_update(grpo.GroupedSeq2Seq(policy), optimizer, scheduler, rollout, config, device,
                                 grpo.PhaseTimer(device))
        gradients[micro_batch_size] = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        clipped[micro_batch_size] = stats["clip_fraction"]
    assert gradients[4].keys() == gradients[12].keys() and len(gradients[4]) > 0
    assert any(g.abs().sum() > 0 for g in gradients[12].values())
    for name in gradients[12]:
        torch.testing.assert_close(gradients[4][name], gradients[12][name], rtol=1e-4, atol=1e-6, msg=name)
    assert clipped[4] == pytest.approx(clipped[12], abs=1e-6)


@pytest.mark.parametrize("model", ["bart", "t5"])
def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(grpo, model, tiny_bart_dir, tiny_t5_dir,
                                                                         data_files):
    """With --gradient_checkpointing each decoder layer runs again in backward (transformers checkpoints only in
    train mode, so dropout is set to 0 instead of eval()); the gradients equal those of a plain run."""
    model_dir = {"bart": tiny_bart_dir, "t5": tiny_t5_dir}[model]
    gradients, layer_calls = {}, {}
    for checkpointing in (False, True):
        config, device, policy, tokenizer, reference, optimizer, scheduler, rows = build_in_process(
            grpo, model_dir, data_files, num_iterations=1, gradient_checkpointing=checkpointing)
        assert policy.training == checkpointing
        torch.manual_seed(0)
        rollout = rollout_with_advantages(grpo, policy, tokenizer, reference, rows, config, device)
        # a module inside the first decoder layer (transformers checkpoints a layer's forward, so the layer's own
        # hooks stay outside the recompute, while the modules it calls run again)
        inner = policy.get_decoder().layers[0].self_attn if model == "bart" else policy.get_decoder().block[0].layer[0]
        calls = []
        handle = inner.register_forward_hook(lambda module, inputs, output: calls.append(output[0].size(0)))
        for group in optimizer.param_groups:  # keep the weights: compare the gradients of the same parameters
            group["lr"] = 0.0
        grpo.grpo_update(grpo.GroupedSeq2Seq(policy), optimizer, scheduler, rollout, config, device,
                         grpo.PhaseTimer(device))
        handle.remove()
        layer_calls[checkpointing] = calls  # the batch size of each call
        gradients[checkpointing] = [p.grad.clone() for p in policy.parameters() if p.grad is not None]
    # one micro-batch (B articles, B*G samples): without checkpointing, the one-token pass over the B articles that
    # fills the shared cross-attention cache, then the forward; with it (no cache), the forward and its recompute
    samples = config.batch_size * config.group_size
    assert layer_calls == {False: [config.batch_size, samples], True: [samples, samples]}
    assert len(gradients[True]) == len(gradients[False]) > 0
    for with_checkpointing, without in zip(gradients[True], gradients[False]):
        torch.testing.assert_close(with_checkpointing, without, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_turns_layerdrop_off(grpo, tiny_bart_dir, tmp_path):
    """Two scoring passes of the same tokens agree exactly, so the ratio is 1 at mu = 1."""
    from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(tiny_bart_dir)
    model_config = BartConfig(
        vocab_size=len(tokenizer), d_model=16, encoder_layers=4, decoder_layers=4, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id, encoder_layerdrop=0.5, decoder_layerdrop=0.5)
    torch.manual_seed(0)
    BartForConditionalGeneration(model_config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    input_ids = tokenizer(["the council voted on monday"], return_tensors="pt")
    decoder_input_ids = torch.randint(4, len(tokenizer), (4, 10))

    def passes(gradient_checkpointing: bool):
        config = grpo.Config(model_name=str(tmp_path), gradient_checkpointing=gradient_checkpointing, group_size=4)
        policy, _ = grpo.load_policy_and_tokenizer(config, torch.device("cpu"))
        policy.train()  # what set_grpo_mode leaves with gradient checkpointing
        forward = grpo.GroupedSeq2Seq(policy)
        return [forward(input_ids["input_ids"], input_ids["attention_mask"], decoder_input_ids, 4) for _ in range(6)]

    with_layerdrop = passes(gradient_checkpointing=False)  # the test can fail: layerdrop does change the passes
    assert any(not torch.equal(with_layerdrop[0], other) for other in with_layerdrop[1:])
    checkpointed = passes(gradient_checkpointing=True)
    assert all(torch.equal(checkpointed[0], other) for other in checkpointed[1:])


def test_fused_adamw_matches_default_adamw(grpo):
    device = torch.device("cpu")
    assert grpo.fused_adamw(device)
    torch.manual_seed(0)
    start = [torch.randn(7, 5), torch.randn(5)]
    gradients = [[torch.randn_like(p) for p in start] for _ in range(3)]
    results = []
    for fused in (False, True):
        parameters = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = torch.optim.AdamW(parameters, lr=1e-2, weight_decay=0.1, fused=fused)
        for step_gradients in gradients:
            for p, g in zip(parameters, step_gradients):
                p.grad = g.clone()
            optimizer.step()
        results.append(parameters)
    for plain, fused in zip(*results):
        torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6)
        assert not torch.equal(fused, start[0] if fused.dim() == 2 else start[1])


def test_grpo_update_reports_the_mean_token_entropy_of_the_sampling_policy(grpo, tiny_bart_dir, data_files):
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
# what the loss sees: truncated completions, forced first tokens, NaN/inf losses
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


@pytest.mark.parametrize("forced", [True, False])
def test_a_forced_first_token_is_left_out_of_the_loss(grpo, tiny_bart_dir, data_files, forced):
    """With forced_bos_token_id in the checkpoint's generation_config (as in facebook/bart-large-cnn) the first
    generated token is always BOS: it is not scored in the loss or the KL."""
    rows = read_jsonl(data_files[0])[:2]
    batch = {"article": [r["article"] for r in rows], "highlights": [r["highlights"] for r in rows]}
    config = grpo.Config(model_name=str(tiny_bart_dir), group_size=4, batch_size=2, max_new_tokens=8,
                         max_source_length=64, device="cpu")
    policy, tokenizer = grpo.load_policy_and_tokenizer(config, torch.device("cpu"))
    policy.eval().generation_config.forced_bos_token_id = tokenizer.bos_token_id if forced else None
    torch.manual_seed(0)
    rollout, stats = grpo.rollout_step(policy, tokenizer, batch, config, torch.device("cpu"),
                                       grpo.PhaseTimer(torch.device("cpu")))
    first = rollout.completion_ids[:, 0]
    if forced:
        assert (first == tokenizer.bos_token_id).all()
        assert (rollout.mask[:, 0] == 0).all() and (rollout.mask[:, 1] == 1).all()
    else:
        assert (rollout.mask[:, 0] == 1).all()
    assert stats["completion_length"] > 1


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
# SFT warm-up: EOS targets, its schedule, and the held-out curve that changes nothing in the training
# --------------------------------------------------------------------------------------------------
def test_sft_keeps_eos_targets_when_pad_equals_eos(grpo, tiny_t5_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_t5_dir)
    tokenizer.pad_token = tokenizer.eos_token
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    labels = grpo.sft_labels(tokenizer, ["ab", "abcdef"], max_length=32)
    eos = tokenizer.eos_token_id
    assert (labels == eos).sum(dim=1).tolist() == [1, 1]  # each summary keeps its one EOS target
    assert labels[0].tolist() == tokenizer("ab")["input_ids"] + [-100] * 4  # and the padding after it is ignored
    assert labels[1].tolist() == tokenizer("abcdef")["input_ids"]


def test_sft_curve_scores_every_n_steps_and_changes_nothing_in_the_training(grpo, tiny_bart_dir, data_files,
                                                                             monkeypatch):
    import torch
    import transformers

    train_file, validation_file = data_files
    config = grpo.Config(model_name=str(tiny_bart_dir), train_file=str(train_file),
                         validation_file=str(validation_file),
                         max_new_tokens=8, max_source_length=64, eval_samples=4, eval_batch_size=4, sft_steps=5,
                         sft_batch_size=4, sft_learning_rate=1e-2, sft_lr_scheduler="constant_with_warmup",
                         warmup_steps=1, device="cpu")
    device, dist = torch.device("cpu"), grpo.Distributed()
    schedules = []
    real_get_scheduler = transformers.get_scheduler
    monkeypatch.setattr(transformers, "get_scheduler",
                        lambda name, *args, **kw: schedules.append(name) or real_get_scheduler(name, *args, **kw))

    def train(sft_eval_every):
        torch.manual_seed(0)
        run_config = grpo.dataclasses.replace(config, sft_eval_every=sft_eval_every)
        train_rows, held_out = grpo.load_data(run_config, log=lambda message: None)
        policy, tokenizer = grpo.load_policy_and_tokenizer(run_config, device)
        modes = {True: [], False: []}  # train/eval mode of each encoder call: SFT steps (with gradients), scoring
        policy.get_encoder().register_forward_pre_hook(
            lambda module, args: modes[torch.is_grad_enabled()].append(module.training))
        curve = grpo.sft_warmup(grpo.GroupedSeq2Seq(policy), policy, tokenizer, train_rows, run_config, device, dist,
                                lambda message: None, held_out)
        assert modes[True] == [True] * run_config.sft_steps  # SFT steps in train mode, also after scoring
        assert len(modes[False]) == (2 if sft_eval_every else 0) and not any(modes[False])  # scoring in eval mode
        return policy, curve, torch.get_rng_state()

    plain, no_curve, plain_rng = train(sft_eval_every=0)
    scored, curve, scored_rng = train(sft_eval_every=2)
    assert torch.equal(plain_rng, scored_rng)  # scoring drew no random numbers (dropout masks would differ)
    assert schedules == ["constant_with_warmup"] * 2
    assert no_curve == [] and [r["sft_step"] for r in curve] == [2, 4]  # before the last step: the caller scores it
    assert all(0 <= r["rougeL"] <= 1 and r["loss"] > 0 and "entity_recall" in r for r in curve)
    assert not scored.training  # back in GRPO mode after SFT
    for a, b in zip(plain.state_dict().values(), scored.state_dict().values()):  # scoring moved no weight
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# LoRA (peft): adapters on every linear layer but lm_head, the reference with adapters off, no dropout
# --------------------------------------------------------------------------------------------------
def lora_policy(grpo, model_dir, **overrides):
    """The tiny model loaded by the script's loader, with adapters added by add_lora."""
    config = grpo.Config(model_name=str(model_dir), lora_r=4, lora_alpha=8, device="cpu", **overrides)
    policy, tokenizer = grpo.load_policy_and_tokenizer(config, torch.device("cpu"))
    grpo.set_grpo_mode(policy, config)
    policy = grpo.add_lora(policy, config)
    grpo.set_grpo_mode(policy, config)
    return config, policy, tokenizer


def randomize_adapters(policy, seed=0):
    """peft starts B = 0 (a no-op adapter); give every adapter weight random values so adapters matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


@needs_peft
@pytest.mark.parametrize("model", ["bart", "t5"])
def test_all_linear_adapts_every_linear_layer_except_the_lm_head(grpo, model, tiny_bart_dir, tiny_t5_dir):
    from peft.tuners.lora import LoraLayer

    from transformers import AutoModelForSeq2SeqLM

    model_dir = {"bart": tiny_bart_dir, "t5": tiny_t5_dir}[model]
    _, policy, _ = lora_policy(grpo, model_dir)
    base = policy.get_base_model()
    adapted = {name for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    linear = {name for name, module in AutoModelForSeq2SeqLM.from_pretrained(model_dir).named_modules()
              if isinstance(module, torch.nn.Linear)}  # in the model without adapters
    assert "lm_head" not in adapted and isinstance(base.lm_head, torch.nn.Linear)
    assert adapted == linear - {"lm_head"}
    assert any("encoder" in name for name in adapted) and any("decoder" in name for name in adapted)
    trained = {name for name, parameter in policy.named_parameters() if parameter.requires_grad}
    assert trained and all("lora_A" in name or "lora_B" in name for name in trained)


@needs_peft
def test_all_linear_on_pegasus_leaves_the_lm_head_alone(grpo):
    from peft.tuners.lora import LoraLayer
    from transformers import PegasusConfig, PegasusForConditionalGeneration

    model = PegasusForConditionalGeneration(PegasusConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32))
    linear = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    policy = grpo.add_lora(model, grpo.Config(lora_r=2))
    adapted = {name for name, module in policy.get_base_model().named_modules() if isinstance(module, LoraLayer)}
    assert "lm_head" in linear and adapted == linear - {"lm_head"} and len(adapted) == 4 + 8 + 2 * 2


def scoring_passes(grpo, config, policy, tokenizer, rows, forwards):
    """A rollout of `policy` on `rows`, then the per-token log-probs of its samples under each forward."""
    rollout, _ = grpo.rollout_step(policy, tokenizer, rows, config, torch.device("cpu"),
                                   grpo.PhaseTimer(torch.device("cpu")))
    return [grpo.sequence_logprobs_no_grad(forward, rollout, config, torch.device("cpu")) for forward in forwards]


@needs_peft
def test_reference_is_the_post_sft_model_with_adapters_off(grpo, tiny_bart_dir, data_files):
    """SFT trains the full model before the adapters are added, so switching them off gives the post-SFT model
    exactly: pi_ref = the model as GRPO starts, with no second copy of its weights."""
    train_file, validation_file = data_files
    config = grpo.Config(model_name=str(tiny_bart_dir), train_file=str(train_file), validation_file=str(validation_file),
                         group_size=4, batch_size=2, micro_batch_size=8, max_new_tokens=8, max_source_length=64,
                         eval_samples=4, sft_steps=3, sft_batch_size=4, sft_learning_rate=1e-2, lora_r=4, lora_alpha=8,
                         device="cpu")
    device, dist = torch.device("cpu"), grpo.Distributed()
    torch.manual_seed(0)
    train_rows, _ = grpo.load_data(config, log=lambda message: None)
    policy, tokenizer = grpo.load_policy_and_tokenizer(config, device)
    before_sft = grpo.frozen_copy(policy)
    grpo.sft_warmup(grpo.GroupedSeq2Seq(policy), policy, tokenizer, train_rows, config, device, dist,
                    log=lambda message: None)
    after_sft = grpo.frozen_copy(policy)
    policy = grpo.add_lora(policy, config)
    grpo.set_grpo_mode(policy, config)
    rows = train_rows[grpo.batch_indices(0, config.batch_size, len(train_rows), config.seed)]
    reference = grpo.AdaptersDisabled(policy)

    # at the start (B = 0) the policy is the post-SFT model
    start_policy, start_reference, start_sft = scoring_passes(
        grpo, config, policy, tokenizer, rows, [grpo.GroupedSeq2Seq(policy), reference, grpo.GroupedSeq2Seq(after_sft)])
    assert torch.equal(start_policy, start_sft) and torch.equal(start_reference, start_sft)

    randomize_adapters(policy)  # trained adapters: the policy moves, the reference must not
    adapted, reference_logprobs, adapted_again, sft_logprobs, base_logprobs = scoring_passes(
        grpo, config, policy, tokenizer, rows, [grpo.GroupedSeq2Seq(policy), reference, grpo.GroupedSeq2Seq(policy),
                                                grpo.GroupedSeq2Seq(after_sft), grpo.GroupedSeq2Seq(before_sft)])
    assert torch.equal(reference_logprobs, sft_logprobs)
    assert torch.equal(adapted, adapted_again)  # the adapters are on again after the reference pass
    assert not torch.allclose(adapted, sft_logprobs, atol=1e-3), "the adapters did not change the policy"
    assert not torch.allclose(sft_logprobs, base_logprobs, atol=1e-3), "SFT did not move the model: vacuous"


@needs_peft
def test_adapter_dropout_is_off_in_grpo_scoring_passes(grpo, tiny_bart_dir, data_files):
    """set_grpo_mode puts the LoRA policy in eval mode, which switches peft's adapter dropout off, so two scoring
    passes agree exactly (ratio = 1 at mu = 1 and pi_old = pi_theta before the first update). In train mode
    the same adapters with dropout 0.5 give different passes (so the test can fail); --lora_dropout > 0 is
    rejected because it would never act."""
    train_file, validation_file = data_files
    config, policy, tokenizer = lora_policy(grpo, tiny_bart_dir, lora_dropout=0.5, group_size=4, batch_size=2,
                                            micro_batch_size=8, max_new_tokens=8, max_source_length=64,
                                            train_file=str(train_file), validation_file=str(validation_file))
    randomize_adapters(policy)
    train_rows, _ = grpo.load_data(config, log=lambda message: None)
    rows = train_rows[grpo.batch_indices(0, 2, len(train_rows), 0)]
    forward = grpo.GroupedSeq2Seq(policy)
    first, second = scoring_passes(grpo, config, policy, tokenizer, rows, [forward, forward])
    assert torch.equal(first, second)
    rollout, _ = grpo.rollout_step(policy, tokenizer, rows, config, torch.device("cpu"),
                                   grpo.PhaseTimer(torch.device("cpu")))
    policy.train()
    with torch.no_grad():
        noisy = [grpo.sequence_logprobs_no_grad(forward, rollout, config, torch.device("cpu")) for _ in range(2)]
    assert not torch.equal(noisy[0], noisy[1])
    with pytest.raises(grpo.ConfigError, match="--lora_dropout must be 0"):
        grpo.validate_config(dataclasses.replace(grpo.Config(), lora_r=8, lora_dropout=0.1))


@needs_peft
def test_lora_with_gradient_checkpointing_gives_the_same_gradients(grpo, tiny_bart_dir, data_files):
    """Gradient checkpointing with frozen base weights: the adapters still get their gradients, the same ones."""
    gradients = []
    for checkpointing in (False, True):
        config, device, policy, tokenizer, reference, _, _, rows = build_in_process(
            grpo, tiny_bart_dir, data_files, num_iterations=1, gradient_checkpointing=checkpointing)
        torch.manual_seed(0)
        policy = grpo.add_lora(policy, dataclasses.replace(config, lora_r=4, lora_alpha=8))
        grpo.set_grpo_mode(policy, config)
        randomize_adapters(policy)
        optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        torch.manual_seed(1)
        timer = grpo.PhaseTimer(device)
        rollout, _ = grpo.rollout_step(policy, tokenizer, rows, config, device, timer)
        rollout.ref_logprobs = grpo.sequence_logprobs_no_grad(grpo.AdaptersDisabled(policy), rollout, config, device)
        rollout.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5] * config.batch_size)
        grpo.grpo_update(grpo.GroupedSeq2Seq(policy), optimizer, scheduler, rollout, config, device, timer)
        gradients.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad})
    assert gradients[0].keys() == gradients[1].keys()
    assert all(g.abs().sum() > 0 for g in gradients[1].values())
    for name in gradients[0]:
        torch.testing.assert_close(gradients[0][name], gradients[1][name], rtol=1e-4, atol=1e-6, msg=name)
