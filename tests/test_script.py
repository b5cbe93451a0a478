"""Integration tests of grpo_encoder_decoder_summarization.py: whole runs in a subprocess, exact resume,
one encoder pass per article (not per sample), and one clear error line for each kind of bad input.

Everything runs offline on tiny models built from configs in conftest.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import assert_resumed_run_matches, check_ok, data_args, read_jsonl, run_script

# Small but complete runs: 2 articles x 4 samples per step, 8 new tokens.
RUN_ARGS = ("--max_steps=3", "--batch_size=2", "--group_size=4", "--micro_batch_size=4", "--max_new_tokens=8",
            "--max_source_length=64", "--eval_every=2", "--eval_samples=4", "--save_every=2", "--sft_batch_size=4",
            "--device=cpu")
STEP_KEYS = {"step", "loss", "reward_mean", "reward_std", "kl", "clip_fraction", "completion_length", "lr", "seconds",
             "time_generate", "time_reward", "time_reference", "time_forward", "time_backward", "time_optimizer",
             "time_update"}
EVAL_KEYS = {"step", "rouge1", "rouge2", "rougeL", "rougeLsum", "gen_length"}


# --------------------------------------------------------------------------------------------------
# 1. A whole run on T5 and on BART
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, extra", [
    ("t5", ()),
    ("bart", ("--sft_steps=2", "--num_iterations=2")),
], ids=["t5", "bart-sft-mu2"])
def test_full_run(model, extra, tiny_t5_dir, tiny_bart_dir, data_files, tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model_dir = {"t5": tiny_t5_dir, "bart": tiny_bart_dir}[model]
    out = tmp_path / "run"
    result = run_script(f"--model_name={model_dir}", *data_args(data_files), *RUN_ARGS, *extra,
                        f"--output_dir={out}", cwd=tmp_path)
    check_ok(result)

    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    expected_keys = STEP_KEYS | ({"time_old"} if "--num_iterations=2" in extra else set())
    for m in metrics:
        assert expected_keys <= m.keys(), f"missing {expected_keys - m.keys()}"
        for key in expected_keys:
            assert isinstance(m[key], (int, float)) and m[key] == m[key], (key, m[key])  # a number, not NaN
        assert 0.0 <= m["reward_mean"] <= 1.0
        assert m["kl"] >= 0.0 and 0.0 <= m["clip_fraction"] <= 1.0
        assert 0 < m["completion_length"] <= 8

    evals = read_jsonl(out / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2, 3]
    for e in evals:
        assert EVAL_KEYS <= e.keys(), f"missing {EVAL_KEYS - e.keys()}"
        for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
            assert 0.0 <= e[key] <= 1.0

    final = out / "final"
    loaded = AutoModelForSeq2SeqLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert loaded.config.is_encoder_decoder
    original = AutoTokenizer.from_pretrained(model_dir)
    text = "The council of Ashgrove voted on Monday."
    assert tokenizer(text)["input_ids"] == original(text)["input_ids"]
    assert (out / "curves.png").is_file() and (out / "curves.png").stat().st_size > 0
    # pi_ref after SFT is kept for a resumed run; without SFT pi_ref is the model in --model_name
    assert (out / "reference" / "config.json").is_file() == ("--sft_steps=2" in extra)
    # RUN_ARGS passes --sft_batch_size: without SFT the run says it has no effect (never silently ignored)
    note = "note: --sft_batch_size: no effect, since --sft_steps=0 leaves the SFT warm-up out"
    assert (note in result.stderr) == ("--sft_steps=2" not in extra)


# --------------------------------------------------------------------------------------------------
# 2. Resume: no step twice, and the same numbers as a run that was never stopped
# --------------------------------------------------------------------------------------------------
def test_resume_is_exact(tiny_bart_dir, data_files, tmp_path):
    # A learning rate large enough that the policy moves, a constant schedule (so max_steps=2 and max_steps=4
    # runs share their learning rates), and an SFT phase with a high rate so pi_ref differs from the base
    # model: a resumed run that rebuilt pi_ref from the base model would show a different KL.
    common = (f"--model_name={tiny_bart_dir}", *data_args(data_files), "--batch_size=2", "--group_size=4",
              "--micro_batch_size=4", "--max_new_tokens=8", "--max_source_length=64", "--eval_every=2",
              "--eval_samples=4", "--save_every=2", "--device=cpu", "--learning_rate=1e-3",
              "--lr_scheduler=constant", "--warmup_steps=0", "--sft_steps=2", "--sft_batch_size=4",
              "--sft_learning_rate=1e-2", "--num_iterations=2", "--seed=3")
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"

    check_ok(run_script(*common, "--max_steps=2", f"--output_dir={resumed}", cwd=tmp_path))
    assert [m["step"] for m in read_jsonl(resumed / "metrics.jsonl")] == [1, 2]
    result = run_script(*common, "--max_steps=4", "--resume=True", f"--output_dir={resumed}", cwd=tmp_path)
    check_ok(result)
    assert "resumed from" in result.stderr and "at step 2" in result.stderr, result.stderr
    check_ok(run_script(*common, "--max_steps=4", f"--output_dir={straight}", cwd=tmp_path))

    assert [m["step"] for m in read_jsonl(resumed / "metrics.jsonl")] == [1, 2, 3, 4]
    assert [e["step"] for e in read_jsonl(resumed / "eval.jsonl")] == [0, 2, 4]
    assert_resumed_run_matches(resumed, straight, resumed_at=2)


# --------------------------------------------------------------------------------------------------
# 3. The encoder runs once per article, not once per sample; gradients reach encoder and decoder
# --------------------------------------------------------------------------------------------------
def build_in_process(grpo, model_dir, data_files, **overrides):
    """What train() builds (grpo.build_run), in this process: config, device, policy, tokenizer, the reference model,
    optimizer, scheduler, and the first step's batch."""
    import tempfile

    train_file, validation_file = data_files
    settings = dict(model_name=str(model_dir), train_file=str(train_file), validation_file=str(validation_file),
                    group_size=4, batch_size=3, micro_batch_size=12, num_iterations=2, max_new_tokens=8,
                    max_source_length=64, eval_samples=4, device="cpu", learning_rate=1e-2,
                    lr_scheduler="constant", warmup_steps=0, max_steps=1, seed=0,
                    output_dir=tempfile.mkdtemp(prefix="grpo_in_process_"))
    settings.update(overrides)
    config = grpo.Config(**settings)
    grpo.validate_config(config)
    run = grpo.build_run(config, grpo.Distributed(device=torch.device("cpu")), log=lambda message: None)
    assert len(run.train_rows) == 40 and len(run.held_out) == 4
    rows = run.train_rows[grpo.batch_indices(0, config.batch_size, len(run.train_rows), config.seed)]
    return (config, run.dist.device, run.policy, run.tokenizer, run.reference_forward.model, run.optimizer,
            run.scheduler, rows)


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

