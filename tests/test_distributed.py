"""Several processes: torchrun with 2 CPU processes (gloo), the DDP path of the same file (with LoRA too), DDP
gradients equal to one process's for every loss type, the batch reward std over all processes, each process's own
articles, the CPU threads each process gets, and a signal on one rank stopping both at the same boundary.

Every helper that starts a process group ends it the same way: a barrier once every process is done with its
collectives (so that none tears the group down while another still works: gloo then aborts the process with
"terminate called without an active exception"), and destroy_process_group in a finally.
"""

from __future__ import annotations

import json
import re
import shlex

import pytest
import torch

from conftest import (ROOT, SCRIPT, TORCHRUN_ARGS, check_ok, checkpoint_names, data_args, needs_peft, read_jsonl,
                      run_torchrun)


def test_batch_indices_give_each_process_its_own_articles(grpo):
    """Within a step the two ranks' rows are disjoint, and together they are the global batch."""
    for step in range(5):
        rank0 = grpo.batch_indices(step, 4, 30, seed=0, rank=0, world_size=2)
        rank1 = grpo.batch_indices(step, 4, 30, seed=0, rank=1, world_size=2)
        assert not set(rank0) & set(rank1)
        assert rank0 + rank1 == grpo.batch_indices(step, 8, 30, seed=0)


def test_cpu_thread_count(grpo):
    assert grpo.cpu_thread_count({"OMP_NUM_THREADS": "3"}, cores=16) is None  # the user's choice wins
    assert grpo.cpu_thread_count({}, cores=16) == 16
    assert grpo.cpu_thread_count({"LOCAL_WORLD_SIZE": "4"}, cores=16) == 4
    assert grpo.cpu_thread_count({"LOCAL_WORLD_SIZE": "4"}, cores=2) == 1


# --------------------------------------------------------------------------------------------------
# torchrun runs of the script: the DDP path, a resume under DDP, and LoRA
# --------------------------------------------------------------------------------------------------
def test_torchrun_two_processes(untied_bart_dir, data_files, tmp_path):
    """The demo's untied BART, whose unused `shared` embedding the start check freezes (DDP would stop on it)."""
    train_file, validation_file = data_files
    output_dir = tmp_path / "ddp"
    flags = (f"--model_name={untied_bart_dir}", f"--train_file={train_file}", f"--validation_file={validation_file}",
             *TORCHRUN_ARGS, "--learning_rate=1e-3", f"--output_dir={output_dir}")
    result = run_torchrun(*flags)
    check_ok(result)
    match = re.search(r"weights identical on all 2 processes \(checksum (\S+)\)", result.stderr)
    assert match, result.stderr[-3000:]
    metrics = read_jsonl(output_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]  # rank 0 alone writes, one line per step
    assert all(m["articles"] == 2 * 2 for m in metrics)  # 2 processes x batch_size
    evaluations = read_jsonl(output_dir / "eval.jsonl")
    assert [e["step"] for e in evaluations] == [0, 2]
    assert (output_dir / "final" / "config.json").exists()

    # resume under DDP: two more steps from the step-2 checkpoint (a repeated flag: the last one wins)
    resumed = run_torchrun(*flags, "--max_steps=4", "--resume=True")
    check_ok(resumed)
    assert "resumed from" in resumed.stderr and "weights identical on all 2 processes" in resumed.stderr
    metrics = read_jsonl(output_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]


@needs_peft
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


