"""Shared fixtures and helpers of the tests of grpo_encoder_decoder_summarization.py.

The test files follow the script's sections: test_math (advantages, masks, log-probs, the loss), test_sampler,
test_update (grpo_update / grpo_step, SFT, LoRA), test_reward (ROUGE, custom rewards, sentence splitting),
test_flags (parse_args, --help, validate_config, one error line per bad input), test_runs (whole runs, checkpoints,
resume, signals, output dirs, data files), test_evaluation, test_demo, test_distributed (torchrun) and test_cuda.

Everything is built offline from configs (no downloads): a tiny T5 with the byte-level ByT5 tokenizer, a tiny
BART with a word-level tokenizer trained on the script's own synthetic corpus (and a copy shrunk to 64 positions),
and small .jsonl splits.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "grpo_encoder_decoder_summarization.py"


if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def grpo():
    """The script imported as a module."""
    return importlib.import_module("grpo_encoder_decoder_summarization")


def subprocess_env(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # never join a torchrun process group by accident
        env.pop(name, None)
    env.update(overrides)
    return env


# How long a child process may run before it counts as hung: a guard against hangs, never a speed requirement
# (the CPU may be shared and slow; a healthy tiny run takes seconds).
HANG_TIMEOUT = 900


def run_script(*args: str, cwd: str | os.PathLike | None = None, timeout: float = HANG_TIMEOUT,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the script in a fresh interpreter, offline, capturing stdout and stderr as text."""
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, env=env or subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def main_in_process(grpo, *flags: str, child_threads: bool = False) -> subprocess.CompletedProcess:
    """grpo.main(flags) in this process (no interpreter start-up: seconds faster than run_script), in a child's
    environment (subprocess_env), stdout and stderr captured. child_threads: with a child's one thread, so that
    its numbers equal run_script's; else with this process's thread count."""
    import torch

    stdout, stderr, threads, environ = io.StringIO(), io.StringIO(), torch.get_num_threads(), dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(subprocess_env())  # OMP_NUM_THREADS is set there, so the script keeps torch's threads
        torch.set_num_threads(1 if child_threads else threads)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = grpo.main([str(flag) for flag in flags])
    finally:
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environ)
    return subprocess.CompletedProcess(flags, code, stdout.getvalue(), stderr.getvalue())


