"""The rollout sampler (sample_completions) and its pieces: top-p, inverse-CDF sampling, greedy == generate,
the log-probs it used == the scoring path's, the token frequencies == the softmax (chi-square), the static-cache
sampler == the dynamic one, scoring with cross-attention shared by an article's G samples == per sample, the
checkpoint's generation defaults kept out of the rollout, and the static step --compile_sampler compiles (buffers
allocated once per run, one graph for every article length, the token its only per-step input) on CPU."""

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


# --------------------------------------------------------------------------------------------------
# The static-shape step that --compile_sampler compiles (StaticCacheDecoderStep), on CPU
# --------------------------------------------------------------------------------------------------
def unequal_t5(seed=0):
    """A tiny T5 whose decoder has more layers than its encoder (the static cache is sized by the decoder)."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=3, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0, initializer_factor=8.0)
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config).eval()


def unequal_bart(seed=0):
    """A tiny BART with 1 encoder and 3 decoder layers."""
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(vocab_size=40, d_model=32, encoder_layers=1, decoder_layers=3, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, dropout=0.0,
                        init_std=0.5)
    torch.manual_seed(seed)
    model = BartForConditionalGeneration(config).eval()
    model.generation_config.forced_bos_token_id = None
    return model


def static_pegasus(seed=0):
    """A tiny Pegasus (sinusoidal positions, pre-norm; decoder start = pad)."""
    from transformers import PegasusConfig, PegasusForConditionalGeneration

    config = PegasusConfig(vocab_size=40, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                           max_position_embeddings=64, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                           dropout=0.0, init_std=0.5)
    torch.manual_seed(seed)
    model = PegasusForConditionalGeneration(config).eval()
    model.generation_config.forced_bos_token_id = None
    return model


STATIC_MODELS = {  # model, eos, pad
    "t5_more_decoder_layers": lambda: (unequal_t5(), 1, 0),
    "bart_more_decoder_layers": lambda: (unequal_bart(), 2, 1),
    "bart_forced_bos": lambda: (tiny_bart(forced_bos=0), 2, 1),
    "t5": lambda: (tiny_t5(), 1, 0),
    "pegasus": lambda: (static_pegasus(), 1, 0),
}


def sample(grpo, model, eos, pad, step_function, seed=0, length=9, greedy=False):
    input_ids, attention_mask = articles(length=length)
    torch.manual_seed(seed)
    return grpo.sample_completions(model, input_ids, attention_mask, 3, 10, eos, pad, 2.0, 0.95, greedy=greedy,
                                   step_function=step_function)


@pytest.mark.parametrize("name", list(STATIC_MODELS))
def test_static_step_equals_decoder_step(grpo, name):
    model, eos, pad = STATIC_MODELS[name]()
    expected = sample(grpo, model, eos, pad, grpo.decoder_step)
    static = sample(grpo, model, eos, pad, grpo.StaticCacheDecoderStep(10))
    assert torch.equal(static[0], expected[0])
    torch.testing.assert_close(static[1], expected[1], atol=1e-5, rtol=1e-5)



# ---- one set of buffers per run: rollouts of any article length, one graph whose only per-step input is the token
LENGTHS = (9, 6, 12)  # article lengths of successive rollouts; the buffers are padded to 12 (max_source_length)


class GraphRecorder:
    """A torch.compile backend that records each graph it is given: its inputs that are not static addresses
    (what a CUDA graph would copy in on every replay), and runs it eagerly."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph_module, example_inputs):
        inputs = []
        for node in graph_module.graph.find_nodes(op="placeholder"):
            if not node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type"):
                value = node.meta["example_value"]
                inputs.append((node._dynamo_source.name, value.numel() * value.element_size()))
        self.graphs.append(inputs)
        return graph_module.forward


def rollouts(grpo, model, eos, pad, step_function, lengths=LENGTHS, greedy=False):
    """One rollout per article length, each seeded alike; returns [(sequences, logprobs), ...]."""
    results = []
    for length in lengths:
        results.append(sample(grpo, model, eos, pad, step_function, length=length, greedy=greedy))
    return results


def assert_same_samples(results, expected, atol=1e-5):
    for (sequences, logprobs), (expected_sequences, expected_logprobs) in zip(results, expected):
        assert torch.equal(sequences, expected_sequences)
        torch.testing.assert_close(logprobs, expected_logprobs, atol=atol, rtol=atol)


