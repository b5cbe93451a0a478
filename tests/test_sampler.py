"""The rollout sampler (sample_completions) and its pieces: top-p, inverse-CDF sampling, greedy == generate,
the log-probs it used == the scoring path's, the token frequencies == the softmax (chi-square), the static-cache
sampler == the dynamic one, scoring with cross-attention shared by an article's G samples == per sample, and the
checkpoint's generation defaults kept out of the rollout."""

from __future__ import annotations

import pytest
import torch

from conftest import articles, needs_peft, tiny_bart, tiny_policy_and_batch, tiny_t5

CHI_SQUARE_CRITICAL = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}  # 0.999 quantile by dof


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


MODELS = {
    "bart_forced_bos": lambda: (tiny_bart(forced_bos=0), 2, 1),
    "t5": lambda: (tiny_t5(), 1, 0),
    "pad_equals_eos": lambda: (tiny_bart(pad_token_id=2, eos_token_id=2), 2, 2),
}


# ---- top-p ----------------------------------------------------------------------------------------------------
def test_top_p_filter_hand_case(grpo):
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda p: torch.isfinite(grpo.top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.8) == [True, True, False, False]  # 0.5 + 0.3 = 0.8 >= 0.8: the smallest such set
    assert kept(0.81) == [True, True, True, False]
    assert kept(0.3) == [True, False, False, False]  # the most likely token is always kept
    assert kept(1.0) == [True, True, True, True]


def test_top_p_filter_matches_transformers(grpo):
    from transformers import TopPLogitsWarper

    logits = torch.randn(64, 30, generator=torch.Generator().manual_seed(0)) * 3
    for p in (0.1, 0.5, 0.9, 0.99):
        ours = grpo.top_p_filter(logits, p)
        theirs = TopPLogitsWarper(p)(None, logits.clone())
        assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs)), p
        assert torch.equal(ours[torch.isfinite(ours)], logits[torch.isfinite(theirs)])


# ---- inverse-CDF sampling -------------------------------------------------------------------------------------
def test_inverse_cdf_hand_cases(grpo):
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]]).repeat(4, 1)
    uniform = torch.tensor([0.0, 0.2499, 0.25, 1 - 1e-9])
    assert grpo.inverse_cdf_sample(probs, uniform).tolist() == [1, 1, 3, 3]  # zero-probability tokens never


def test_inverse_cdf_frequencies_match_probabilities(grpo):
    generator = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.0, 0.5, 0.0, 0.0])  # unnormalized is allowed: scale by 3
    draws = 40_000
    tokens = grpo.inverse_cdf_sample((3 * probs).expand(draws, -1), torch.rand(draws, generator=generator))
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    assert counts[probs == 0].sum() == 0
    kept = probs > 0
    assert chi_square(counts[kept], probs[kept].double()) < CHI_SQUARE_CRITICAL[5]
    # and the test can fail: the same counts against a slightly different distribution are rejected
    wrong = probs[kept].double() + torch.tensor([0.02, -0.02, 0, 0, 0], dtype=torch.double)
    assert chi_square(counts[kept], wrong) > CHI_SQUARE_CRITICAL[5]


def test_sampler_first_token_frequencies_match_tempered_top_p_softmax(grpo):
    """End to end: G = 20,000 samples of one article; the first token follows softmax(top_p(logits / T))."""
    model = tiny_bart(vocab_size=8, init_std=0.2)
    input_ids, attention_mask = articles(vocab_size=8, batch=1)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       decoder_input_ids=torch.tensor([[2]])).logits[0, -1]
    temperature, top_p = 0.7, 0.9
    probs = grpo.top_p_filter((logits / temperature)[None], top_p).softmax(-1)[0].double()
    assert 3 <= int((probs > 0).sum()) < 8, "the test needs top-p to drop some tokens and keep several"
    torch.manual_seed(0)
    sequences, _ = grpo.sample_completions(model, input_ids, attention_mask, 20_000, 1, 2, 1, temperature, top_p)
    counts = torch.bincount(sequences[:, 1], minlength=8).double()
    assert counts[probs == 0].sum() == 0
    kept = probs > 0
    assert chi_square(counts[kept], probs[kept]) < CHI_SQUARE_CRITICAL[int(kept.sum()) - 1]
    untempered = torch.softmax(logits, -1).double()[kept]
    assert chi_square(counts[kept], untempered / untempered.sum()) > CHI_SQUARE_CRITICAL[int(kept.sum()) - 1]


