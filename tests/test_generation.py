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


def test_inverse_cdf_sampling_draws_from_the_tempered_softmax():
    """Plain sampling goes through our processor: token frequencies match softmax(logits / T), and a
    token with zero probability is never drawn."""
    import torch

    from alignlab.generation import _InverseCDFSampling

    logits = torch.tensor([[2.0, 1.0, 0.0, float("-inf"), -1.0]]).repeat(20000, 1)
    torch.manual_seed(0)
    for temperature in (1.0, 0.5):
        picked = _InverseCDFSampling(temperature)(None, logits).argmax(-1)
        freq = torch.bincount(picked, minlength=5).double() / len(picked)
        expected = torch.softmax(logits[0].double() / temperature, -1)
        assert freq[3] == 0
        assert torch.allclose(freq, expected, atol=0.012), (freq, expected)


def test_plain_sampling_follows_the_model_distribution(tiny_tokenizer):
    """End to end through generate: first tokens sampled many times follow the model's next-token softmax."""
    import torch

    model = load_model("tiny-random")
    ids = tiny_tokenizer("The movie", add_special_tokens=False).input_ids
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
    top = probs.topk(3)
    samples = generate(model, tiny_tokenizer, ["The movie"] * 3000,
                       SamplingConfig(max_new_tokens=1, temperature=1.0, seed=0, batch_size=1000), template="none")
    pad = tiny_tokenizer.pad_token_id  # a drawn pad token is cut from the response
    first = torch.tensor([s.response_ids[0] if s.response_ids else pad for s in samples])
    for p, token in zip(top.values, top.indices):
        p = float(p)
        assert abs(float((first == token).double().mean()) - p) < 4 * (p * (1 - p) / 3000) ** 0.5 + 0.005


# ----------------------------------------------------------------------------------------------- backends


def test_hf_sampler_is_generate_from_ids(tiny_tokenizer):
    """The hf backend behind the sampler interface samples exactly what generate_from_ids does."""
    from alignlab.generation import HFSampler, generate_from_ids, make_sampler

    model = load_model("tiny-random")
    ids = [tiny_tokenizer("Tell me about the movie.").input_ids, tiny_tokenizer("Why").input_ids]
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, seed=11)
    sampler = make_sampler("hf", model, tiny_tokenizer)
    assert isinstance(sampler, HFSampler)
    direct = generate_from_ids(model, tiny_tokenizer, ids, sampling)
    assert sampler.generate(ids, sampling) == direct
    other = load_model("tiny-random")
    sampler.sync(other)  # sync points it at the live model
    assert sampler.model is other


def test_hf_sampler_bf16_samples_from_a_merged_bf16_copy_refreshed_at_sync(tiny_tokenizer):
    """bf16 on CPU: the sampler decodes with a bf16 copy (LoRA merged) and leaves the trained model untouched;
    after the adapter changes, ``sync`` refreshes the copy."""
    import torch

    from alignlab.generation import HFSampler, generate_from_ids
    from alignlab.models import add_lora

    lora = add_lora(load_model("tiny-random"), r=2, alpha=4)
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    ids = [tiny_tokenizer("Tell me about the movie.").input_ids, tiny_tokenizer("Why").input_ids]
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0, precision="bf16")
    sampler = HFSampler(lora, tiny_tokenizer)
    got = sampler.generate(ids, greedy)
    copy = sampler._copy
    assert copy is not None and next(copy.parameters()).dtype == torch.bfloat16
    name = "model.layers.0.self_attn.q_proj"
    layer = lora.get_base_model().get_submodule(name)
    expected = (layer.base_layer.weight + layer.get_delta_weight("default")).to(torch.bfloat16)
    assert torch.equal(copy.get_submodule(name).weight, expected)
    for key, value in lora.state_dict().items():  # the trained model's weights are not touched
        if "lora_B" not in key:
            assert torch.equal(value, before[key]), key
    assert got == generate_from_ids(copy, tiny_tokenizer, ids, SamplingConfig(max_new_tokens=6, temperature=0.0))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.fill_(-0.05)
    sampler.generate(ids, greedy)
    assert torch.equal(copy.get_submodule(name).weight, expected)  # not synced: the old weights
    sampler.sync(lora)
    sampler.generate(ids, greedy)
    assert sampler._copy is copy  # refreshed in place
    assert not torch.equal(copy.get_submodule(name).weight, expected)


def _no_vllm(monkeypatch):
    import alignlab.generation as generation

    monkeypatch.setattr(generation, "vllm_available", lambda: False)