# --------------------------------------------------------------------------------------------------
# 4. Bad input: a non-zero exit and one "error:" line on stderr, never a traceback
# --------------------------------------------------------------------------------------------------
SMALL_RUN = ("--max_steps=1", "--batch_size=2", "--group_size=2", "--micro_batch_size=2", "--max_new_tokens=4",
             "--max_source_length=32", "--eval_samples=2", "--device=cpu")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def case_unknown_flag(tmp_path, models, data):
    return ["--no_such_flag=3"], 2, ["--no_such_flag"]


def case_group_size_one(tmp_path, models, data):
    return ["--group_size=1"], 2, ["--group_size"]


def case_missing_text_column(tmp_path, models, data):
    train = write_lines(tmp_path / "train.jsonl", [json.dumps({"text": "a b c", "highlights": "a"})] * 3)
    return [f"--train_file={train}"], 1, ["'article'", "'text'", "'highlights'"]


def case_empty_train_file(tmp_path, models, data):
    train = tmp_path / "train.jsonl"
    train.write_text("")
    return [f"--train_file={train}"], 1, [str(train), "empty"]


def case_train_file_does_not_exist(tmp_path, models, data):
    train = tmp_path / "nowhere" / "train.jsonl"
    return [f"--train_file={train}"], 1, [str(train), "does not exist"]


def case_invalid_json_line(tmp_path, models, data):
    good = json.dumps({"article": "a b c", "highlights": "a"})
    train = write_lines(tmp_path / "train.jsonl", [good, good, '{"article": "a b", "highlights": oops}', good])
    return [f"--train_file={train}"], 1, [str(train), "line 3"]


def case_number_article(tmp_path, models, data):
    train = write_lines(tmp_path / "train.jsonl", [json.dumps({"article": "a b c", "highlights": "a"}),
                                                   json.dumps({"article": 42, "highlights": "a"})])
    return [f"--train_file={train}"], 1, ["line 2", "'article'", "string"]


def model_without_tokenizer(tmp_path, model_dir):
    bare = tmp_path / "bare_model"
    bare.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):  # the weights, no tokenizer files
        shutil.copy(Path(model_dir) / name, bare / name)
    return [f"--model_name={bare}"], 1, ["tokenizer", str(bare)]


def case_bart_without_tokenizer(tmp_path, models, data):
    return model_without_tokenizer(tmp_path, models["bart"])


def case_t5_without_tokenizer(tmp_path, models, data):
    return model_without_tokenizer(tmp_path, models["t5"])