@pytest.mark.parametrize("name", list(STATIC_MODELS))
def test_padded_static_buffers_equal_decoder_step_over_rollouts_of_different_lengths(grpo, name):
    model, eos, pad = STATIC_MODELS[name]()
    step = grpo.StaticCacheDecoderStep(10, max_source_length=max(LENGTHS))
    results = rollouts(grpo, model, eos, pad, step)
    assert_same_samples(results, rollouts(grpo, model, eos, pad, grpo.decoder_step))
    assert step.hidden.size(1) == max(LENGTHS) and step.attention_mask.size(1) == max(LENGTHS)


def test_buffers_are_allocated_once_per_run_and_refilled_per_rollout(grpo):
    model, eos, pad = unequal_t5(), 1, 0
    step = grpo.StaticCacheDecoderStep(10, max_source_length=max(LENGTHS))
    sample(grpo, model, eos, pad, step, length=9)
    addresses = [step.hidden.data_ptr(), step.attention_mask.data_ptr(), step.self_cache.layers[0].keys.data_ptr(),
                 step.cross_cache.layers[2].values.data_ptr()]
    with torch.no_grad():  # the policy changes between rollouts (an update): the next rollout must see it
        model.decoder.block[2].layer[1].EncDecAttention.o.weight.mul_(1.5)
    assert_same_samples([sample(grpo, model, eos, pad, step, length=6)],
                        [sample(grpo, model, eos, pad, grpo.decoder_step, length=6)])
    assert addresses == [step.hidden.data_ptr(), step.attention_mask.data_ptr(),
                         step.self_cache.layers[0].keys.data_ptr(), step.cross_cache.layers[2].values.data_ptr()]
    assert len(step.cross_cache.layers) == 3  # the decoder's layer count (its encoder has 1)


def test_run_uses_one_static_step_for_every_rollout(grpo):
    config = grpo.Config(compile_sampler=True, max_new_tokens=7, max_source_length=20)
    step = grpo.sampler_step_function(config)
    assert step is grpo.sampler_step_function(config) and step.compiled
    assert (step.max_new_tokens, step.max_source_length) == (7, 20)
    assert grpo.sampler_step_function(grpo.Config()) is grpo.decoder_step


@pytest.mark.parametrize("name", ["t5_more_decoder_layers", "bart_forced_bos"])
def test_compiled_step_is_one_graph_for_all_lengths_whose_only_per_step_input_is_the_token(grpo, name):
    """Compiled (a recording backend, no inductor) over rollouts of three article lengths: one graph, no graph
    break, and every graph input but the token a static address (the buffers, the weights); same samples."""
    import torch._dynamo

    model, eos, pad = STATIC_MODELS[name]()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    recorder = GraphRecorder()
    step = grpo.StaticCacheDecoderStep(10, compiled=True, max_source_length=max(LENGTHS), backend=recorder)
    results = rollouts(grpo, model, eos, pad, step)
    assert len(recorder.graphs) == 1 and not torch._dynamo.utils.counters["graph_break"]
    assert recorder.graphs[0] == [("L['token']", 9 * 8)]  # B*G = 3*3 int64 tokens
    assert_same_samples(results, rollouts(grpo, model, eos, pad, grpo.decoder_step))


def test_under_autocast_the_step_reads_bf16_weights_cast_once_per_rollout(grpo):
    """Under autocast the decoder's linear layers read bf16 copies made at the rollout's start (not cast in the
    graph): the same samples as decoder_step under autocast, and still only the token as a per-step input."""
    import torch._dynamo

    model, eos, pad = tiny_bart(forced_bos=0), 2, 1
    torch._dynamo.reset()
    recorder = GraphRecorder()
    step = grpo.StaticCacheDecoderStep(10, compiled=True, max_source_length=max(LENGTHS), backend=recorder)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        results = rollouts(grpo, model, eos, pad, step, greedy=True)
        expected = rollouts(grpo, model, eos, pad, grpo.decoder_step, greedy=True)
    assert all(torch.equal(ours, theirs) for (ours, _), (theirs, _) in zip(results, expected))
    assert {weight.dtype for weight in step.sampling_weights.values()} == {torch.bfloat16}
    assert "lm_head.weight" in step.sampling_weights and not any(n.startswith("model.encoder.") for n in step.sampling_weights)
    assert model.lm_head.weight.dtype == torch.float32  # the policy's own weights are untouched
    torch.testing.assert_close(step.sampling_weights["lm_head.weight"], model.lm_head.weight.bfloat16(), atol=0, rtol=0)
    assert len(recorder.graphs) == 1 and recorder.graphs[0] == [("L['token']", 9 * 8)]


