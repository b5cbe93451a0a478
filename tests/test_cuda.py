"""Every CUDA path: bf16 autocast, the sampler, its CUDA-graph capture (--compile_sampler), one training step and
the peak-memory number of the benchmark. Skipped on machines without CUDA."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import articles, check_ok, data_args, run_script, tiny_bart, tiny_t5

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("name", ["bart", "t5"])
def test_sampler_greedy_equals_generate_under_bf16_autocast(grpo, name):
    from transformers import GenerationConfig

    model, eos, pad = (tiny_bart(forced_bos=0), 2, 1) if name == "bart" else (tiny_t5(), 1, 0)
    model = model.cuda()
    input_ids, attention_mask = (t.cuda() for t in articles())
    settings = GenerationConfig(max_new_tokens=12, num_beams=1, do_sample=False, eos_token_id=eos, pad_token_id=pad,
                                decoder_start_token_id=grpo.decoder_start_token_id(model),
                                forced_bos_token_id=grpo.forced_bos_token_id(model))
    with grpo.autocast(torch.device("cuda")):
        sequences, _ = grpo.sample_completions(model, input_ids, attention_mask, 1, 12, eos, pad, greedy=True)
        expected = grpo.generate(model, {"input_ids": input_ids, "attention_mask": attention_mask}, settings)
    assert torch.equal(sequences, expected)


def test_captured_sampler_equals_eager_static_sampler(grpo):
    """The compiled static step (torch.compile mode="reduce-overhead": CUDA graphs) gives the eager static sampler's
    tokens; run twice, so that the second rollout replays the captured graphs."""
    model = tiny_bart().cuda()
    input_ids, attention_mask = (t.cuda() for t in articles())
    eager = grpo.sample_completions(model, input_ids, attention_mask, 4, 16, 2, 1, greedy=True,
                                    step_function=grpo.StaticCacheDecoderStep(16))
    for _ in range(2):
        captured = grpo.sample_completions(model, input_ids, attention_mask, 4, 16, 2, 1, greedy=True,
                                           step_function=grpo.StaticCacheDecoderStep(16, compiled=True))
        assert torch.equal(captured[0], eager[0])
        torch.testing.assert_close(captured[1], eager[1], atol=1e-4, rtol=1e-4)


def test_one_training_step_on_cuda_with_captured_sampler(tiny_bart_dir, data_files, tmp_path):
    result = run_script(f"--model_name={tiny_bart_dir}", *data_args(data_files), f"--output_dir={tmp_path}",
                        "--device=cuda", "--compile_sampler=True", "--max_steps=1", "--batch_size=2",
                        "--group_size=4", "--micro_batch_size=8", "--eval_samples=4", "--max_new_tokens=8",
                        "--max_source_length=64")
    check_ok(result)
    metrics = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["step"] == 1 and metrics["completion_length"] > 0


def test_benchmark_reports_peak_gpu_memory(tmp_path):
    result = run_script("--benchmark", "--device=cuda", "--max_steps=1", "--batch_size=2", "--group_size=4",
                        "--micro_batch_size=8", f"--output_dir={tmp_path}")
    check_ok(result)
    numbers = json.loads((tmp_path / "benchmark.json").read_text())
    assert numbers["peak_gpu_memory_mib"] > 0
    assert numbers["rollout_our_sampler_ms"] > 0 and numbers["rollout_hf_generate_ms"] > 0


def test_compiled_sampler_records_one_cuda_graph_for_every_rollout(grpo):
    """--compile_sampler's step over rollouts of different article lengths (padded to max_source_length): one
    compile, one CUDA-graph recording replayed by every later step, the token its only input copied per replay
    (the buffers and the bf16 weights are static addresses); no host-to-device copy per step; same tokens as the
    eager static step."""
    import unittest.mock

    import torch._dynamo
    from torch._inductor import cudagraph_trees

    counters = torch._dynamo.utils.counters
    model, device = tiny_bart().cuda(), torch.device("cuda")
    torch._dynamo.reset()
    counters.clear()
    compiled = grpo.StaticCacheDecoderStep(16, compiled=True, max_source_length=12)
    eager = grpo.StaticCacheDecoderStep(16, max_source_length=12)
    record = cudagraph_trees.CUDAGraphTreeManager.record_function
    with unittest.mock.patch.object(cudagraph_trees.CUDAGraphTreeManager, "record_function", autospec=True,
                                    side_effect=record) as recordings:
        for length in (9, 6, 12, 9):
            input_ids, attention_mask = (t.cuda() for t in articles(length=length))
            with grpo.autocast(device):
                ours = grpo.sample_completions(model, input_ids, attention_mask, 4, 16, 2, 1, greedy=True,
                                               step_function=compiled)
                theirs = grpo.sample_completions(model, input_ids, attention_mask, 4, 16, 2, 1, greedy=True,
                                                 step_function=eager)
            assert torch.equal(ours[0], theirs[0])
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            with grpo.autocast(device):
                sequences, _ = grpo.sample_completions(model, input_ids, attention_mask, 4, 16, 2, 1, greedy=True,
                                                       step_function=compiled)
            torch.cuda.synchronize()
    assert recordings.call_count == 1
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert counters["inductor"]["cudagraph_recorded_non_static_inputs"] == 1  # the token
    steps = sequences.size(1) - 2  # the first token comes from the eager first step
    host_to_device = sum("HtoD" in event.name for event in profile.events())
    print(f"host-to-device copies per decode step: {host_to_device / steps:.2f}")
    assert host_to_device < steps  # not one per step