# --------------------------------------------------------------------------------------------------
# DDP gradients equal one process's, for every loss type (dapo's token count over all processes)
# --------------------------------------------------------------------------------------------------
DDP_GRADIENTS = r'''
import os, sys
import torch
sys.path.insert(0, sys.argv[1])
import grpo_encoder_decoder_summarization as grpo
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

torch.distributed.init_process_group("gloo")
try:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model_dir, train_file, out = sys.argv[2], sys.argv[3], sys.argv[4]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    import json
    rows = [json.loads(line) for line in open(train_file)][:4]
    G, T = 4, 12

    def build(config):
        policy = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        encoded, _ = grpo.tokenize_articles(tokenizer, [r["article"] for r in rows], config, torch.device("cpu"))
        generator = torch.Generator().manual_seed(0)
        completion = torch.randint(5, len(tokenizer), (4 * G, T), generator=generator)
        lengths = [1, 2, 3, 2, 3, 1, 2, 4, 9, 12, 10, 11, 12, 8, 12, 10]  # rank 0's articles: few tokens, rank 1's: many
        for i, length in enumerate(lengths):
            if length < T:
                completion[i, length - 1] = tokenizer.eos_token_id
        start = torch.full((4 * G, 1), policy.config.decoder_start_token_id)
        decoder_input_ids = torch.cat([start, completion[:, :-1]], dim=1)
        mask, _ = grpo.completion_mask(completion, tokenizer.eos_token_id)
        advantages = torch.randn(4 * G, generator=generator)
        with torch.no_grad():
            logits = grpo.GroupedSeq2Seq(policy)(encoded["input_ids"], encoded["attention_mask"], decoder_input_ids, G)
            logprobs = grpo.token_logprobs(logits, completion)
        old = logprobs + 0.3 * torch.randn(logprobs.shape, generator=generator)
        ref = logprobs + 0.2 * torch.randn(logprobs.shape, generator=generator)
        rollout = grpo.Rollout(encoded["input_ids"], encoded["attention_mask"], decoder_input_ids, completion, mask,
                               advantages, ref, old)
        return policy, rollout

    def gradients(policy, forward, rollout, config):
        optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        grpo.grpo_update(forward, optimizer, scheduler, rollout, config, torch.device("cpu"),
                         grpo.PhaseTimer(torch.device("cpu")))
        return torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])

    results = {}
    for loss_type in grpo.LOSS_TYPES:
        config = grpo.Config(group_size=G, batch_size=2, micro_batch_size=G, max_new_tokens=T, max_source_length=64,
                             loss_type=loss_type, max_grad_norm=1e9, epsilon=0.2, beta=0.04)
        policy, full = build(config)
        articles, samples = slice(2 * rank, 2 * rank + 2), slice(2 * G * rank, 2 * G * (rank + 1))
        mine = grpo.Rollout(full.input_ids[articles], full.attention_mask[articles], full.decoder_input_ids[samples],
                            full.completion_ids[samples], full.mask[samples], full.advantages[samples],
                            full.ref_logprobs[samples], full.old_logprobs[samples])
        ddp = torch.nn.parallel.DistributedDataParallel(grpo.GroupedSeq2Seq(policy))
        distributed = gradients(policy, ddp, mine, config)
        if rank == 0:
            single_policy, _ = build(config)
            single = gradients(single_policy, grpo.GroupedSeq2Seq(single_policy), full, config)
            results[loss_type] = ((distributed - single).norm() / single.norm()).item()
            results[loss_type + "_tokens"] = [int(full.mask[:2 * G].sum()), int(full.mask[2 * G:].sum())]
    if rank == 0:
        json.dump(results, open(out, "w"))
    torch.distributed.barrier()  # both processes are done with every collective: only then tear down
finally:
    torch.distributed.destroy_process_group()
'''


def test_two_process_gradients_equal_one_process_gradients_for_every_loss_type(grpo, tiny_bart_dir, data_files,
                                                                                 tmp_path):
    """DDP on 2 gloo processes (2 articles each) against one process on the same 4 articles and samples. The two
    processes hold very different token counts, which is what made dapo's per-process normalization wrong."""
    helper, out = tmp_path / "ddp_gradients.py", tmp_path / "differences.json"
    helper.write_text(DDP_GRADIENTS)
    result = run_torchrun(ROOT, tiny_bart_dir, data_files[0], out, script=helper)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    differences = json.loads(out.read_text())
    rank0_tokens, rank1_tokens = differences["dapo_tokens"]
    assert rank1_tokens > 2 * rank0_tokens  # the processes' own token counts differ a lot
    for loss_type in grpo.LOSS_TYPES:
        assert differences[loss_type] < 1e-5, (loss_type, differences)


