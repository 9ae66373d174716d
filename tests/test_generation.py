"""The shared sampler: EOS and stop-string truncation, padding, determinism."""

from __future__ import annotations

from alignlab.generation import SamplingConfig, cut_response, generate
from alignlab.models import load_model


def test_cut_response_keeps_first_eos_and_drops_the_rest(tiny_tokenizer):
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    ids, finished = cut_response([5, 6, eos, 7, pad], eos, pad, tiny_tokenizer)
    assert ids == [5, 6, eos] and finished
    ids, finished = cut_response([5, 6, pad, pad], eos, pad, tiny_tokenizer)
    assert ids == [5, 6] and not finished


def test_cut_response_at_stop_string(tiny_tokenizer):
    ids = tiny_tokenizer("The movie was great. The end", add_special_tokens=False).input_ids
    cut, finished = cut_response(ids, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id, tiny_tokenizer,
                                 stop_strings=["great."])
    assert finished
    assert tiny_tokenizer.decode(cut).endswith("great.")
    assert "end" not in tiny_tokenizer.decode(cut)


def test_generation_is_seeded_and_batch_independent(tiny_tokenizer):
    model = load_model("tiny-random")
    prompts = ["Hello", "The movie was wonderful and the acting", "Why"]
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0, batch_size=3)
    together = generate(model, tiny_tokenizer, prompts, greedy, template="none")
    alone = [generate(model, tiny_tokenizer, [p], greedy, template="none")[0] for p in prompts]
    assert [s.response_ids for s in together] == [s.response_ids for s in alone]
    sampled = SamplingConfig(max_new_tokens=8, temperature=1.0, seed=3)
    a = generate(model, tiny_tokenizer, prompts, sampled, template="none")
    b = generate(model, tiny_tokenizer, prompts, sampled, template="none")
    assert [s.response_ids for s in a] == [s.response_ids for s in b]
    assert all(len(s.response_ids) <= 8 for s in a)