def test_vllm_backend_without_vllm_is_a_clear_error(tiny_tokenizer, monkeypatch, tmp_path):
    """Choosing vllm where it is not installed fails before any model is loaded, naming the fix; every stage
    that generates refuses it the same way."""
    import time

    import pytest

    from alignlab.cli import main as cli_main
    from alignlab.config import BoNConfig, PPOConfig, RSConfig
    from alignlab.errors import AlignlabError
    from alignlab.generation import check_backend, make_sampler
    from alignlab.train.ppo import train_ppo
    from alignlab.train.rejection import run_bon, run_rs

    _no_vllm(monkeypatch)
    message = "backend=vllm needs the vllm package.*pip install vllm.*backend=hf"
    with pytest.raises(AlignlabError, match=message):
        make_sampler("vllm", load_model("tiny-random"), tiny_tokenizer)
    with pytest.raises(AlignlabError, match="unknown generation backend"):
        check_backend("sglang")
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello\n")
    start = time.perf_counter()
    with pytest.raises(AlignlabError, match=message):
        train_ppo(PPOConfig(prompts=str(prompts), reward="alignlab.reward_functions:sentiment", backend="vllm",
                            output_dir=str(tmp_path / "ppo")))
    with pytest.raises(AlignlabError, match=message):
        run_rs(RSConfig(prompts=str(prompts), reward="x:y", backend="vllm", output_dir=str(tmp_path / "rs")))
    with pytest.raises(AlignlabError, match=message):
        run_bon(BoNConfig(prompts=str(prompts), reward="x:y", backend="vllm", output_dir=str(tmp_path / "bon")))
    assert time.perf_counter() - start < 2.0  # refused up front, nothing loaded
    assert not (tmp_path / "ppo").exists() and not (tmp_path / "rs").exists()
    assert cli_main(["ppo", f"prompts={prompts}", "reward=alignlab.reward_functions:sentiment", "backend=vllm",
                     f"output_dir={tmp_path / 'cli'}"]) == 2


def test_vllm_sampler_glue_with_a_stand_in_engine(tiny_tokenizer, monkeypatch):
    """The vLLM backend's own code (weights handed over under plain names, LoRA merged; outputs cut like the hf
    backend's, EOS kept) against a stand-in ``vllm`` module. A real engine needs a GPU: unchecked here."""
    import importlib.machinery
    import sys
    import types

    import torch

    from alignlab.generation import VLLMSampler
    from alignlab.models import add_lora

    eos = tiny_tokenizer.eos_token_id
    hello = tiny_tokenizer("Hello there", add_special_tokens=False).input_ids
    seen: dict = {}

    class Completion:
        def __init__(self, token_ids, finish_reason, stop_reason=None):
            self.token_ids, self.finish_reason, self.stop_reason = token_ids, finish_reason, stop_reason

    class LLM:
        def __init__(self, model, **kwargs):
            seen["init"] = (model, kwargs)

        def apply_model(self, fn):
            class Engine(torch.nn.Module):
                def load_weights(self, weights):
                    seen["weights"] = dict(weights)
            return [fn(Engine())]

        def generate(self, prompts, sampling_params, use_tqdm):
            seen["params"], seen["prompts"] = sampling_params, prompts
            # EOS-finished without the EOS id; EOS-finished with it; length-limited
            return [types.SimpleNamespace(outputs=[c]) for c in
                    (Completion(hello, "stop"), Completion([*hello, eos], "stop"), Completion(hello * 3, "length"))]

    fake = types.ModuleType("vllm")
    fake.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    fake.LLM = LLM
    fake.SamplingParams = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake)

    model = load_model("tiny-random")
    sampler = VLLMSampler(model, tiny_tokenizer, checkpoint="/some/folder")
    assert seen["init"][0] == "/some/folder"
    lora = add_lora(load_model("tiny-random"), r=2, alpha=4)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)  # a non-zero adapter, so merging changes the weights
    sampler.sync(lora)
    weights = seen["weights"]
    assert set(weights) == set(model.state_dict())  # plain transformers names, no lora_ tensors
    merged = lora.merge_and_unload().state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(weights[name], merged[name]) and not torch.allclose(weights[name], model.state_dict()[name])

    samples = sampler.generate([[1, 2], [3], [4]], SamplingConfig(max_new_tokens=9, temperature=0.7, top_k=5, seed=3))
    assert seen["prompts"][0] == {"prompt_token_ids": [1, 2]}
    assert seen["params"]["seed"] == 3 and seen["params"]["top_k"] == 5 and seen["params"]["max_tokens"] == 9
    assert [s.response_ids for s in samples] == [[*hello, eos], [*hello, eos], hello * 3]
    assert [s.finished for s in samples] == [True, True, False]
    assert samples[0].text == tiny_tokenizer.decode(hello)
    sampler.close()


