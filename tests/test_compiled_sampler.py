"""The static-shape sampler step that --compile_sampler compiles (StaticCacheDecoderStep), on CPU: the same tokens
as the default decoder_step for every architecture the tests build (T5 with more decoder than encoder layers too)."""

from __future__ import annotations

import pytest
import torch

from test_sampler import articles, tiny_bart, tiny_t5


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


def tiny_pegasus(seed=0):
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


MODELS = {  # model, eos, pad
    "t5_more_decoder_layers": lambda: (unequal_t5(), 1, 0),
    "bart_more_decoder_layers": lambda: (unequal_bart(), 2, 1),
    "bart_forced_bos": lambda: (tiny_bart(forced_bos=0), 2, 1),
    "t5": lambda: (tiny_t5(), 1, 0),
    "pegasus": lambda: (tiny_pegasus(), 1, 0),
}


def sample(grpo, model, eos, pad, step_function, seed=0, length=9, greedy=False):
    input_ids, attention_mask = articles(length=length)
    torch.manual_seed(seed)
    return grpo.sample_completions(model, input_ids, attention_mask, 3, 10, eos, pad, 2.0, 0.95, greedy=greedy,
                                   step_function=step_function)


@pytest.mark.parametrize("name", list(MODELS))
def test_static_step_equals_decoder_step(grpo, name):
    model, eos, pad = MODELS[name]()
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


@pytest.mark.parametrize("name", list(MODELS))
def test_padded_static_buffers_equal_decoder_step_over_rollouts_of_different_lengths(grpo, name):
    model, eos, pad = MODELS[name]()
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

    model, eos, pad = MODELS[name]()
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
    """A real CPU GRPO run's pieces on the demo's BART (0.8M parameters), with EOS never sampled: every summary
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


def test_estimate_memory_prints_a_table_and_writes_nothing(tmp_path):
    from conftest import run_script
    from transformers import T5Config

    T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=2, num_heads=2,
             decoder_start_token_id=0, pad_token_id=0, eos_token_id=1).save_pretrained(tmp_path / "model")
    result = run_script("--estimate_memory=True", f"--model_name={tmp_path / 'model'}", "--batch_size=2",
                        "--group_size=4", "--micro_batch_size=4", "--max_source_length=16", "--max_new_tokens=4",
                        "--gpu_memory_gb=1", f"--output_dir={tmp_path / 'run'}", timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("memory plan: ") and "CUDA bf16 autocast" in lines[0]
    assert [line.split()[0] for line in lines[4:6]] == ["4", "8"]  # micro_batch_size rows: G and B*G
    assert lines[-1] == "largest micro_batch_size that fits 90% of 1 GB: 8"
    assert not (tmp_path / "run").exists()


def test_gpu_memory_gb_without_estimate_memory_is_one_clear_error(tmp_path):
    from conftest import run_script

    result = run_script("--gpu_memory_gb=24", f"--output_dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --gpu_memory_gb applies to --estimate_memory only: add it, or leave it out"


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
