"""LoRA through peft: which layers get adapters, the reference as the same model with its adapters off (after SFT),
adapter dropout, merged final/ and best/ plus the adapter, exact resume, torchrun, and bad inputs.

Everything runs offline on the tiny models of conftest.py.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from conftest import TORCHRUN_ARGS, check_ok, data_args, read_jsonl, run_script, run_torchrun

peft = pytest.importorskip("peft")

# 2 articles x 4 samples per step, 8 new tokens; a learning rate at which the adapters move in a few steps.
LORA_ARGS = ("--batch_size=2", "--group_size=4", "--micro_batch_size=4", "--max_new_tokens=8",
             "--max_source_length=64", "--eval_every=2", "--eval_samples=4", "--save_every=2", "--device=cpu",
             "--lora_r=4", "--lora_alpha=8", "--learning_rate=5e-2", "--lr_scheduler=constant", "--warmup_steps=0",
             "--seed=3")


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


def test_lora_with_gradient_checkpointing_gives_the_same_gradients(grpo, tiny_bart_dir, data_files):
    """Gradient checkpointing with frozen base weights: the adapters still get their gradients, the same ones."""
    from test_script import build_in_process

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
    check_ok(run_script(*common, "--max_steps=1", f"--output_dir={resumed}", cwd=tmp_path))
    result = run_script(*common, "--max_steps=2", "--resume=True", f"--output_dir={resumed}", cwd=tmp_path)
    check_ok(result)
    assert "resumed from" in result.stderr and "at step 1" in result.stderr, result.stderr
    result = run_script(*common, "--max_steps=2", f"--output_dir={straight}", cwd=tmp_path)
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


def test_torchrun_two_processes_with_lora(tiny_bart_dir, data_files, tmp_path):
    train_file, validation_file = data_files
    output_dir = tmp_path / "ddp"
    result = run_torchrun(f"--model_name={tiny_bart_dir}", f"--train_file={train_file}",
                          f"--validation_file={validation_file}", *TORCHRUN_ARGS, "--sft_batch_size=4", "--lora_r=4",
                          "--learning_rate=5e-2", "--scale_rewards=batch", f"--output_dir={output_dir}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"weights identical on all 2 processes", result.stderr), result.stderr[-3000:]
    metrics = read_jsonl(output_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and metrics[0]["kl"] == 0.0
    from transformers import AutoModelForSeq2SeqLM

    AutoModelForSeq2SeqLM.from_pretrained(output_dir / "final")
    assert (output_dir / "final" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("changes, flag", [
    (dict(lora_r=-1), "--lora_r"),
    (dict(lora_r=8, lora_alpha=0), "--lora_alpha"),
    (dict(lora_r=8, lora_dropout=0.05), "--lora_dropout"),
    (dict(lora_r=8, lora_target_modules=","), "--lora_target_modules"),
])
def test_validate_config_rejects_bad_lora_flags(grpo, changes, flag):
    with pytest.raises(grpo.ConfigError) as info:
        grpo.validate_config(dataclasses.replace(grpo.Config(), **changes))
    assert flag in str(info.value)


def test_unknown_target_module_is_a_user_error(grpo, tiny_bart_dir):
    config = grpo.Config(model_name=str(tiny_bart_dir), lora_r=4, lora_target_modules="no_such_layer", device="cpu")
    policy, _ = grpo.load_policy_and_tokenizer(config, torch.device("cpu"))
    with pytest.raises(grpo.UserError) as info:
        grpo.add_lora(policy, config)
    message = str(info.value)
    assert message.startswith("--lora_target_modules=no_such_layer: ") and "\n" not in message, message