def test_inductor_compiles_the_step_once_for_rollouts_of_different_lengths(grpo):
    """The real compile (inductor; on CPU no CUDA graphs): one compiled frame over three article lengths."""
    import torch._dynamo

    model, eos, pad = tiny_bart(), 2, 1
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step = grpo.StaticCacheDecoderStep(10, compiled=True, max_source_length=max(LENGTHS))
    results = rollouts(grpo, model, eos, pad, step)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]
    assert_same_samples(results, rollouts(grpo, model, eos, pad, grpo.decoder_step), atol=1e-4)


# ---- the memory plan (--estimate_memory) -----------------------------------------------------------------------
def test_memory_tracker_counts_storages_once_until_freed(grpo):
    tracker = grpo.MemoryTracker(block=1)
    with tracker:
        a = torch.zeros(1000)  # 4000 bytes
        view = a[10:]  # same storage: not counted again
        b = a * 2
        assert tracker.live == 8000 and view.numel() == 990
        del a, b
        assert tracker.live == 4000  # the view keeps a's storage alive
        del view
    assert tracker.live == 0 and tracker.peak == 8000
    with grpo.MemoryTracker() as rounded:  # CUDA's allocator rounds to 512 bytes
        c = torch.zeros(3)
        assert rounded.live == 512 and c.numel() == 3


def test_emulated_cuda_autocast_runs_layer_norm_in_float32_and_linear_in_bf16(grpo):
    x, weight = torch.randn(2, 8), torch.randn(8, 8)
    with grpo.emulated_cuda_autocast(torch.device("cpu")):
        projected = torch.nn.functional.linear(x, weight)
        normed = torch.nn.functional.layer_norm(projected, (8,))
        probs = projected.softmax(dim=-1)
    assert projected.dtype == torch.bfloat16
    assert normed.dtype == torch.float32 and probs.dtype == torch.float32


def demo_size_run(grpo, directory, config):
    """A real CPU GRPO run's pieces on the demo's BART (0.9M trained parameters), EOS never sampled: every summary
    runs to max_new_tokens, as the memory plan assumes."""
    rows = grpo.make_synthetic_corpus(60, seed=0)
    tokenizer = grpo.build_word_tokenizer([r["article"] for r in rows] + [r["highlights"] for r in rows],
                                          str(directory), "bart")
    grpo.build_demo_model(str(directory), tokenizer, seed=0)
    policy, tokenizer = grpo.load_policy_and_tokenizer(config, torch.device("cpu"))
    with torch.no_grad():
        policy.final_logits_bias[:, tokenizer.eos_token_id] = -1e4
    grpo.set_grpo_mode(policy, config)
    optimizer = torch.optim.AdamW(list(policy.parameters()), lr=1e-6, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batch = {key: [row[key] for row in rows[:config.batch_size]] for key in ("article", "highlights")}
    return policy, tokenizer, grpo.GroupedSeq2Seq(grpo.frozen_copy(policy)), optimizer, scheduler, batch


def test_memory_plan_is_within_15_percent_of_a_real_cpu_step(grpo, tmp_path):
    """The plan (fake tensors, CPU float32) against a real grpo_step on CPU, measured by the same MemoryTracker on
    real tensors: the second step (AdamW's state exists), its weights, pi_ref, AdamW state and gradients counted."""
    config = grpo.Config(model_name=str(tmp_path), batch_size=4, group_size=4, micro_batch_size=8,
                         max_source_length=48, max_new_tokens=24, device="cpu")
    cpu = torch.device("cpu")
    policy, tokenizer, reference_forward, optimizer, scheduler, batch = demo_size_run(grpo, tmp_path, config)
    policy_forward = grpo.GroupedSeq2Seq(policy)
    grpo.grpo_step(policy, policy_forward, reference_forward, tokenizer, batch, optimizer, scheduler, config, cpu)
    tracker = grpo.MemoryTracker(block=1)
    tracker.track([*policy.parameters(), *policy.buffers(), *reference_forward.parameters(),
                   *reference_forward.buffers(), *(p.grad for p in policy.parameters() if p.grad is not None),
                   *(t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor))])
    steady = tracker.live
    with tracker:
        numbers = grpo.grpo_step(policy, policy_forward, reference_forward, tokenizer, batch, optimizer, scheduler,
                                 config, cpu)
    assert numbers["completion_length"] == config.max_new_tokens
    plan = grpo.memory_plan(policy.config, config, [8], cuda=False)
    planned = max(plan["rollout"], plan["reference"][8], plan["update"][8])
    assert abs(planned / tracker.peak - 1) < 0.15, (planned, tracker.peak)
    assert abs(plan["steady"] / steady - 1) < 0.01, (plan["steady"], steady)
    assert plan["update"][8] > plan["steady"] and plan["rollout"] > plan["steady"]


