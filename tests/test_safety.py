"""Never lose or silently corrupt a run (issue 9): output dirs, the saved config and resume checks, SIGTERM,
checkpoints of another model, bad inputs, and four correctness bugs with their reproducers (DAPO under DDP,
SFT EOS targets when pad == eos, layerdrop with gradient checkpointing, forced first tokens).

Everything runs offline on the tiny models of conftest.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import ROOT, check_ok, data_args, read_jsonl, run_torchrun

TINY = ("--batch_size=2", "--group_size=4", "--micro_batch_size=8", "--max_new_tokens=8", "--eval_samples=4",
        "--device=cpu")
# An earlier run: 2 steps with mu = 2 (so every phase is timed), articles cut to 8 tokens (so some are truncated).
EARLIER = (*TINY, "--max_steps=2", "--num_iterations=2", "--save_every=1", "--eval_every=2", "--learning_rate=1e-3",
           "--warmup_steps=1", "--max_source_length=8")


def main_in_process(grpo, *flags: str) -> subprocess.CompletedProcess:
    """grpo.main(flags) in this process (no interpreter start-up: faster than run_script), stdout/stderr captured."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = grpo.main([str(flag) for flag in flags])
    return subprocess.CompletedProcess(flags, code, stdout.getvalue(), stderr.getvalue())


@pytest.fixture(scope="module")
def earlier_run(grpo, tiny_bart_dir, data_files, tmp_path_factory):
    """(output_dir, stderr, flags) of a finished 2-step run; tests copy the directory before changing it."""
    directory = tmp_path_factory.mktemp("earlier")
    flags = (f"--model_name={tiny_bart_dir}", *data_args(data_files), *EARLIER)
    result = main_in_process(grpo, *flags, f"--output_dir={directory / 'run'}")
    check_ok(result)
    return directory / "run", result.stderr, flags


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def one_error(result, exit_code: int) -> str:
    """The single error line of a run that must stop with exit_code and no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and result.returncode == exit_code, f"exit {result.returncode}\n{result.stderr}"
    return errors[0]


# --------------------------------------------------------------------------------------------------
# 1. Output dir: a fresh run never deletes an earlier one unless asked to
# --------------------------------------------------------------------------------------------------
def test_fresh_run_into_an_earlier_run_stops_and_keeps_it(grpo, earlier_run, tmp_path):
    run_dir, _, flags = earlier_run
    out = copy_of(run_dir, tmp_path)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    error = one_error(main_in_process(grpo, *flags, f"--output_dir={out}"), 2)
    assert "--resume=True" in error and "--overwrite_output_dir=True" in error and str(out) in error
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing deleted or added


def test_overwrite_output_dir_deletes_the_earlier_run(grpo, earlier_run, tmp_path):
    run_dir, _, _ = earlier_run
    out = copy_of(run_dir, tmp_path)
    (out / "notes.txt").write_text("the user's own file")
    messages = []
    config = grpo.Config(output_dir=str(out), overwrite_output_dir=True)
    grpo.check_output_dir(config)
    grpo.prepare_output_dir(config, messages.append)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # the run's files only
    assert len(messages) == 1 and "deleting the earlier run" in messages[0] and "checkpoints" in messages[0]
    grpo.check_output_dir(dataclasses.replace(config, overwrite_output_dir=False))  # now empty: a fresh run may start


def test_benchmark_follows_the_same_rule(grpo, tmp_path):
    (tmp_path / "benchmark.json").write_text("{}")
    error = one_error(main_in_process(grpo, "--benchmark", f"--output_dir={tmp_path}"), 2)
    assert "--overwrite_output_dir=True" in error
    assert (tmp_path / "benchmark.json").read_text() == "{}"


# --------------------------------------------------------------------------------------------------
# 2. The saved config and what --resume=True may change
# --------------------------------------------------------------------------------------------------
def test_run_config_is_saved_in_output_dir_and_every_checkpoint(grpo, earlier_run):
    run_dir, _, _ = earlier_run
    saved = json.loads((run_dir / grpo.RUN_CONFIG_FILE).read_text())
    assert set(saved) == {f.name for f in dataclasses.fields(grpo.Config)}
    assert saved["group_size"] == 4 and saved["num_iterations"] == 2 and saved["max_source_length"] == 8
    for checkpoint in (run_dir / "checkpoints").iterdir():
        payload = torch.load(checkpoint, map_location="cpu", weights_only=False)
        assert payload["config"] == saved


def changed_value(value):
    """A different value of the same type, for any Config field."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "_changed"
    return 0.5  # None (epsilon_high)


