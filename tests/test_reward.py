"""The reward: compute_rewards as the one place to plug in a reward (and its contract), the zero-std group count,
the ROUGE reward against rouge_score itself, sentence splitting without punkt, the punkt_tab fetch, a silent
import, non-Latin text under --rouge_tokenizer=unicode, and the warning when rewards stay equal for several steps."""

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rouge_score import rouge_scorer

import grpo_encoder_decoder_summarization as grpo
from conftest import (HANG_TIMEOUT, ROOT, TINY, build_in_process, check_ok, data_args, main_in_process,
                      read_jsonl, run_script)

KEYS = grpo.ROUGE_KEYS
SCORER = rouge_scorer.RougeScorer(list(KEYS), use_stemmer=True)
# A small vocabulary so that words repeat a lot (many LCS ties); stems collide (run/runs/running).
WORDS = ("the cat cats dog dogs run runs running ran a an on in mat sat sits quickly quick "
         "Bellmoor Council 12 3.5 votes vote voted").split()
PUNCT = ("", "", "", "", ",", ".", "!", "?", ";", " -", "'s", "...")


def reference_scores(prediction: str, reference: str) -> dict[str, float]:
    """rouge_score's F1s, with sentences split by the script's splitter and joined by newlines (for ROUGE-Lsum)."""
    scores = SCORER.score(target="\n".join(grpo.split_sentences(reference)),
                          prediction="\n".join(grpo.split_sentences(prediction)))
    return {key: scores[key].fmeasure for key in KEYS}


def assert_matches_rouge_score(predictions: list[str], references: list[str]) -> None:
    ours = grpo.rouge_f1(predictions, references)
    for i, (prediction, reference) in enumerate(zip(predictions, references)):
        theirs = reference_scores(prediction, reference)
        for key in KEYS:
            assert abs(ours[key][i] - theirs[key]) <= 1e-9, (key, prediction, reference, ours[key][i], theirs[key])


def word_soup(rng: random.Random, max_words: int = 30) -> str:
    words = []
    for _ in range(rng.randint(0, max_words)):
        word = rng.choice(WORDS)
        words.append(word.capitalize() if rng.random() < 0.15 else word)
        words[-1] += rng.choice(PUNCT)
        if rng.random() < 0.05:
            words[-1] += "\n"
    return " ".join(words)


@pytest.fixture(autouse=True)
def fresh_punkt_cache():
    grpo.have_punkt.cache_clear()
    yield
    grpo.have_punkt.cache_clear()


# --------------------------------------------------------------------------------------------------
# rouge_f1 against rouge_score
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(8))
def test_rouge_f1_matches_rouge_score_on_word_soup(seed):
    rng = random.Random(seed)
    predictions = [word_soup(rng) for _ in range(25)]
    references = [word_soup(rng) for _ in range(25)]
    assert_matches_rouge_score(predictions, references)


def test_rouge_f1_matches_rouge_score_with_long_repetitive_texts():
    """Longer texts (past 64 tokens, so the LCS bitmasks are multi-word integers) from 4 words only."""
    rng = random.Random(123)
    vocabulary = ["run", "runs", "the", "cat."]
    make = lambda: " ".join(rng.choice(vocabulary) for _ in range(rng.randint(60, 150)))
    assert_matches_rouge_score([make() for _ in range(6)], [make() for _ in range(6)])


def test_rouge_f1_matches_rouge_score_on_punctuation_numbers_and_capitals():
    predictions = [
        "The U.S. economy grew 3.5% in Q2, officials said on Monday!",
        "Shares of ACME Corp. rose 12 percent; the CEO (John Smith) was \"delighted\".",
        "It's 9:30 a.m. -- and the 2024/25 season starts now?! Yes.",
        "Café owners in Zürich said naïve tourists paid €5.",
        "RUNNING runners ran; Running RUNS run.",
    ]
    references = [
        "US economy grows 3.5 percent in second quarter. Officials say growth was strong.",
        "ACME shares up 12%. CEO John Smith delighted.",
        "The 2024-25 season starts at 9.30am. Fans are ready!",
        "Tourists in Zurich pay 5 euros for coffee.",
        "Runners are running. The runner runs!",
    ]
    assert_matches_rouge_score(predictions, references)


