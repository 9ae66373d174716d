"""The DPO-family trainer against TRL 1.16's trainers, end to end: same model (tiny-random), same pairs, same
batches, fp32, same optimizer (AdamW, lr 1e-3, weight decay 0.01, clipping at 1.0, constant schedule, no
warmup). Every logged step must agree within 1e-4 relative (step 1 is logged before the first update, step 10
after nine), and so must the weights after the 10th update.

How the runs are made comparable:

- batches: our run's step plan is recorded and TRL's sampler replays it (subclassing only in this test);
- tokenization: plain-text prompts (template ``none``) whose boundary no BPE merge crosses, so TRL's
  ``tokenize(prompt + chosen + eos)`` and our ``encode_prompt_completion`` give the same ids;
- TRL's experimental CPO/ORPO trainers prepend ``bos_token_id`` whenever the tokenizer defines one (tiny-random
  defines ``<|im_start|>`` but never adds it); they get a tokenizer copy without a BOS token, as DPOTrainer and we
  only add BOS when the tokenizer adds it itself;
- ORPO: TRL's NLL term counts the prompt tokens too (``labels = input_ids``), ours only the response (as the
  paper); with one-token prompts the first token is never predicted, so both count the same tokens and the
  whole objective matches. With longer prompts only the odds-ratio term and the rewards match (checked at step 0);
- KTO: TRL's mismatched (KL) pairs are fixed by dataset position, ours by the batch sorted by length; with
  consecutive batches of increasing lengths they are the same pairs;
- chat data: TRL's responses end with the template's ``"\n"`` after ``<|im_end|>``, ours at ``<|im_end|>``
  (checked on the token ids), so chat runs differ by that token's log-prob; the comparisons use plain text.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
# TRL 1.16 defaults gradient_checkpointing=True, whose name transformers 5 deprecates: not ours to fix
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_thread")]

from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import alignlab.train.dpo as dpo_module  # noqa: E402
from alignlab.config import DPOConfig  # noqa: E402
from alignlab.models import load_model, load_tokenizer  # noqa: E402

RTOL = 1e-4
STEPS = 10
COMMON = dict(lr=1e-3, batch_size=4, weight_decay=0.01, max_grad_norm=1.0)
KEYS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "grad_norm"]
GOOD = ["great", "lovely", "happy", "wonderful", "good", "beautiful"]
BAD = ["terrible", "boring", "awful", "hated", "long", "bad"]




def _records(prompts: list[str]) -> list[dict]:
    return [{"prompt": prompt, "chosen": f" The movie was {GOOD[i % 6]} and {GOOD[(i + 1) % 6]}.",
             "rejected": f" It was {BAD[i % 6]}, {BAD[(i + 2) % 6]} and far too long."}
            for i, prompt in enumerate(prompts)]


def _one_token_prompts(tokenizer, n: int = 8) -> list[str]:
    vocab = tokenizer.get_vocab()
    words = sorted(w for w in vocab if w.isalpha() and len(w) >= 3 and tokenizer(w)["input_ids"] == [vocab[w]])
    assert len(words) >= n
    return words[:n]


def _ours(tmp_path: Path, monkeypatch, records: list[dict], loss: str, steps: int = STEPS, **kw):
    """Train with alignlab; returns (metrics per step, the step plan, the final weights)."""
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(records))
    plans = []
    original = dpo_module.plan_steps

    def recording_plan(*args, **kwargs):
        plans.append(original(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(dpo_module, "plan_steps", recording_plan)
    cfg = DPOConfig(model="tiny-random", data=str(data), output_dir=str(tmp_path / "ours"), loss=loss,
                    precision="fp32", warmup_ratio=0.0, schedule="constant", eval_fraction=0.0, progress=False,
                    template="none", max_steps=steps, **COMMON, **kw)
    run = dpo_module.train_dpo(cfg)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    weights = load_model(run / "final").state_dict()
    return metrics, plans[0], weights


class _Replay(torch.utils.data.Sampler):
    def __init__(self, order: list[int]) -> None:
        self.order = order

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class _Logs(TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.steps.append(dict(logs))


def _trl(tmp_path: Path, trainer_cls, config_cls, records: list[dict], plan: list[list[int]], *, tokenizer,
         steps: int = STEPS, ref_model=None, **kw):
    """Train with TRL replaying ``plan``; returns (logs per step, the trained model)."""

    class Replaying(trainer_cls):
        def _get_train_sampler(self, train_dataset=None):
            return _Replay([i for step in plan for i in step])

    args = config_cls(output_dir=str(tmp_path / "trl"), learning_rate=COMMON["lr"],
                      per_device_train_batch_size=COMMON["batch_size"], gradient_accumulation_steps=1,
                      max_steps=steps, lr_scheduler_type="constant", warmup_steps=0,
                      weight_decay=COMMON["weight_decay"], max_grad_norm=COMMON["max_grad_norm"], adam_beta1=0.9,
                      adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch", bf16=False, use_cpu=True,
                      gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to=[],
                      disable_tqdm=True, seed=0, **kw)
    logs = _Logs()
    extra = {"ref_model": ref_model} if ref_model is not None else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Replaying(model=load_model("tiny-random"), args=args, train_dataset=Dataset.from_list(records),
                            processing_class=tokenizer, callbacks=[logs], **extra)
        trainer.train()
    return logs.steps, trainer.model


def _compare(ours: list[dict], theirs: list[dict], keys: list[str], extra: dict | None = None) -> None:
    assert ours and len(ours) == len(theirs), (len(ours), len(theirs))
    for mine, trl in zip(ours, theirs):
        for key in keys:
            assert mine[key] == pytest.approx(trl[key], rel=RTOL, abs=1e-6), (mine["step"], key, mine[key], trl[key])
        for ours_key, (trl_key, scale) in (extra or {}).items():
            assert mine[ours_key] == pytest.approx(scale * trl[trl_key], rel=RTOL, abs=1e-6), (mine["step"], ours_key)


def _same_weights(ours: dict, model: torch.nn.Module) -> None:
    """The two runs moved every weight tensor the same way: the difference of the updates is within 1e-4 of the
    update's norm. (Element-wise, Adam divides by sqrt(v): an element whose gradient is ~0 turns float noise into
    a visible step, so a few elements may differ by ~1e-6 when the tensors as a whole agree to ~1e-6.)"""
    start = load_model("tiny-random").state_dict()
    theirs = model.state_dict()
    for name, value in ours.items():
        update_ours, update_theirs = value - start[name], theirs[name].detach() - start[name]
        gap = float((update_ours - update_theirs).norm())
        assert gap <= RTOL * float(update_theirs.norm()) + 1e-7, (name, gap, float(update_theirs.norm()))


@pytest.mark.parametrize(("loss", "trl_loss", "label_smoothing"),
                         [("dpo", "sigmoid", 0.0), ("ipo", "ipo", 0.0), ("hinge", "hinge", 0.0),
                          ("robust", "robust", 0.1)])
def test_dpo_losses_match_trl(tmp_path, monkeypatch, loss, trl_loss, label_smoothing):
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    records = _records([f"Tell me about the movie number {i}." for i in range(8)])
    beta = 0.05 if loss == "hinge" else 0.1  # hinge: keep the margin under 1/beta for all 10 steps
    ours, plan, weights = _ours(tmp_path, monkeypatch, records, loss, beta=beta, label_smoothing=label_smoothing)
    theirs, model = _trl(tmp_path, DPOTrainer, TRLDPOConfig, records, plan, tokenizer=load_tokenizer("tiny-random"),
                         ref_model=load_model("tiny-random"), loss_type=[trl_loss], beta=beta,
                         label_smoothing=label_smoothing, max_length=None)
    assert ours[0]["rewards/margins"] == 0.0 and ours[-1]["rewards/margins"] > 0.1  # it did learn
    _compare(ours, theirs, KEYS + ["logps/chosen", "logps/rejected"])
    _same_weights(weights, model)


def test_simpo_matches_trl_cpo(tmp_path, monkeypatch):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    records = _records([f"Tell me about the movie number {i}." for i in range(8)])
    ours, plan, weights = _ours(tmp_path, monkeypatch, records, "simpo", beta=2.0, simpo_gamma=1.0)
    tokenizer = copy.deepcopy(load_tokenizer("tiny-random"))
    tokenizer.bos_token = None
    theirs, model = _trl(tmp_path, CPOTrainer, CPOConfig, records, plan, tokenizer=tokenizer, loss_type="simpo",
                         cpo_alpha=0.0, simpo_gamma=1.0, beta=2.0, remove_unused_columns=False)
    _compare(ours, theirs, KEYS)
    _same_weights(weights, model)


def test_orpo_matches_trl_with_one_token_prompts(tmp_path, monkeypatch):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tokenizer = copy.deepcopy(load_tokenizer("tiny-random"))
    records = _records(_one_token_prompts(tokenizer))
    ours, plan, weights = _ours(tmp_path, monkeypatch, records, "orpo", beta=0.1)
    tokenizer.bos_token = None
    theirs, model = _trl(tmp_path, ORPOTrainer, ORPOConfig, records, plan, tokenizer=tokenizer, beta=0.1,
                         remove_unused_columns=False)
    # our loss = OR term + NLL; TRL logs log_odds_ratio = mean log sigma(log odds), the OR term is -beta times it
    _compare(ours, theirs, KEYS, {"nll": ("nll_loss", 1.0), "preference_loss": ("log_odds_ratio", -0.1)})
    _same_weights(weights, model)


def test_orpo_with_longer_prompts_differs_only_in_the_nll_term(tmp_path, monkeypatch):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    records = _records([f"Tell me about the movie number {i}." for i in range(8)])
    ours, plan, _ = _ours(tmp_path, monkeypatch, records, "orpo", steps=1, beta=0.1)
    tokenizer = copy.deepcopy(load_tokenizer("tiny-random"))
    tokenizer.bos_token = None
    theirs, _ = _trl(tmp_path, ORPOTrainer, ORPOConfig, records, plan, tokenizer=tokenizer, steps=1, beta=0.1,
                     remove_unused_columns=False)
    _compare(ours, theirs, ["rewards/chosen", "rewards/rejected", "rewards/margins"],
             {"preference_loss": ("log_odds_ratio", -0.1)})
    # TRL's NLL also averages over the prompt tokens (predicted from the prompt's own start): a different number
    assert abs(ours[0]["nll"] - theirs[0]["nll_loss"]) > 1e-3


def test_chat_tokenization_differs_from_trl_only_by_the_template_trailer(tmp_path):
    """For conversational data TRL's response is everything the chat template writes after the prompt,
    ``"...<|im_end|>\\n"``; ours stops at the EOS (``<|im_end|>``), as every alignlab stage does (the ``"\\n"``
    is the template's separator before the next turn, not something the model should learn to end a reply
    with). Chat-format runs therefore differ from TRL by that one token's log-prob per response."""
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    from alignlab.train.dpo import encode_pair

    tokenizer = load_tokenizer("tiny-random")
    prompt = [{"role": "user", "content": "Tell me about the movie."}]
    records = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "It was great."}],
                "rejected": [{"role": "assistant", "content": "It was awful."}]}]
    args = TRLDPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
                        gradient_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=load_model("tiny-random"), ref_model=load_model("tiny-random"), args=args,
                             train_dataset=Dataset.from_list(records), processing_class=tokenizer)
    theirs = trainer.train_dataset[0]
    prompt_ids, chosen_ids, rejected_ids = encode_pair(tokenizer, prompt, "It was great.", "It was awful.",
                                                       template="chat")
    newline = tokenizer.encode("\n", add_special_tokens=False)
    assert theirs["prompt_ids"] == prompt_ids
    assert theirs["chosen_ids"] == chosen_ids + newline and theirs["rejected_ids"] == rejected_ids + newline
    assert chosen_ids[-1] == tokenizer.eos_token_id