def test_every_field_but_the_bookkeeping_ones_counts_as_changing_the_run(grpo):
    """No list of trajectory fields: a field another branch adds later is checked by default."""
    saved = dataclasses.asdict(grpo.Config())
    assert grpo.RESUME_BOOKKEEPING_FIELDS | grpo.RESUME_IGNORED_FIELDS <= set(saved)
    for field in dataclasses.fields(grpo.Config):
        changed = dataclasses.replace(grpo.Config(), **{field.name: changed_value(saved[field.name])})
        trajectory, bookkeeping = grpo.changed_on_resume(saved, changed)
        if field.name in grpo.RESUME_IGNORED_FIELDS:  # --resume and --overwrite_output_dir
            assert trajectory == bookkeeping == []
            continue
        expected = f"--{field.name}: {saved[field.name]!r} -> {getattr(changed, field.name)!r}"
        assert (bookkeeping if field.name in grpo.RESUME_BOOKKEEPING_FIELDS else trajectory) == [expected]
        assert not (trajectory if field.name in grpo.RESUME_BOOKKEEPING_FIELDS else bookkeeping)
    # a field missing from an older saved config counts as its default
    older = {k: v for k, v in saved.items() if k != "beta"}
    assert grpo.changed_on_resume(older, grpo.Config()) == ([], [])
    assert grpo.changed_on_resume(older, grpo.Config(beta=0.5))[0] == [f"--beta: {grpo.Config().beta!r} -> 0.5"]


def test_resume_with_trajectory_changes_stops_with_one_line(grpo, earlier_run, tmp_path):
    run_dir, _, flags = earlier_run
    out = copy_of(run_dir, tmp_path)
    result = main_in_process(grpo, *flags, "--learning_rate=5e-4", "--group_size=2", "--seed=3", "--eval_every=5",
                             "--resume=True", f"--output_dir={out}")
    error = one_error(result, 2)
    for change in ("--learning_rate: 0.001 -> 0.0005", "--group_size: 4 -> 2", "--seed: 0 -> 3"):
        assert change in error, error
    assert "eval_every" not in error  # bookkeeping is allowed


def test_resume_with_another_model_stops_with_one_line(grpo, earlier_run, tiny_t5_dir, tmp_path):
    run_dir, _, flags = earlier_run
    out = copy_of(run_dir, tmp_path)
    result = main_in_process(grpo, *flags, f"--model_name={tiny_t5_dir}", "--resume=True", f"--output_dir={out}")
    error = one_error(result, 2)
    assert "--model_name: '" in error and f"-> '{tiny_t5_dir}'" in error and len(result.stderr) < 2000


def test_loading_a_checkpoint_of_another_model_is_one_line(grpo, tiny_bart_dir, tiny_t5_dir, tmp_path):
    """The guard on load_state_dict itself (a checkpoint without a config, or a model dir changed in place)."""
    from transformers import AutoModelForSeq2SeqLM, get_scheduler

    def parts(model_dir):
        model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
        optimizer = torch.optim.AdamW(model.parameters())
        return model, optimizer, get_scheduler("constant", optimizer)

    bart, optimizer, scheduler = parts(tiny_bart_dir)
    path = grpo.save_checkpoint(str(tmp_path), bart, optimizer, scheduler, grpo.TrainerState(step=1),
                                [grpo.rng_state()], keep=1)
    with pytest.raises(grpo.UserError) as info:
        grpo.load_checkpoint(path, *parts(tiny_t5_dir), rank=0)
    message = str(info.value)
    assert "different model" in message and "\n" not in message and len(message) < 400
    assert grpo.load_checkpoint(path, *parts(tiny_bart_dir), rank=0).step == 1  # the right model still loads


def test_resume_with_bookkeeping_changes_and_longer_max_steps(grpo, earlier_run, tmp_path):
    run_dir, _, flags = earlier_run
    out = copy_of(run_dir, tmp_path)
    result = main_in_process(grpo, *flags, "--max_steps=3", "--eval_every=3", "--keep_checkpoints=1", "--resume=True",
                             f"--output_dir={out}")
    check_ok(result)
    bookkeeping = next(line for line in result.stderr.splitlines() if "resuming with changed bookkeeping" in line)
    assert "--eval_every: 2 -> 3" in bookkeeping and "--keep_checkpoints: 2 -> 1" in bookkeeping
    assert "--resume" not in bookkeeping, bookkeeping
    # the linear schedule had decayed to 0 at step 2 of 2; over 3 steps it continues at the value of step 2 of 3
    line = next(line for line in result.stderr.splitlines() if "schedule now runs over 3 steps" in line)
    assert "not 0" in line and "uses lr 0.0004" in line, line  # 1e-3 * (6 - 4) / (6 - 1): 4 of 6 optimizer steps
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    assert json.loads((out / "run_config.json").read_text())["max_steps"] == 3


