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


MODELS = {  # model, eos, pad
    "t5_more_decoder_layers": lambda: (unequal_t5(), 1, 0),
    "bart_more_decoder_layers": lambda: (unequal_bart(), 2, 1),
    "bart_forced_bos": lambda: (tiny_bart(forced_bos=0), 2, 1),
    "t5": lambda: (tiny_t5(), 1, 0),
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