# ---- greedy == generate; sampled log-probs == scoring ---------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_sampler_equals_generate(grpo, name):
    from transformers import GenerationConfig

    model, eos, pad = MODELS[name]()
    input_ids, attention_mask = articles()
    sequences, _ = grpo.sample_completions(model, input_ids, attention_mask, 2, 12, eos, pad, greedy=True)
    settings = GenerationConfig(max_new_tokens=12, num_beams=1, do_sample=False, eos_token_id=eos, pad_token_id=pad,
                                decoder_start_token_id=grpo.decoder_start_token_id(model),
                                forced_bos_token_id=grpo.forced_bos_token_id(model))
    expected = grpo.generate(model, {"input_ids": input_ids, "attention_mask": attention_mask}, settings)
    assert torch.equal(sequences, expected.repeat_interleave(2, dim=0))
    assert len(set(expected[:, 2:].flatten().tolist())) > 2, "a degenerate model would make this test weak"
    if name == "bart_forced_bos":
        assert (sequences[:, 1] == 0).all()


@pytest.mark.parametrize("name", list(MODELS))
def test_sampled_logprobs_equal_scoring_path(grpo, name):
    model, eos, pad = MODELS[name]()
    input_ids, attention_mask = articles()
    G, temperature = 4, 2.0  # a high temperature: the tiny random models are peaked
    torch.manual_seed(0)
    sequences, logprobs = grpo.sample_completions(model, input_ids, attention_mask, G, 10, eos, pad, temperature, 0.95)
    assert sequences.shape[0] == 3 * G and (sequences[:, 0] == grpo.decoder_start_token_id(model)).all()
    completion_ids = sequences[:, 1:]
    mask, _ = grpo.completion_mask(completion_ids, eos)
    assert mask.sum(1).max() == completion_ids.size(1)  # trimmed to the longest sample
    assert (completion_ids[mask == 0] == pad).all()  # pad after EOS
    with torch.no_grad():
        logits = grpo.GroupedSeq2Seq(model)(input_ids, attention_mask, sequences[:, :-1], G)
    scored = grpo.token_logprobs(logits / temperature, completion_ids)
    torch.testing.assert_close(logprobs * mask, scored * mask, atol=1e-5, rtol=1e-5)  # float32 rounding only
    assert len(set(map(tuple, completion_ids.tolist()))) > 3, "the samples of some article should differ"


# ---- scoring with cross-attention keys/values shared by the G samples of an article ---------------------------
def tiny_pegasus(vocab_size=40, seed=0):
    from transformers import PegasusConfig, PegasusForConditionalGeneration

    config = PegasusConfig(vocab_size=vocab_size, d_model=32, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                           decoder_start_token_id=0, dropout=0.0, init_std=0.2)
    torch.manual_seed(seed)
    return PegasusForConditionalGeneration(config).eval()


SCORING_MODELS = {"bart": lambda: tiny_bart(), "t5": lambda: tiny_t5(initializer_factor=1.0), "pegasus": lambda: tiny_pegasus()}


def per_sample_grouped_forward(model, input_ids, attention_mask, decoder_input_ids, group_size):
    """The plain path the shared cross-attention replaced: the encoder once, its output repeated to the G samples,
    so every sample projects the cross-attention keys/values itself."""
    from transformers.modeling_outputs import BaseModelOutput

    hidden = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden.repeat_interleave(group_size, dim=0)),
                 attention_mask=attention_mask.repeat_interleave(group_size, dim=0),
                 decoder_input_ids=decoder_input_ids, use_cache=False).logits