@pytest.mark.parametrize("name", ["linear", "cosine", "constant_with_warmup", "polynomial", "inverse_sqrt"])
def test_continue_lr_schedule_gives_the_lr_of_a_run_with_the_new_max_steps(grpo, name):
    from transformers import get_scheduler

    assert name in grpo.scheduler_names()

    def parts(total):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=1e-3)
        return optimizer, get_scheduler(name, optimizer, 2, total)

    old_optimizer, old_scheduler = parts(total=10)
    for _ in range(10):  # the old run finished its schedule
        old_optimizer.step()
        old_scheduler.step()
    optimizer, scheduler = parts(total=30)  # resumed with 3x max_steps
    optimizer.load_state_dict(old_optimizer.state_dict())
    scheduler.load_state_dict(old_scheduler.state_dict())
    old_lr, new_lr = grpo.continue_lr_schedule(scheduler, optimizer)
    reference_optimizer, reference_scheduler = parts(total=30)
    for _ in range(10):
        reference_optimizer.step()
        reference_scheduler.step()
    assert old_lr == old_scheduler.get_last_lr()[0]
    for _ in range(5):  # the lr of each later update is the fresh schedule's too
        assert optimizer.param_groups[0]["lr"] == reference_optimizer.param_groups[0]["lr"]
        assert scheduler.get_last_lr() == reference_scheduler.get_last_lr()
        optimizer.step()
        scheduler.step()
        reference_optimizer.step()
        reference_scheduler.step()
    if name == "linear":
        assert old_lr == 0.0 and new_lr > 0  # the bug: the first update after resume used the old schedule's 0


# --------------------------------------------------------------------------------------------------
# 3. SIGTERM: like Ctrl-C, exit 143 (tested with Ctrl-C: test_robustness.py::test_a_signal_saves_and_resumes)
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# 4. Bad inputs: one clear line each
# --------------------------------------------------------------------------------------------------
def bad_main(grpo, capsys, tmp_path, tiny_bart_dir, data_files, *flags) -> tuple[int, str]:
    """main() on a good tiny setup plus `flags` (later flags win); returns (exit code, its single error line)."""
    code = grpo.main([f"--model_name={tiny_bart_dir}", *data_args(data_files), *TINY, "--max_steps=1",
                      f"--output_dir={tmp_path / 'out'}", *flags])
    stderr = capsys.readouterr().err
    errors = error_lines(stderr)
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return code, errors[0]


def test_non_utf8_jsonl_names_line_and_byte(grpo, capsys, tmp_path, tiny_bart_dir, data_files):
    train = tmp_path / "train.jsonl"
    train.write_bytes(data_files[0].read_bytes().splitlines(keepends=True)[0]
                      + b'{"article": "caf\xe9 au lait", "highlights": "x"}\n')
    code, error = bad_main(grpo, capsys, tmp_path, tiny_bart_dir, data_files, f"--train_file={train}")
    assert code == 1 and "line 2" in error and "byte 17" in error and "UTF-8" in error, error
    assert grpo.earlier_run_files(str(tmp_path / "out")) == []  # a run that failed on its data is no earlier run


def test_non_utf8_csv(grpo, capsys, tmp_path, tiny_bart_dir, data_files):
    train = tmp_path / "train.csv"
    train.write_bytes(b"article,highlights\nfirst article,first summary\nna\xefve text,summary\n")
    code, error = bad_main(grpo, capsys, tmp_path, tiny_bart_dir, data_files, f"--train_file={train}")
    assert code == 1 and "line 3" in error and "re-save" in error and "UTF-8" in error, error


def test_json_object_of_column_lists_explains_the_layouts(grpo, capsys, tmp_path, tiny_bart_dir, data_files):
    rows = read_jsonl(data_files[0])
    train = tmp_path / "train.json"
    train.write_text(json.dumps({"article": [r["article"] for r in rows], "highlights": [r["highlights"] for r in rows]}))
    code, error = bad_main(grpo, capsys, tmp_path, tiny_bart_dir, data_files, f"--train_file={train}")
    assert code == 1 and "object of column lists" in error and "JSON Lines" in error, error
    listed = tmp_path / "list.json"  # the accepted layout: a list of row objects
    listed.write_text(json.dumps(rows))
    assert len(grpo.load_local_file(str(listed), ("article", "highlights"))) == len(rows)


def test_unknown_lr_scheduler_lists_the_valid_names(grpo, capsys, tmp_path, tiny_bart_dir, data_files):
    code, error = bad_main(grpo, capsys, tmp_path, tiny_bart_dir, data_files, "--lr_scheduler=cosin")
    assert code == 2 and "--lr_scheduler=cosin" in error and "cosine" in error and "linear" in error, error
    assert not (tmp_path / "out").exists()  # stopped with the other flags, before anything was written