def test_kto_matches_trl(tmp_path, monkeypatch):
    """KTO with its KL reference point from mismatched pairs within each batch. TRL fixes the mismatched pairs
    when it prepares the data (rotating completions within consecutive chunks of ``batch_size``) and so requires
    sequential batches; we rotate within each micro-batch sorted by length. Both agree when the batches are
    consecutive chunks whose lengths increase with the index: our plan is set to that here."""
    from trl import KTOConfig, KTOTrainer

    records = [{"prompt": f"Tell me about the movie number {i}.",
                "completion": " The movie was" + " very" * i + (" good." if i % 3 != 1 else " bad."),
                "label": i % 3 != 1}
               for i in range(8)]
    batches = [[0, 1, 2, 3], [4, 5, 6, 7]] * (STEPS // 2)
    monkeypatch.setattr(dpo_module, "plan_steps", lambda *args, **kwargs: [list(b) for b in batches])
    data = tmp_path / "feedback.json"
    data.write_text(json.dumps(records))
    tokenizer = load_tokenizer("tiny-random")
    lengths = [len(tokenizer(r["prompt"] + r["completion"])["input_ids"]) for r in records]
    assert lengths == sorted(set(lengths))  # so sorting a batch by length keeps its order
    cfg = DPOConfig(model="tiny-random", data=str(data), output_dir=str(tmp_path / "ours"), loss="kto", beta=0.1,
                    desirable_weight=1.0, undesirable_weight=1.5, precision="fp32", warmup_ratio=0.0,
                    schedule="constant", eval_fraction=0.0, progress=False, template="none", max_steps=STEPS,
                    **COMMON)
    run = dpo_module.train_dpo(cfg)
    ours = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    theirs, model = _trl(tmp_path, KTOTrainer, KTOConfig, records, batches,
                         tokenizer=load_tokenizer("tiny-random"), ref_model=load_model("tiny-random"), beta=0.1,
                         desirable_weight=1.0, undesirable_weight=1.5, max_length=None,
                         train_sampling_strategy="sequential")
    assert ours[-1]["rewards/margins"] > 0.1
    _compare(ours, theirs, ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                            "logps/rejected", "grad_norm"], {"kl_reference_point": ("kl", 1.0)})
    _same_weights(load_model(run / "final").state_dict(), model)