@pytest.mark.parametrize("prediction, reference", [
    ("", ""),
    ("", "The cat sat."),
    ("The cat sat.", ""),
    ("...!?", "The cat sat."),
    ("The cat sat.", "-- ... !!"),
    ("...", "?!"),
    ("   \n  ", "The cat sat."),
])
def test_rouge_f1_empty_and_punctuation_only_texts(prediction, reference):
    assert_matches_rouge_score([prediction], [reference])
    scores = grpo.rouge_f1([prediction], [reference])
    assert all(scores[key] == [0.0] for key in KEYS)


@pytest.mark.parametrize("text", [
    "The cat sat on the mat.",
    "Council votes for new bridge. Building starts in 2026, the mayor says!\nA second line here?",
    "a a a a b b a b a",
])
def test_rouge_f1_identical_texts_score_one(text):
    assert_matches_rouge_score([text], [text])
    scores = grpo.rouge_f1([text], [text])
    assert all(scores[key] == [1.0] for key in KEYS)


def test_rouge_f1_matches_rouge_score_on_multi_sentence_texts():
    predictions = [
        "The council voted on Monday. It will build a bridge! Work starts in 2026.",
        "Work starts in 2026. The council voted.\nThe bridge costs 12 million.",
        "Bridge. Council. Vote. Bridge. Council. Vote.",
        "The dog ran. The dog ran. The dog ran.",
    ]
    references = [
        "Council approves new bridge. Work to start in 2026, mayor says.",
        "Council approves new bridge.\nWork to start in 2026.",
        "The council voted for the bridge. The vote was close.",
        "The dog ran away. A dog ran home? The cat ran.",
    ]
    assert_matches_rouge_score(predictions, references)


def test_rouge_f1_matches_rouge_score_in_the_bxg_layout():
    """B = 4 references, each repeated G = 5 times contiguously, as rollout_step lays them out."""
    rng = random.Random(7)
    articles, group_size = [word_soup(rng, 25) for _ in range(4)], 5
    references = [reference for reference in articles for _ in range(group_size)]
    predictions = [word_soup(rng, 25) for _ in references]
    predictions[3] = predictions[2]  # a duplicate sample within a group
    predictions[6] = references[6]  # a perfect sample
    assert_matches_rouge_score(predictions, references)
    assert grpo.rouge_f1(predictions, references)["rouge1"][6] == (1.0 if grpo.rouge_tokens(references[6]) else 0.0)


@pytest.mark.parametrize("seed", range(5))
def test_lcs_reference_positions_match_rouge_score_lcs_ind(seed):
    rng = random.Random(seed)
    for _ in range(200):
        reference = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        candidate = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        ours = grpo.lcs_reference_positions(reference, grpo.position_masks(reference), candidate)
        assert sorted(ours) == sorted(rouge_scorer.lcs_ind(reference, candidate)), (reference, candidate)


# --------------------------------------------------------------------------------------------------
# rouge_rewards
# --------------------------------------------------------------------------------------------------
PREDICTIONS = ["The council voted for a bridge.", "Cats sat on mats. Dogs ran.", "", "bridge bridge bridge",
               "Council approves new bridge. Work starts in 2026."]
REFERENCES = ["Council approves new bridge. Work starts in 2026."] * 3 + ["The cat sat on the mat."] * 2


def test_rouge_rewards_default_weights_are_configs():
    """Without weights, rouge_rewards uses Config()'s rouge*_weight flags (read here, not restated)."""
    default = grpo.rouge_rewards(PREDICTIONS, REFERENCES)
    assert default == grpo.rouge_rewards(PREDICTIONS, REFERENCES, grpo.reward_weights(grpo.Config()))