# --------------------------------------------------------------------------------------------------
# scale_rewards=batch: the std of every process's rewards
# --------------------------------------------------------------------------------------------------
def _batch_std_worker(rank: int, init_file: str, results) -> None:
    import grpo_encoder_decoder_summarization as grpo

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        rewards = torch.tensor([[0.0, 1.0, 2.0, 2.0], [4.0, 4.0, 0.5, 1.5]][rank])
        results[rank] = grpo.batch_reward_std(rewards).item()
        torch.distributed.barrier()  # both processes are done with every collective: only then tear down
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


# --------------------------------------------------------------------------------------------------
# Pre-emption under torchrun (gloo): a signal on one rank; both stop at the same boundary and save
# --------------------------------------------------------------------------------------------------
SIGNAL_ON_RANK_1 = """
import os, signal, sys
sys.path.insert(0, {root!r})
import grpo_encoder_decoder_summarization as grpo
original, calls = grpo.grpo_loss, [0]
def grpo_loss(*args, **kwargs):  # rank 1 alone: SIGTERM in the first micro-batch of step 2's update
    calls[0] += 1
    if calls[0] == 3 and os.environ["RANK"] == "1" and "--resume=True" not in sys.argv:
        os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)
grpo.grpo_loss = grpo_loss
sys.exit(grpo.main())
"""


def test_two_processes_stop_at_the_same_boundary(tiny_bart_dir, data_files, tmp_path):
    """SIGTERM reaches rank 1 only, inside step 2's update (2 micro-batches per process): both ranks agree at the
    next micro-batch, save step 1 and exit 143; nobody waits in a collective alone. 5 held-out articles in batches
    of 1 give the ranks 3 and 2 evaluation batches: they still pass the same boundaries. The resume under torchrun
    (the printed command's launcher) ends as the run never stopped."""
    from conftest import assert_resumed_run_matches, run_torchrun

    wrapper = tmp_path / "signal_rank_1.py"
    wrapper.write_text(SIGNAL_ON_RANK_1.format(root=str(SCRIPT.parent)))
    common = [f"--model_name={tiny_bart_dir}", *data_args(data_files), "--batch_size=2", "--group_size=4",
              "--micro_batch_size=4", "--max_new_tokens=8", "--max_source_length=64", "--eval_samples=5",
              "--eval_batch_size=1", "--eval_every=2", "--save_every=100", "--sft_steps=1", "--learning_rate=1e-3",
              "--device=cpu", "--max_steps=3"]
    out, straight = tmp_path / "stopped", tmp_path / "straight"
    stopped = run_torchrun(*common, f"--output_dir={out}", script=wrapper)
    assert stopped.returncode != 0 and "KeyboardInterrupt" not in stopped.stderr, stopped.stderr[-3000:]
    assert "stopped at step 1; checkpoint saved" in stopped.stderr, stopped.stderr[-3000:]
    assert re.search(r"exitcode\s*:\s*143", stopped.stderr), stopped.stderr[-3000:]  # torchrun's report of a rank
    assert checkpoint_names(out) == ["step_00000001.pt"]
    assert torch.load(out / "checkpoints" / "step_00000001.pt", weights_only=False)["world_size"] == 2
    command = [line for line in stopped.stderr.splitlines() if "Continue with: " in line][0]
    assert shlex.split(command.split("Continue with: ", 1)[1])[:3] == ["torchrun", "--standalone",
                                                                       "--nproc_per_node=2"]
    resumed = run_torchrun(*common, f"--output_dir={out}", "--resume=True", script=wrapper)
    check_ok(resumed)
    assert "at step 1" in resumed.stderr, resumed.stderr[-3000:]
    check_ok(run_torchrun(*common, f"--output_dir={straight}", script=SCRIPT))
    assert_resumed_run_matches(out, straight, resumed_at=1)