def case_encoder_only_model(tmp_path, models, data):
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertModel(config).save_pretrained(bert)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a working tokenizer beside it
        shutil.copy(Path(models["bart"]) / name, bert / name)
    return [f"--model_name={bert}"], 1, ["encoder-decoder", "bert"]


def case_decoder_only_model(tmp_path, models, data):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=64)).save_pretrained(gpt2)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a working tokenizer beside it
        shutil.copy(Path(models["bart"]) / name, gpt2 / name)
    return [f"--model_name={gpt2}"], 1, ["encoder-decoder", "gpt2"]


def case_unreachable_hub_model(tmp_path, models, data):
    name = "no-such-org-7f3a/no-such-summarizer-7f3a"
    return [f"--model_name={name}"], 1, [name, "HF_ENDPOINT"]


def case_unwritable_output_dir(tmp_path, models, data):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    return [f"--output_dir={blocker / 'run'}"], 1, ["--output_dir", str(blocker / "run")]


BAD_INPUTS = [case_unknown_flag, case_group_size_one, case_missing_text_column, case_empty_train_file,
              case_train_file_does_not_exist, case_invalid_json_line, case_number_article,
              case_bart_without_tokenizer, case_t5_without_tokenizer, case_encoder_only_model, case_decoder_only_model,
              case_unreachable_hub_model,
              case_unwritable_output_dir]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.__name__.removeprefix("case_") for c in BAD_INPUTS])
def test_bad_input_gives_one_error_line(case, tiny_bart_dir, tiny_t5_dir, data_files, tmp_path):
    bad_args, exit_code, must_mention = case(tmp_path, {"bart": tiny_bart_dir, "t5": tiny_t5_dir}, data_files)
    # Later flags win, so each case's own flag replaces the good default given before it.
    args = [f"--model_name={tiny_bart_dir}", *data_args(data_files), *SMALL_RUN, f"--output_dir={tmp_path / 'out'}",
            *bad_args]
    result = run_script(*args, cwd=tmp_path)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"exit {result.returncode}, stderr:\n{result.stderr}"
    assert result.returncode == exit_code, f"exit {result.returncode}, stderr:\n{result.stderr}"
    for text in must_mention:
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"


def test_zero_std_groups_counts_groups_whose_rewards_are_all_equal(grpo, tiny_bart_dir, data_files, monkeypatch):
    config, device, policy, tokenizer, reference, optimizer, scheduler, rows = build_in_process(
        grpo, tiny_bart_dir, data_files, num_iterations=1)
    for rewards, expected in (([0.3] * 4, 1.0), ([0.1, 0.2, 0.3, 0.4], 0.0)):
        monkeypatch.setattr(grpo, "rouge_rewards",
                            lambda p, r, w=None, t="default", values=rewards: values * config.batch_size)
        rollout, stats = grpo.rollout_step(policy, tokenizer, rows, config, device, grpo.PhaseTimer(device))
        assert stats["zero_std_groups"] == expected
        assert bool((rollout.advantages == 0).all()) == (expected == 1.0)


def test_a_custom_reward_is_used(grpo, tiny_bart_dir, data_files, monkeypatch):
    """compute_rewards is the one place to plug in a reward: the rollout's rewards and advantages come from it."""
    config, device, policy, tokenizer, reference, optimizer, scheduler, rows = build_in_process(
        grpo, tiny_bart_dir, data_files, num_iterations=1)
    seen = {}

    def brevity_bonus(predictions, references, articles, config):  # shorter is better: -(number of words)
        seen.update(predictions=predictions, references=references, articles=articles)
        return [-float(len(p.split())) for p in predictions]

    monkeypatch.setattr(grpo, "compute_rewards", brevity_bonus)
    rollout, stats = grpo.rollout_step(policy, tokenizer, rows, config, device, grpo.PhaseTimer(device))
    G = config.group_size
    assert seen["articles"] == [a for a in rows[config.text_column] for _ in range(G)]
    assert seen["references"] == [r for r in rows[config.summary_column] for _ in range(G)]
    rewards = torch.tensor([-float(len(p.split())) for p in seen["predictions"]])
    assert stats["reward_mean"] == pytest.approx(rewards.mean().item())
    assert torch.equal(rollout.advantages, grpo.group_advantages(rewards, G, scale=config.scale_rewards))


@pytest.mark.parametrize("rewards, problem", [([0.5], "1 rewards for 2"), ([0.5, float("nan")], "nan")])
def test_a_reward_that_breaks_the_contract_is_one_clear_error(grpo, rewards, problem):
    with pytest.raises(grpo.UserError, match="one finite float per summary") as info:
        grpo.checked_rewards(rewards, ["a", "b"])
    assert problem in str(info.value)
