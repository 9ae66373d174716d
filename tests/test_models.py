"""Model loading: built-ins, local folders, hub ids offline, safe loading, LoRA export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alignlab.errors import AlignlabError
from alignlab.models import add_lora, load_model, load_tokenizer, resolve_model, save_model


def test_tiny_model_is_deterministic_and_has_a_chat_template(tiny_tokenizer):
    a, b = load_model("tiny-random"), load_model("tiny-random")
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    text = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                               add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id


def test_missing_local_path_names_it():
    with pytest.raises(AlignlabError, match="does not exist"):
        load_model("./no/such/model")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(AlignlabError, match="no config.json"):
        load_model(tmp_path)


def test_hub_id_offline_names_the_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AlignlabError, match="smollm2-135m-instruct"):
        load_tokenizer("someone/some-model-that-is-not-cached")


def test_pickle_weights_refused_unless_allowed(tmp_path):
    model = load_model("tiny-random")
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # an old-style pickle checkpoint
    with pytest.raises(AlignlabError, match="allow-pickle"):
        load_model(tmp_path)
    loaded = load_model(tmp_path, allow_pickle=True)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_lora_export_merges_into_full_weights(tmp_path, tiny_tokenizer):
    model = add_lora(load_model("tiny-random"), r=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = model(ids).logits
    out = save_model(model, tiny_tokenizer, tmp_path / "merged")
    merged = load_model(out)
    with torch.no_grad():
        got = merged(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not any("lora" in k for k in merged.state_dict())


def test_adapter_only_export_reloads_with_peft(tmp_path, tiny_tokenizer):
    model = add_lora(load_model("tiny-random"), r=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.02)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = model(ids).logits
    out = save_model(model, tiny_tokenizer, tmp_path / "adapter", merge_lora=False)
    assert (out / "adapter_config.json").exists()
    with torch.no_grad():
        got = load_model(out)(ids).logits
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.slow
def test_smollm2_reloads_from_the_cache_without_converting_again(smollm2_path):
    # the GGUF is converted once: a reload reads the cached safetensors and rewrites nothing (how fast that is
    # belongs to the benchmarks, not to a timed test)
    before = {f: f.stat().st_mtime_ns for f in Path(smollm2_path).iterdir()}
    model = load_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    assert {f: f.stat().st_mtime_ns for f in Path(smollm2_path).iterdir()} == before
    assert resolve_model("smollm2-135m-instruct") == smollm2_path
    assert model.config.quantization_config is None if hasattr(model.config, "quantization_config") else True
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


@pytest.mark.parametrize("head", ["causal_lm", "score"])
def test_bf16_matmul_weights_change_nothing_under_bf16_autocast(head):
    """A frozen model with bf16 matmul weights gives bit-identical outputs under bf16 autocast (autocast casts
    the float32 weights to the same values), keeps its embeddings float32 and unties a tied LM head."""
    from alignlab.models import bf16_matmul_weights

    model = load_model("tiny-random", head=head).eval()
    ids = torch.tensor([[5, 9, 2, 7, 11, 3], [4, 4, 8, 1, 6, 2]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(input_ids=ids).logits
    converted = bf16_matmul_weights(model.requires_grad_(False))
    assert converted.get_input_embeddings().weight.dtype == torch.float32
    assert converted.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    if head == "causal_lm":
        assert converted.get_output_embeddings().weight.dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        after = converted(input_ids=ids).logits
    assert torch.equal(before, after)


def test_frozen_weight_cast_cache_is_exact_and_follows_weight_changes():
    """LoRA's frozen layers reuse their autocast copy: outputs bit-identical to plain autocast, and an in-place
    change of a base weight (a merge, a resume) is seen at the next call."""
    ids = torch.tensor([[5, 9, 2, 7, 11, 3], [4, 4, 8, 1, 6, 2]])
    plain = add_lora(load_model("tiny-random"), r=2, alpha=4).eval()
    cached = add_lora(load_model("tiny-random"), r=2, alpha=4).eval()  # add_lora turns the cache on
    for module in plain.modules():  # undo it on the first one: plain nn.Linear forwards
        module.__dict__.pop("forward", None)
    cached.load_state_dict(plain.state_dict())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain(input_ids=ids).logits
        first, second = cached(input_ids=ids).logits, cached(input_ids=ids).logits
    assert torch.equal(first, expected) and torch.equal(second, expected)
    with torch.no_grad():
        for model in (plain, cached):
            model.get_base_model().model.layers[0].mlp.up_proj.base_layer.weight.mul_(1.5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        changed, cached_changed = plain(input_ids=ids).logits, cached(input_ids=ids).logits
    assert not torch.equal(changed, expected)
    assert torch.equal(cached_changed, changed)
    with torch.no_grad():  # outside autocast the layers compute in float32 as before
        assert torch.equal(cached(input_ids=ids).logits, plain(input_ids=ids).logits)