def run_torchrun(*args: str, script=SCRIPT, processes: int = 2,
                 timeout: float = HANG_TIMEOUT) -> subprocess.CompletedProcess:
    """`torchrun --standalone` of the script (or another file) with `processes` CPU processes (gloo), offline."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(script), *map(str, args)]
    return subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


# The flags of a 2-step torchrun run on the tiny models: 2 articles x 4 samples per process, SFT first.
TORCHRUN_ARGS = ("--max_steps=2", "--batch_size=2", "--group_size=4", "--micro_batch_size=4", "--max_new_tokens=8",
                 "--max_source_length=64", "--eval_every=2", "--eval_samples=5", "--save_every=2", "--sft_steps=1",
                 "--device=cpu")


def read_jsonl(path) -> list[dict]:
    """The records of a .jsonl file (blank lines skipped)."""
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def checkpoint_names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.endswith(".pt"))


def check_ok(result) -> None:
    """A finished run exited 0 without a traceback (the output is shown when it did not)."""
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr


def assert_resumed_run_matches(resumed, straight, resumed_at: int) -> None:
    """A run resumed at step `resumed_at` logged the numbers of a run that was never stopped and ended with the
    same weights: metrics.jsonl (reward_mean, loss, kl, lr, completion_length) and eval.jsonl step by step, to
    rel 1e-6, and final/ to rtol 1e-6. The policy must move after the resume (kl > 0), or equal numbers say nothing.
    """
    import pytest
    import torch
    from safetensors.torch import load_file

    ours, theirs = read_jsonl(Path(resumed) / "metrics.jsonl"), read_jsonl(Path(straight) / "metrics.jsonl")
    assert [m["step"] for m in ours] == [m["step"] for m in theirs] == list(range(1, len(theirs) + 1))
    for mine, other in zip(ours, theirs):
        for key in ("reward_mean", "loss", "kl", "lr", "completion_length"):
            assert mine[key] == pytest.approx(other[key], rel=1e-6, abs=1e-12), (mine["step"], key)
    assert any(m["kl"] > 0 for m in ours[resumed_at:]), "the policy never moved: the comparison would be vacuous"
    ours, theirs = read_jsonl(Path(resumed) / "eval.jsonl"), read_jsonl(Path(straight) / "eval.jsonl")
    assert [e["step"] for e in ours] == [e["step"] for e in theirs]
    for mine, other in zip(ours, theirs):  # numbers to rel 1e-6, the rest (splitter name, settings) exactly
        # a first leg that ended at its max_steps also wrote the end-of-run paired change on its last line
        assert other.keys() <= mine.keys() and all("change" in key for key in mine.keys() - other.keys()), mine["step"]
        for key, value in other.items():
            expected = pytest.approx(value, rel=1e-6, abs=1e-12) if isinstance(value, float) else value
            assert mine[key] == expected, (mine["step"], key)
    weights_a = load_file(Path(straight) / "final" / "model.safetensors")
    weights_b = load_file(Path(resumed) / "final" / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        torch.testing.assert_close(weights_b[name], weights_a[name], rtol=1e-6, atol=1e-7, msg=name)


def data_args(data_files) -> tuple[str, str]:
    """--train_file and --validation_file flags for the data_files fixture."""
    train, validation = data_files
    return f"--train_file={train}", f"--validation_file={validation}"


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    """A 1+1-layer T5 (d_model 32) with the ByT5 byte tokenizer, saved like a hub checkpoint."""
    import torch
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    directory = tmp_path_factory.mktemp("tiny_t5")
    tokenizer = ByT5Tokenizer()
    config = T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
                      decoder_start_token_id=0, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, dropout_rate=0.0)
    assert len(tokenizer) <= config.vocab_size
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_bart_dir(tmp_path_factory, grpo) -> Path:
    """The demo's BART (grpo.build_demo_model: its token ids and architecture), shrunk to 1+1 layers of d_model 32
    without dropout, with the script's word-level tokenizer trained offline on the synthetic corpus."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    directory = tmp_path_factory.mktemp("tiny_bart")
    rows = grpo.make_synthetic_corpus(200, seed=0)
    texts = [r["article"] for r in rows] + [r["highlights"] for r in rows]
    tokenizer = grpo.build_word_tokenizer(texts, str(directory), "bart")
    grpo.build_demo_model(str(directory), tokenizer, seed=0)
    config = BartConfig.from_pretrained(directory)
    # only the sizes change (smaller: faster tests; no dropout: SFT steps compare exactly across runs), and the
    # embeddings are tied, as in the hub's BARTs (untied_bart_dir keeps the demo's untied ones)
    config.update(dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, dropout=0.0,
                       tie_word_embeddings=True))
    torch.manual_seed(0)
    BartForConditionalGeneration(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def untied_bart_dir(tiny_bart_dir, tmp_path_factory) -> Path:
    """tiny_bart_dir with the demo's untied embeddings: encoder, decoder and LM head each their own, and BART's
    `shared` embedding read by none of them."""
    import shutil

    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    directory = tmp_path_factory.mktemp("untied_bart")
    shutil.copytree(tiny_bart_dir, directory, dirs_exist_ok=True)
    config = BartConfig.from_pretrained(directory)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    BartForConditionalGeneration(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def data_files(tmp_path_factory, grpo) -> tuple[Path, Path]:
    """train.jsonl (40 rows) and validation.jsonl (8 rows) of synthetic articles; returns their paths."""
    directory = tmp_path_factory.mktemp("data")
    train, validation = grpo.write_demo_splits(str(directory), num_train=40, num_eval=8, seed=0)
    return Path(train), Path(validation)


POSITIONS = 64  # the positions of the short BART below


@pytest.fixture(scope="session")
def short_bart_dir(tmp_path_factory, grpo) -> Path:
    """The demo's tiny BART (word tokenizer), shrunk, with only 64 positions in encoder and decoder."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    directory = tmp_path_factory.mktemp("short_bart")
    rows = grpo.make_synthetic_corpus(200, seed=0)
    tokenizer = grpo.build_word_tokenizer([r["article"] for r in rows] + [r["highlights"] for r in rows],
                                          str(directory), "bart")
    grpo.build_demo_model(str(directory), tokenizer, seed=0)
    config = BartConfig.from_pretrained(directory)
    config.update(dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, dropout=0.0,
                       max_position_embeddings=POSITIONS, tie_word_embeddings=True))
    torch.manual_seed(0)
    BartForConditionalGeneration(config).save_pretrained(directory)
    return directory


# The small flags of a tiny run: 2 articles x 4 samples per step, 8 new tokens.
TINY = ("--batch_size=2", "--group_size=4", "--micro_batch_size=8", "--max_new_tokens=8", "--max_source_length=64",
        "--eval_samples=4", "--device=cpu")

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft (LoRA)")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def one_error(result, exit_code: int) -> str:
    """The single error line of a run that must stop with exit_code and no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and result.returncode == exit_code, f"exit {result.returncode}\n{result.stderr}"
    return errors[0]


def good_rows(data_files, count: int) -> list[dict]:
    """The first `count` rows of the data_files fixture's train.jsonl."""
    return read_jsonl(data_files[0])[:count]


def build_in_process(grpo, model_dir, data_files, **overrides):
    """What train() builds (grpo.build_run), in this process: config, device, policy, tokenizer, the reference model,
    optimizer, scheduler, and the first step's batch."""
    import tempfile

    import torch

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


def tiny_policy_and_batch(grpo, model_dir, data_files, max_new_tokens: int):
    """(config, policy in eval mode, tokenizer, a batch of 2 articles) for in-process rollouts, G = 4."""
    import torch

    rows = good_rows(data_files, 2)
    batch = {"article": [r["article"] for r in rows], "highlights": [r["highlights"] for r in rows]}
    config = grpo.Config(model_name=str(model_dir), group_size=4, batch_size=2, max_new_tokens=max_new_tokens,
                         max_source_length=64, device="cpu")
    policy, tokenizer = grpo.load_policy_and_tokenizer(config, torch.device("cpu"))
    return config, policy.eval(), tokenizer, batch


# Tiny random models built in memory (no tokenizer) for the sampler's tests: token ids are drawn directly.
def tiny_bart(pad_token_id=1, eos_token_id=2, forced_bos=None, vocab_size=40, seed=0, init_std=0.5):
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(vocab_size=vocab_size, d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=64, pad_token_id=pad_token_id, bos_token_id=0,
                        eos_token_id=eos_token_id, decoder_start_token_id=eos_token_id, dropout=0.0, init_std=init_std)
    torch.manual_seed(seed)
    model = BartForConditionalGeneration(config).eval()
    model.generation_config.forced_bos_token_id = forced_bos
    model.generation_config.forced_eos_token_id = None
    return model


def tiny_t5(vocab_size=40, seed=0, initializer_factor=8.0):
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0,
                      initializer_factor=initializer_factor)
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config).eval()


def articles(vocab_size=40, batch=3, length=9, seed=1):
    """(input_ids, attention_mask) of `batch` random articles; article 1 ends in 3 padding tokens."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if batch > 1:
        attention_mask[1, length - 3:] = 0  # one padded article
        input_ids[1, length - 3:] = 1
    return input_ids, attention_mask