def test_text_column_equal_to_summary_column(grpo, capsys, tmp_path, tiny_bart_dir, data_files):
    code, error = bad_main(grpo, capsys, tmp_path, tiny_bart_dir, data_files, "--summary_column=article")
    assert code == 2 and "--text_column" in error and "--summary_column" in error, error


@pytest.mark.parametrize("name", ["/no/such/model_dir", "./no_such_dir", "~/no_such_dir_7f3a", "runs/x/final"])
def test_missing_local_model_directory(grpo, capsys, tmp_path, tiny_bart_dir, data_files, name):
    code, error = bad_main(grpo, capsys, tmp_path, tiny_bart_dir, data_files, f"--model_name={name}")
    assert code == 1 and "does not exist" in error and name in error, error
    assert not grpo.looks_like_local_path("facebook/bart-base") and not grpo.looks_like_local_path("t5-small")


def test_group_size_three_with_the_default_micro_batch_size(grpo, capsys, tmp_path, tiny_bart_dir, data_files):
    default = grpo.Config().micro_batch_size
    code, error = bad_main(grpo, capsys, tmp_path, tiny_bart_dir, data_files, "--group_size=3",
                           f"--micro_batch_size={default}")
    assert code == 2 and f"--micro_batch_size={default}" in error and "--group_size=3" in error, error
    suggestion = int(re.search(r"use e\.g\. --micro_batch_size=(\d+)", error).group(1))
    grpo.validate_config(dataclasses.replace(grpo.Config(), group_size=3, micro_batch_size=suggestion))


def test_truncated_articles_are_reported_once_on_the_console(earlier_run):
    _, stderr, _ = earlier_run
    lines = [line for line in stderr.splitlines() if "--max_source_length=8 tokens and were truncated" in line]
    assert len(lines) == 1, stderr
    assert re.search(r"\d+ of 4 training articles \(\d+\.\d%\)", lines[0]), lines[0]


# --------------------------------------------------------------------------------------------------
# 5. Correctness bugs, each with its reproducer
# --------------------------------------------------------------------------------------------------
DDP_GRADIENTS = r'''
import os, sys
import torch
sys.path.insert(0, sys.argv[1])
import grpo_encoder_decoder_summarization as grpo
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

torch.distributed.init_process_group("gloo")
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


def test_micro_batch_weight_uses_the_token_count_of_all_processes(grpo):
    micro, full = torch.ones(2, 5), torch.ones(4, 5)
    assert grpo.micro_batch_weight("dapo", micro, full) == 0.5
    assert grpo.micro_batch_weight("dapo", micro, full, world_token_count=40, world_size=2) == 10 * 2 / 40
    assert grpo.micro_batch_weight("grpo", micro, full, world_token_count=40, world_size=2) == 0.5


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


def test_exclude_forced_tokens(grpo):
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    assert torch.equal(grpo.exclude_forced_tokens(mask, None), mask)
    assert grpo.exclude_forced_tokens(mask, 0).tolist() == [[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]


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


# --------------------------------------------------------------------------------------------------
# 6. CPU threads, and README's metrics.jsonl / eval.jsonl field lists
# --------------------------------------------------------------------------------------------------
def test_cpu_thread_count(grpo):
    assert grpo.cpu_thread_count({"OMP_NUM_THREADS": "3"}, cores=16) is None  # the user's choice wins
    assert grpo.cpu_thread_count({}, cores=16) == 16
    assert grpo.cpu_thread_count({"LOCAL_WORLD_SIZE": "4"}, cores=16) == 4
    assert grpo.cpu_thread_count({"LOCAL_WORLD_SIZE": "4"}, cores=2) == 1


def readme_fields(file_name: str) -> set[str]:
    from grpo_encoder_decoder_summarization import ROUGE_KEYS

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith(f"| `{file_name}` |"))
    names = re.findall(r"`([\w<>]+)`", row.split("|")[2])  # `<metric>_ci_low` stands for each ROUGE key's
    return {name.replace("<metric>", key) for name in names for key in ROUGE_KEYS}


def test_readme_lists_exactly_the_metrics_the_script_writes(earlier_run):
    """Like the configuration table: README's field lists of metrics.jsonl and eval.jsonl are what a run writes
    (a run with mu = 2, so that every phase is timed)."""
    run_dir, _, _ = earlier_run
    written = set().union(*(record.keys() for record in read_jsonl(run_dir / "metrics.jsonl")))
    documented = readme_fields("metrics.jsonl") - {"max_new_tokens"}
    assert documented == written, (sorted(documented - written), sorted(written - documented))
    written = set().union(*(record.keys() for record in read_jsonl(run_dir / "eval.jsonl")))
    assert readme_fields("eval.jsonl") - {"eval_every"} == written