def test_rouge_rewards_mean_of_rouge1_rouge2_rougelsum():
    rewards = grpo.rouge_rewards(PREDICTIONS, REFERENCES, {"rouge1": 1 / 3, "rouge2": 1 / 3, "rougeLsum": 1 / 3})
    scores = grpo.rouge_f1(PREDICTIONS, REFERENCES)
    assert len(rewards) == len(PREDICTIONS)
    for i, reward in enumerate(rewards):
        assert 0.0 <= reward <= 1.0
        expected = (scores["rouge1"][i] + scores["rouge2"][i] + scores["rougeLsum"][i]) / 3
        assert reward == pytest.approx(expected, abs=1e-12)
    assert rewards[2] == 0.0
    assert rewards[4] == pytest.approx(0.0, abs=0)  # no shared token with "The cat sat on the mat."


def test_rouge_rewards_identical_text_gets_one():
    assert grpo.rouge_rewards(["Council approves new bridge."], ["Council approves new bridge."]) == [1.0]


def test_rouge_rewards_respects_weights():
    scores = grpo.rouge_f1(PREDICTIONS, REFERENCES)
    assert grpo.rouge_rewards(PREDICTIONS, REFERENCES, {"rougeL": 1.0}) == scores["rougeL"]
    mixed = grpo.rouge_rewards(PREDICTIONS, REFERENCES, {"rouge1": 0.25, "rouge2": 0.75})
    for i, reward in enumerate(mixed):
        assert reward == pytest.approx(0.25 * scores["rouge1"][i] + 0.75 * scores["rouge2"][i], abs=1e-12)


def test_reward_weights_from_config_are_normalized():
    config = grpo.Config(rouge1_weight=2.0, rouge2_weight=0.0, rougeL_weight=1.0, rougeLsum_weight=1.0)
    assert grpo.reward_weights(config) == {"rouge1": 0.5, "rouge2": 0.0, "rougeL": 0.25, "rougeLsum": 0.25}
    # whatever the defaults are: they sum to 1, and scaling every weight changes nothing
    defaults = grpo.Config()
    assert sum(grpo.reward_weights(defaults).values()) == pytest.approx(1.0)
    doubled = grpo.Config(**{f"{key}_weight": 2 * getattr(defaults, f"{key}_weight") for key in KEYS})
    assert grpo.reward_weights(doubled) == pytest.approx(grpo.reward_weights(defaults))


def test_rouge_rewards_and_f1_reject_mismatched_lengths():
    with pytest.raises(ValueError):
        grpo.rouge_rewards(["a b", "c"], ["a b"])
    with pytest.raises(ValueError):
        grpo.rouge_f1(["a b"], [])


# --------------------------------------------------------------------------------------------------
# sentence splitting without punkt, and the one-time notice
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def no_punkt(monkeypatch):
    """Make nltk behave as if punkt_tab were not installed (it may not be installed here either); yields nltk."""
    import nltk

    def missing(resource, *args, **kwargs):
        raise LookupError(f"Resource {resource} not found.")

    monkeypatch.setattr(nltk.data, "find", missing)
    grpo.have_punkt.cache_clear()  # fresh_punkt_cache clears it again afterwards
    yield nltk


def test_split_sentences_without_punkt(no_punkt):
    text = "  The council voted. Work starts in 2026!  Is it late?\nA new line\n\nand the end  "
    assert grpo.split_sentences(text) == ["The council voted.", "Work starts in 2026!", "Is it late?",
                                          "A new line", "and the end"]
    assert grpo.split_sentences("") == []
    assert grpo.split_sentences("No final stop") == ["No final stop"]
    assert grpo.have_punkt() is False