def test_estimate_memory_prints_a_table_and_writes_nothing(grpo, tmp_path):
    from conftest import main_in_process
    from transformers import T5Config

    T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=2, num_heads=2,
             decoder_start_token_id=0, pad_token_id=0, eos_token_id=1).save_pretrained(tmp_path / "model")
    result = main_in_process(grpo, "--estimate_memory=True", f"--model_name={tmp_path / 'model'}", "--batch_size=2",
                             "--group_size=4", "--micro_batch_size=4", "--max_source_length=16", "--max_new_tokens=4",
                             "--gpu_memory_gb=1", f"--output_dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("memory plan: ") and "CUDA bf16 autocast" in lines[0]
    assert [line.split()[0] for line in lines[4:6]] == ["4", "8"]  # micro_batch_size rows: G and B*G
    assert lines[-1] == "largest micro_batch_size that fits 90% of 1 GB: 8"
    assert not (tmp_path / "run").exists()


def test_gpu_memory_gb_without_estimate_memory_is_one_clear_error(grpo, tmp_path, capsys):
    assert grpo.main(["--gpu_memory_gb=24", f"--output_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --gpu_memory_gb applies to --estimate_memory only: add it, or "
                                               "leave it out")


def test_static_step_through_a_lora_policy_under_autocast_equals_decoder_step(grpo):
    """A peft LoRA policy: the bf16 copies cover the adapters' linear layers too (by their PeftModel names)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_bart(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "fc1"],
                                                   init_lora_weights=False)).eval()
    step = grpo.StaticCacheDecoderStep(10, max_source_length=max(LENGTHS))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        results = rollouts(grpo, model, 2, 1, step, greedy=True)
        expected = rollouts(grpo, model, 2, 1, grpo.decoder_step, greedy=True)
    assert all(torch.equal(ours, theirs) for (ours, _), (theirs, _) in zip(results, expected))
    assert any("lora_A" in name for name in step.sampling_weights)


@pytest.mark.parametrize("flags, message", [
    (dict(estimate_memory=True, benchmark=True), "--estimate_memory cannot be combined with --eval_only, --demo"),
    (dict(estimate_memory=True, lora_r=8), "--estimate_memory plans full fine-tuning only"),
    (dict(estimate_memory=True, gpu_memory_gb=0.0), "--gpu_memory_gb must be > 0"),
])
def test_estimate_memory_flag_checks(grpo, flags, message):
    with pytest.raises(grpo.ConfigError, match=message):
        grpo.validate_config(grpo.Config(**flags), set(flags))


def test_memory_plan_counts_the_compiled_samplers_buffers(grpo):
    """--compile_sampler's buffers (allocated once per run) stay allocated: a higher steady state, on fake tensors."""
    from transformers import BartConfig

    model_config = BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
                              decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                              max_position_embeddings=64)
    config = grpo.Config(batch_size=2, group_size=4, micro_batch_size=4, max_source_length=16, max_new_tokens=4)
    plain = grpo.memory_plan(model_config, config, [4])
    static = grpo.memory_plan(model_config, grpo.dataclasses.replace(config, compile_sampler=True), [4])
    assert static["steady"] > plain["steady"] and static["update"][4] > plain["update"][4]