@pytest.mark.parametrize("name", list(SCORING_MODELS))
def test_shared_cross_attention_scoring_equals_per_sample_scoring(grpo, name):
    """GroupedSeq2Seq (cross-attention K/V once per article) vs per sample: logits to 1e-5 in float32, and every
    parameter's gradient in float64 (where a different order of float sums cannot hide a real difference)."""
    G = 3
    input_ids, attention_mask = articles()
    decoder_input_ids = torch.randint(3, 40, (3 * G, 6), generator=torch.Generator().manual_seed(2))
    shared_model, plain_model = SCORING_MODELS[name](), SCORING_MODELS[name]()
    decoder_input_ids[:, 0] = grpo.decoder_start_token_id(shared_model)
    assert grpo.shared_cross_attention_cache(
        shared_model, torch.zeros(3, 9, 32), attention_mask, decoder_input_ids[::G, :1], G) is not None
    for dtype in (torch.float32, torch.float64):
        shared_model.to(dtype), plain_model.to(dtype)
        shared = grpo.GroupedSeq2Seq(shared_model)(input_ids, attention_mask, decoder_input_ids, G)
        plain = per_sample_grouped_forward(plain_model, input_ids, attention_mask, decoder_input_ids, G)
        torch.testing.assert_close(shared, plain, atol=1e-5 if dtype == torch.float32 else 1e-10, rtol=0)
    weights = torch.randn_like(plain)  # an arbitrary loss touching every logit
    (shared * weights).sum().backward()
    (plain * weights).sum().backward()
    for (key, a), (_, b) in zip(shared_model.named_parameters(), plain_model.named_parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=1e-10, msg=lambda m: f"{key}: {m}")


# ---- the static-shape sampler (what --compile_sampler captures on CUDA) ----------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_static_cache_sampler_equals_dynamic_cache_sampler(grpo, name):
    model, eos, pad = MODELS[name]()
    input_ids, attention_mask = articles()
    results = []
    for static in (False, True):
        torch.manual_seed(0)
        results.append(grpo.sample_completions(model, input_ids, attention_mask, 3, 10, eos, pad, 2.0, 0.95,
                                               step_function=grpo.StaticCacheDecoderStep(10) if static
                                               else grpo.decoder_step))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-5)
    greedy = [grpo.sample_completions(model, input_ids, attention_mask, 2, 10, eos, pad, greedy=True,
                                      step_function=step)[0]
              for step in (grpo.decoder_step, grpo.StaticCacheDecoderStep(10))]
    assert torch.equal(*greedy)


@needs_peft
def test_sampler_and_shared_scoring_work_through_a_peft_lora_model(grpo):
    """The policy may be a peft PeftModel (LoRA): the sampler and the scoring pass go through its wrapper."""
    from peft import LoraConfig, get_peft_model
    from transformers import GenerationConfig

    model = get_peft_model(tiny_bart(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    input_ids, attention_mask = articles()
    sequences, _ = grpo.sample_completions(model, input_ids, attention_mask, 1, 10, 2, 1, greedy=True)
    settings = GenerationConfig(max_new_tokens=10, num_beams=1, do_sample=False, eos_token_id=2, pad_token_id=1,
                                decoder_start_token_id=grpo.decoder_start_token_id(model))
    assert torch.equal(sequences, grpo.generate(model, {"input_ids": input_ids, "attention_mask": attention_mask},
                                                settings))
    decoder_input_ids = sequences.repeat_interleave(2, dim=0)
    shared = grpo.GroupedSeq2Seq(model)(input_ids, attention_mask, decoder_input_ids, 2)
    plain = per_sample_grouped_forward(model, input_ids, attention_mask, decoder_input_ids, 2)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)


def test_sampler_without_logprobs_draws_the_same_tokens(grpo):
    model = tiny_bart()
    input_ids, attention_mask = articles()
    results = []
    for with_logprobs in (True, False):
        torch.manual_seed(0)
        results.append(grpo.sample_completions(model, input_ids, attention_mask, 3, 10, 2, 1, 2.0, 0.95,
                                               with_logprobs=with_logprobs))
    assert torch.equal(results[0][0], results[1][0]) and results[1][1] is None


# ---- the rollout samples from the plain softmax, whatever the checkpoint's generation_config says ----------------
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