def test_have_punkt_notice_printed_at_most_once(no_punkt, capsys):
    for _ in range(3):
        grpo.have_punkt()
        grpo.split_sentences("One. Two.")
    grpo.rouge_f1(["One. Two."], ["Two. One."])
    captured = capsys.readouterr()
    assert captured.out == ""
    notes = [line for line in captured.err.splitlines() if line.strip()]
    assert len(notes) == 1 and notes[0].startswith("note:") and "punkt" in notes[0]


def test_rouge_f1_without_punkt_matches_rouge_score(no_punkt):
    assert_matches_rouge_score(["The cat sat. The dog ran! Cats run?"], ["A dog ran. The cat sat on the mat."])


def test_importing_the_module_prints_nothing():
    result = subprocess.run([sys.executable, "-c", "import grpo_encoder_decoder_summarization"],
                            cwd=ROOT, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr == ""


# --------------------------------------------------------------------------------------------------
# ensure_punkt: fetched once when missing and allowed, never when offline, never waited for long
# --------------------------------------------------------------------------------------------------
def allow_network(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


def test_ensure_punkt_offline_does_not_download(no_punkt, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(no_punkt, "download", lambda *a, **k: calls.append(a))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert grpo.ensure_punkt() == "regex"
    assert calls == []
    assert "note:" in capsys.readouterr().err  # the fallback is announced (once, by have_punkt)


def test_ensure_punkt_online_downloads_once_and_uses_it(no_punkt, monkeypatch):
    calls = []
    installed = []

    def download(name, **kwargs):
        calls.append(name)
        installed.append(True)
        return True

    def find(resource, *args, **kwargs):
        if not installed:
            raise LookupError(resource)

    allow_network(monkeypatch)
    monkeypatch.setattr(no_punkt, "download", download)
    monkeypatch.setattr(no_punkt.data, "find", find)
    assert grpo.ensure_punkt() == "punkt_tab"
    assert grpo.ensure_punkt() == "punkt_tab"
    assert calls == ["punkt_tab"]


def test_ensure_punkt_returns_while_a_hanging_download_is_still_running(no_punkt, monkeypatch):
    """A download that does not finish (an unreachable network) is not waited for past the timeout: ensure_punkt
    returns the regex splitter while the download thread is still running (blocked on an event only this test
    sets). Were ensure_punkt to wait for the download, it would return only after the download gave up, and the
    thread would no longer be alive."""
    import threading

    allow_network(monkeypatch)
    started, release, downloads = threading.Event(), threading.Event(), []

    def hanging_download(*args, **kwargs):
        downloads.append(threading.current_thread())
        started.set()
        release.wait(120)  # gives up only if the test never sets it
        return False

    monkeypatch.setattr(no_punkt, "download", hanging_download)
    try:
        assert grpo.ensure_punkt(timeout=0.2) == "regex"
        assert not release.is_set()
        assert started.wait(120), "ensure_punkt never started the download"
        (thread,) = downloads
        assert thread is not threading.current_thread()  # in a background thread,
        assert thread.is_alive() and thread.daemon  # still running when ensure_punkt returned, and never blocks exit
    finally:
        release.set()
        for thread in downloads:
            thread.join(120)
    assert not thread.is_alive()


# --------------------------------------------------------------------------------------------------
# compute_rewards: the one place to plug in a reward; its contract; groups whose rewards are all equal
# --------------------------------------------------------------------------------------------------
def test_a_custom_reward_is_used(grpo, tiny_bart_dir, data_files, monkeypatch):
    """compute_rewards is the one place to plug in a reward: the rollout's rewards and advantages come from it."""
    config, device, policy, tokenizer, reference, optimizer, scheduler, rows = build_in_process(
        grpo, tiny_bart_dir, data_files, num_iterations=1)
    seen = {}

    def brevity_bonus(predictions, references, articles, config, names):  # shorter is better: -(number of words)
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


def test_a_reward_that_breaks_the_contract_stops_the_run_at_the_start(tiny_bart_dir, data_files, tmp_path, monkeypatch):
    """Checked on two training articles once data and model load: the error comes before SFT, not after it."""
    monkeypatch.setattr(grpo, "compute_rewards", lambda predictions, *rest: [0.5] * (len(predictions) - 1))
    monkeypatch.setattr(grpo, "sft_warmup", lambda *args: pytest.fail("SFT ran before the reward was checked"))
    out = tmp_path / "run"
    result = main_in_process(grpo, f"--model_name={tiny_bart_dir}", *data_args(data_files), *TINY, "--sft_steps=5",
                             f"--output_dir={out}")
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
        "error: compute_rewards returned 7 rewards for 8 summaries; it must return one finite float per summary")
    assert not (out / "reference").exists() and not (out / "run_config.json").exists()
    monkeypatch.setattr(grpo, "compute_rewards", lambda predictions, references, articles, config: [0.5] * 4)
    result = main_in_process(grpo, f"--model_name={tiny_bart_dir}", *data_args(data_files), *TINY, "--sft_steps=5",
                             f"--output_dir={out}")  # a reward written before `names` was added
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: compute_rewards must take (predictions, references, articles, config, names): too many")


def test_the_start_check_of_the_reward_is_rollout_shaped_and_keeps_the_random_state(data_files, monkeypatch):
    import datasets
    import numpy as np

    seen = []

    def random_reward(predictions, references, articles, config, names):  # groups of G, as in a rollout
        seen.append((predictions, references, articles, names))
        return list(np.reshape([random.random() + np.random.rand() + torch.rand(()).item()
                                for _ in predictions], (-1, config.group_size)).ravel())

    monkeypatch.setattr(grpo, "compute_rewards", random_reward)
    rows = datasets.Dataset.from_list(read_jsonl(data_files[0]))
    config = grpo.Config(group_size=3)

    def seeded_draws(check: bool) -> tuple:
        random.seed(7), np.random.seed(7), torch.manual_seed(7)
        if check:
            grpo.check_reward(config, rows, frozenset({"carrow"}))
        return random.random(), np.random.rand(), torch.rand(()).item()

    assert seeded_draws(check=True) == seeded_draws(check=False)
    (predictions, references, articles, names), = seen
    assert references == [rows[0]["highlights"]] * 3 + [rows[1]["highlights"]] * 3
    assert articles == [rows[0]["article"]] * 3 + [rows[1]["article"]] * 3
    assert predictions == [rows[0]["highlights"], "", "", rows[1]["highlights"], "", ""] and names == {"carrow"}


# --------------------------------------------------------------------------------------------------
# --invented_fact_penalty: reward minus lambda per invented name or number (invented_facts), hand-computed
# --------------------------------------------------------------------------------------------------
ARTICLE = "Mayor Dax Dale of Carrow won 1200 votes and 3.5 percent more on Monday."
REFERENCE = "Mayor Dax Dale wins in Carrow."
NAMES = frozenset({"dax", "dale", "cora", "hale", "carrow"})


@pytest.mark.parametrize("summary, invented", [
    ("Mayor Dax Dale won 1200 votes in Carrow.", set()),  # every name and number is in the article
    ("Mayor Cora Dale won 1200 votes.", {"cora"}),  # an invented name (capitalised inside the sentence)
    ("Mayor Dax Dale won 1300 votes.", {"1300"}),  # an invented number
    ("The mayor won many votes.", set()),  # no facts at all: nothing invented
    ("mayor cora hale won in carrow.", {"cora", "hale"}),  # lowercased: names by the names list; carrow is in
    ("Mayor Dax Dale won 1,200 votes.", {"1", "200"}),  # "1,200" is the facts 1 and 200, the article writes 1200:
    # both count as invented (a number written otherwise: what the measure misses, in the reward's docstring)
    ("Dale won 3.5 percent more.", set()),  # 3.5 is the facts 3 and 5, both words of the article
    ("Dale won 3.6 percent more.", {"6"}),
])
def test_invented_facts_hand_computed(grpo, summary, invented):
    assert grpo.invented_facts(summary, ARTICLE, NAMES) == invented


def test_name_lexicon_learns_names_from_casing(grpo):
    # capitalised inside a sentence and never lowercase ("Mayor" starts its sentence; "Monday" is a name too)
    assert grpo.name_lexicon([ARTICLE, REFERENCE]) == {"dax", "dale", "carrow", "monday"}
    assert grpo.name_lexicon(["He saw The Mill.", "the mill"]) == frozenset()  # also written lowercase: no name


def test_the_penalty_is_lambda_per_invented_fact(grpo):
    config = grpo.Config(invented_fact_penalty=0.25)
    predictions = ["Mayor Dax Dale won 1200 votes in Carrow.", "Mayor Cora Hale won 1300 votes.",
                   "mayor cora hale won 1300 votes.", "the mayor won.", "Mayor Dax Dale won 1,200 votes."]
    rouge = grpo.rouge_rewards(predictions, [REFERENCE] * 5, grpo.reward_weights(config))
    rewards = grpo.compute_rewards(predictions, [REFERENCE] * 5, [ARTICLE] * 5, config, NAMES)
    # invented: none; cora, hale, 1300 (cased); cora, hale, 1300 (lowercased, by the names); none; 1 and 200
    assert rewards == pytest.approx([rouge[0], rouge[1] - 0.75, rouge[2] - 0.75, rouge[3], rouge[4] - 0.5])
    # without the run's names a lowercased name is not recognised; a cased one and numbers still are
    alone = grpo.compute_rewards(predictions, [REFERENCE] * 5, [ARTICLE] * 5, config)
    assert alone[1:3] == pytest.approx([rouge[1] - 0.75, rouge[2] - 0.25])
    # a summary's penalty depends on it, its article and the names, not on the other articles of the batch
    batch = grpo.compute_rewards(["Cora Hale said.", predictions[2]], ["Cora Hale said.", REFERENCE],
                                 ["Cora Hale said.", ARTICLE], config, NAMES)
    assert batch[1] == rewards[2]


def test_the_evaluation_counts_the_same_invented_facts(grpo):
    predictions = ["mayor cora hale won 1300 votes.", "Mayor Dax Dale won."]
    articles, references = [ARTICLE, "Mayor Cora Hale lost."], [REFERENCE, "Mayor Cora Hale lost."]
    names = grpo.name_lexicon((*articles, *references))
    quality = grpo.summary_quality(predictions, references, articles)
    assert [grpo.invented_facts(p, a, names) for p, a in zip(predictions, articles)] == [{"cora", "hale", "1300"},
                                                                                        {"dax", "dale"}]
    assert quality["invented_summaries"] == 1.0
    assert quality["invented_entities"] == pytest.approx((3 / 3 + 2 / 2) / 2)


def test_lambda_zero_is_exactly_the_rouge_reward(grpo):
    config = grpo.Config()
    assert config.invented_fact_penalty == 0.0  # off by default
    predictions = ["mayor cora hale won 1300 votes.", "Mayor Dax Dale won 1200 votes in Carrow.", ""]
    expected = grpo.rouge_rewards(predictions, [REFERENCE] * 3, grpo.reward_weights(config))
    assert grpo.compute_rewards(predictions, [REFERENCE] * 3, [ARTICLE] * 3, config, NAMES) == expected  # bit-equal


def test_the_penalized_reward_passes_the_contract_check_and_a_bad_one_still_fails(grpo):
    config = grpo.Config(invented_fact_penalty=0.5)
    predictions = ["mayor cora won 7.", "x"]
    rewards = grpo.compute_rewards(predictions, ["a", "b"], ["c", "d"], config, NAMES)
    assert grpo.checked_rewards(rewards, predictions) == rewards
    with pytest.raises(grpo.UserError, match="one finite float per summary"):
        grpo.checked_rewards(rewards[:1], predictions)


def test_a_run_with_the_penalty_learns_the_names_of_its_training_texts(grpo, tiny_bart_dir, data_files, monkeypatch):
    config, device, policy, tokenizer, *_ = build_in_process(grpo, tiny_bart_dir, data_files, num_iterations=1)
    logged = []
    run = grpo.build_run(dataclasses.replace(config, invented_fact_penalty=0.5), grpo.Distributed(device=device),
                         logged.append)
    rows = run.train_rows
    assert run.fact_names == grpo.name_lexicon((*rows[config.text_column], *rows[config.summary_column]))
    text = " ".join(rows[config.text_column])
    towns_and_firms = {name.lower() for name in (*grpo.TOWNS, *grpo.COMPANIES) if name in text}
    assert towns_and_firms and towns_and_firms <= run.fact_names
    assert f"{len(run.fact_names)} names learned from 40 training rows" in "\n".join(logged)
    assert grpo.build_run(config, grpo.Distributed(device=device), lambda message: None).fact_names == frozenset()
    monkeypatch.setattr(grpo, "NAME_ROWS", 3)  # a large training set: its first rows only
    assert grpo.training_names(rows, config, print) == grpo.name_lexicon(
        (*rows[config.text_column][:3], *rows[config.summary_column][:3]))


def test_a_training_run_rewards_with_its_names(grpo, tiny_bart_dir, data_files, tmp_path, monkeypatch):
    """The names build_run learns reach compute_rewards at the start's check and in every GRPO step of a run."""
    seen, real = [], grpo.compute_rewards

    def recording(predictions, references, articles, config, names):
        seen.append((config.invented_fact_penalty, names))
        return real(predictions, references, articles, config, names)

    monkeypatch.setattr(grpo, "compute_rewards", recording)
    args = [f"--model_name={tiny_bart_dir}", *data_args(data_files), *TINY, "--max_steps=2", "--eval_samples=0",
            "--invented_fact_penalty=0.5", f"--output_dir={tmp_path / 'run'}"]
    assert grpo.main(args) == 0
    rows = [json.loads(line) for line in data_files[0].read_text().splitlines()]
    expected = grpo.name_lexicon([r["article"] for r in rows] + [r["highlights"] for r in rows])
    assert seen == [(0.5, expected)] * 3 and expected  # the start's reward check, then the 2 steps


def test_zero_std_groups_counts_groups_whose_rewards_are_all_equal(grpo, tiny_bart_dir, data_files, monkeypatch):
    config, device, policy, tokenizer, reference, optimizer, scheduler, rows = build_in_process(
        grpo, tiny_bart_dir, data_files, num_iterations=1)
    for rewards, expected in (([0.3] * 4, 1.0), ([0.1, 0.2, 0.3, 0.4], 0.0)):
        monkeypatch.setattr(grpo, "rouge_rewards",
                            lambda p, r, w=None, t="default", values=rewards: values * config.batch_size)
        rollout, stats = grpo.rollout_step(policy, tokenizer, rows, config, device, grpo.PhaseTimer(device))
        assert stats["zero_std_groups"] == expected
        assert bool((rollout.advantages == 0).all()) == (expected == 1.0)


# --------------------------------------------------------------------------------------------------
# non-Latin text: refused at the start under rouge_score's tokenizer, scored with --rouge_tokenizer=unicode
# --------------------------------------------------------------------------------------------------
CYRILLIC = ["Привет мир как дела", "Совет города одобрил новый мост через реку", "Команда выиграла матч в субботу"]


@pytest.fixture(scope="module")
def cyrillic_files(tmp_path_factory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("cyrillic")
    paths = []
    for name, count in (("train.jsonl", 12), ("validation.jsonl", 4)):
        rows = [{"article": f"{CYRILLIC[i % 3]}. {CYRILLIC[(i + 1) % 3]}. Номер {i}.", "highlights": CYRILLIC[i % 3]}
                for i in range(count)]
        (directory / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        paths.append(directory / name)
    return paths[0], paths[1]


def test_unicode_rouge_scores_cyrillic_and_leaves_english_unchanged(grpo):
    assert grpo.rouge_f1(["Привет мир как дела"], ["Привет мир"])["rouge1"] == [0.0]  # rouge_score keeps [a-z0-9]
    scores = grpo.rouge_f1(["Привет мир как дела"], ["Привет мир"], "unicode")
    assert scores["rouge1"] == [pytest.approx(2 / 3)] and scores["rouge2"] == [pytest.approx(1 / 2)]  # P 1/2, R 1; 1/3, 1
    assert grpo.rouge_tokens("Ça coûte 3,5 € — naïve_test", "unicode") == ["ça", "coûte", "3", "5", "naïve", "test"]
    rows = grpo.make_synthetic_corpus(6, seed=1)
    predictions, references = [r["article"] for r in rows], [r["highlights"] for r in rows]
    assert grpo.rouge_f1(predictions, references, "unicode") == grpo.rouge_f1(predictions, references)
    config = grpo.Config(rouge_tokenizer="unicode", rouge2_weight=0.0, rougeLsum_weight=0.0)
    assert grpo.compute_rewards(["Привет мир"], ["Привет мир"], ["a"], config) == [1.0]  # the reward uses it too
    assert grpo.score_summaries(["Привет мир"], ["Привет мир"], 0, "unicode")[0]["rougeL"] == 1.0


def test_cyrillic_corpus_is_refused_at_start_then_trains_with_unicode_rouge(grpo, tiny_t5_dir, cyrillic_files,
                                                                           tmp_path, capsys):
    train, validation = cyrillic_files
    out = tmp_path / "run"
    args = [f"--model_name={tiny_t5_dir}", f"--train_file={train}", f"--validation_file={validation}",
            f"--output_dir={out}", "--device=cpu", "--max_source_length=64", "--max_new_tokens=8", "--max_steps=1",
            "--batch_size=2", "--group_size=2", "--micro_batch_size=4", "--eval_samples=2", "--eval_batch_size=2"]
    assert grpo.main(args) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and "--rouge_tokenizer=unicode" in error and "14 of 14" in error, error
    assert not (out / "run_config.json").exists()
    result = run_script(*args, "--rouge_tokenizer=unicode", timeout=300)
    check_ok(result)
    assert {e["rouge_tokenizer"] for e in read_jsonl(out / "eval.jsonl")} == {"unicode"}


# --------------------------------------------------------------------------------------------------
# rewards equal in every group for several steps: warned once
# --------------------------------------------------------------------------------------------------
def test_equal_rewards_for_several_steps_are_warned_once(grpo, tmp_path):
    import types

    messages = []
    run = types.SimpleNamespace(config=grpo.Config(output_dir=str(tmp_path), group_size=4), dist=grpo.Distributed(),
                                state=grpo.TrainerState(), log=messages.append,
                                scheduler=types.SimpleNamespace(get_last_lr=lambda: [0.1]),
                                trackers=types.SimpleNamespace(log=lambda *args: None))

    def step(number, zero_std_groups):
        numbers = dict(samples=[], nonfinite_updates=0, articles_truncated=0.0, reward_mean=0.0,
                       zero_std_groups=zero_std_groups)
        grpo.log_step(run, number, [0], {"article": ["a"]}, numbers)

    for number in range(1, grpo.EQUAL_REWARD_STEPS):
        step(number, 1.0)
    step(grpo.EQUAL_REWARD_STEPS, 0.5)  # one group with a signal ends the stretch
    assert not messages
    for number in range(grpo.EQUAL_REWARD_STEPS + 1, 3 * grpo.EQUAL_REWARD_STEPS + 1):
        step(number, 1.0)
    assert len(messages) == 1 and "no learning signal" in messages[0], messages