def _count_embedded_tokens(model):
    """A counter of the tokens every forward pass embeds (prefill and decoding alike)."""
    seen = {"tokens": 0}

    def hook(_module, args):
        seen["tokens"] += args[0].numel()

    model.get_input_embeddings().register_forward_pre_hook(hook)
    return seen


def test_shared_prefix_and_repeated_prompts_are_encoded_once_with_the_same_tokens(tiny_tokenizer):
    """Prompts that share a preamble, some repeated: the shared prefill gives the tokens the plain path gives
    (greedy, and sampled with a seed) while the model embeds fewer prompt tokens: the preamble once, each
    distinct prompt's rest once."""
    from alignlab.generation import generate_from_ids

    model = load_model("tiny-random")
    preamble = tiny_tokenizer("Below is an instruction that describes a task. Write a response that "
                              "completes the request.\n\n", add_special_tokens=False).input_ids
    rests = [tiny_tokenizer(t, add_special_tokens=False).input_ids
             for t in ("The movie was", "I watched it twice and the acting", "Why")]
    prompts = [preamble + rests[i] for i in (0, 0, 1, 2, 1, 0)]
    counter = _count_embedded_tokens(model)
    results = {}
    for share in (False, True):
        for temperature in (0.0, 1.0):
            counter["tokens"] = 0
            sampling = SamplingConfig(max_new_tokens=6, temperature=temperature, seed=5, batch_size=6,
                                      share_prefix=share)
            results[share, temperature] = generate_from_ids(model, tiny_tokenizer, prompts, sampling)
            if temperature == 0.0:
                results[share, "tokens"] = counter["tokens"]
    for temperature in (0.0, 1.0):
        assert results[True, temperature] == results[False, temperature]
    width = max(len(p) for p in prompts)
    decoding = 6 * 5  # rows x later steps, at most (a batch stops early only when every row has finished)
    assert results[False, "tokens"] >= 6 * width
    distinct_rests = sum(width - len(preamble) - 1 for _ in rests)  # each distinct row's rest, padded, minus one
    assert results[True, "tokens"] <= len(preamble) + distinct_rests + 6 + decoding
    assert results[True, "tokens"] < results[False, "tokens"] - 3 * len(preamble)


def test_shared_prefix_with_a_lora_model_and_a_single_prompt(tiny_tokenizer):
    """Through peft's wrapper, for one prompt (its tokens but the last prefilled) and for repeated prompts,
    sampling matches the plain path; one-token prompts, repeated (nothing to prefill), take the plain path."""
    import torch

    from alignlab.generation import generate_from_ids
    from alignlab.models import add_lora

    model = add_lora(load_model("tiny-random"), r=4, alpha=8)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # an adapter that changes the outputs
            param.data.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    ids = tiny_tokenizer("Tell me about the movie, please.").input_ids
    for prompts in ([ids], [ids, ids, ids[:-2]], [ids[:1]] * 3, [ids[:1], ids[:1], ids[1:2]]):
        outs = [generate_from_ids(model, tiny_tokenizer, prompts,
                                  SamplingConfig(max_new_tokens=5, temperature=0.0, share_prefix=share))
                for share in (False, True)]
        assert outs[0] == outs[1]


def test_shared_prefill_cache_gives_the_plain_next_token_logits(tiny_tokenizer):
    """The cache built from the shared preamble and the distinct prompts' rests, with padding in the middle,
    gives each row's next-token logits as a plain forward over that row's prompt alone (1e-5 in fp32)."""
    import torch

    from alignlab.generation import _layout_prompts, _shared_prefill

    model = load_model("tiny-random").eval()
    preamble = tiny_tokenizer("Below is an instruction that describes a task.\n\n", add_special_tokens=False).input_ids
    prompts = [preamble + tiny_tokenizer(t, add_special_tokens=False).input_ids
               for t in ("The movie was", "I watched it twice and the acting", "The movie was", "Why")]
    width = max(len(p) for p in prompts)
    ids, mask = _layout_prompts(prompts, len(preamble), width, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        extra = _shared_prefill(model, prompts, len(preamble), ids, mask)
        assert extra is not None
        (key, cache), = extra.items()
        assert cache.get_seq_length() == width - 1
        positions = (mask.cumsum(-1) - 1)[:, -1:]
        logits = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=positions, **extra).logits[:, -1]
        for row, p in enumerate(prompts):
            alone = model(input_ids=torch.tensor([p])).logits[0, -1]
            torch.testing.assert_close(logits[row], alone, rtol=1e-5, atol=1e-5)
