"""Best-of-n and rejection-sampling fine-tuning (Llama 2 style).

Best-of-n (``alignlab bon``): sample n answers per prompt, keep the one the reward scores highest. It needs
no training and is the baseline the other methods are measured against. Its KL from the sampling policy is
known in closed form (Stiennon et al. 2020; Beirami et al. 2024): ``KL(best-of-n || policy) <= log n -
(n - 1) / n``, the value usually quoted. Sampling once at the largest n gives the whole curve for smaller k:
the expected best of k out of the n samples is an average over all k-subsets, computed exactly from the
sorted scores (:func:`expected_best_of_k`).

Rejection sampling (``alignlab rs``): for R rounds, sample n answers per prompt from the current policy,
score them, keep the best per prompt (or the top k, or those above a threshold), fine-tune on the kept set
with the SFT trainer, and sample the next round from the new policy. Each round writes ``samples.jsonl``
(every sample, its score, whether kept), ``kept.jsonl`` (the SFT data) and ``sft/`` (the round's run); a
rerun skips finished rounds, so a stopped run resumes at the round it was in.

Under ``torchrun``/``accelerate launch`` each process samples and scores every N-th prompt (its own seed), the
results are gathered back into prompt order, the main process writes the files, and each round's SFT runs
data-parallel. Generation goes through :func:`alignlab.generation.make_sampler` (``backend=hf`` or ``vllm``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from alignlab.config import BoNConfig, RSConfig, SampleConfig, SFTConfig, TrainConfig
from alignlab.data.io import write_jsonl
from alignlab.data.templates import render_prompt
from alignlab.errors import AlignlabError
from alignlab.generation import Sample, Sampler, SamplingConfig, check_backend, make_sampler
from alignlab.models import load_model, load_tokenizer, resolve_model, resolve_precision
from alignlab.tasks.loading import load_prompts
from alignlab.train.run_folder import open_run_folder_everywhere

# ----------------------------------------------------------------------------------------------- selection


def best_of_n_kl(n: int) -> float:
    """The analytic KL of best-of-n from its base policy: ``log n - (n - 1) / n`` (nats)."""
    if n < 1:
        raise AlignlabError(f"n must be at least 1, got {n}", field="n")
    return math.log(n) - (n - 1) / n


def select(scores: Sequence[float], *, mode: str = "best", top_k: int = 1, threshold: float = 0.0) -> list[int]:
    """Indices of the kept samples of one prompt.

    ``best``: the argmax (ties: the earliest sample, so the choice is deterministic); ``top_k``: the k
    highest (ties by index); ``threshold``: every sample scoring at least ``threshold``, best first.
    """
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if mode == "best":
        return order[:1]
    if mode == "top_k":
        return order[:top_k]
    if mode == "threshold":
        return [i for i in order if scores[i] >= threshold]
    raise AlignlabError(f"unknown selection '{mode}' (best, top_k, threshold)", field="select")


def best_of_first_k(scores: Sequence[float], k: int) -> float:
    """The score best-of-k picks among the first k samples: exactly what a direct best-of-k run with the same
    sampling seed and order would pick."""
    return max(scores[:k])


def expected_best_of_k(scores: Sequence[float], k: int) -> float:
    """E[max of k samples drawn without replacement from ``scores``], exactly: with scores sorted ascending
    s_1 <= ... <= s_n, the i-th is the maximum of C(i-1, k-1) of the C(n, k) subsets."""
    n = len(scores)
    if not 1 <= k <= n:
        raise AlignlabError(f"k must be in 1..{n}, got {k}", field="n")
    s = sorted(scores)
    total = math.comb(n, k)
    return sum(s[i - 1] * math.comb(i - 1, k - 1) for i in range(k, n + 1)) / total


def curve_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n (and n itself)."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


# ----------------------------------------------------------------------------------------------- sampling


def sample_n(model: Any, tokenizer: Any, prompts: Sequence[Any], n: int, sampling: SamplingConfig,
             template: str, max_prompt_tokens: int, sampler: Sampler | None = None
             ) -> tuple[list[list[Sample]], dict[str, Any]]:
    """n samples per prompt (prompts that leave no room under ``max_prompt_tokens`` are skipped, counted), from
    ``sampler`` (default: Hugging Face generate on ``model``). The info dict holds the kept prompts and their
    indices in ``prompts``."""
    from alignlab.data.tokenize import encode_prompt

    if n < 1:
        raise AlignlabError(f"n must be at least 1, got {n}", field="n")
    kept_prompts, kept_indices, ids, skipped = [], [], [], {"prompt too long": 0}
    for index, p in enumerate(prompts):
        p_ids = encode_prompt(tokenizer, p, template=template)
        if len(p_ids) > max_prompt_tokens:
            skipped["prompt too long"] += 1
            continue
        kept_prompts.append(p)
        kept_indices.append(index)
        ids.append(p_ids)
    if not ids:
        raise AlignlabError(f"every prompt is longer than {max_prompt_tokens} tokens", field="prompts")
    sampler = sampler or make_sampler("hf", model, tokenizer)
    flat = sampler.generate([p for p in ids for _ in range(n)], sampling)
    return [flat[i * n : (i + 1) * n] for i in range(len(ids))], {"kept_prompts": kept_prompts,
                                                                  "kept_indices": kept_indices, **skipped}


def score_samples(scorer: Any, prompts: Sequence[Any], groups: Sequence[Sequence[Sample]],
                  on_bad_score: str) -> tuple[list[list[float | None]], int]:
    """Scores per group; with ``on_bad_score=skip`` a failing or NaN score is None (counted), else an error."""
    flat_prompts = [p for p, g in zip(prompts, groups) for _ in g]
    flat_texts = [s.text for g in groups for s in g]
    try:
        flat = scorer.score(flat_prompts, flat_texts)
        bad = 0
    except AlignlabError:
        if on_bad_score != "skip":
            raise
        flat, bad = [], 0  # score one by one to find the failures
        for p, t in zip(flat_prompts, flat_texts):
            try:
                flat.append(scorer.score([p], [t])[0])
            except AlignlabError:
                flat.append(None)
                bad += 1
    out, i = [], 0
    for g in groups:
        out.append(flat[i : i + len(g)])
        i += len(g)
    return out, bad


def _scorer(cfg: SampleConfig) -> Any:
    from alignlab.scoring import load_scorer

    if bool(cfg.reward_model) == bool(cfg.reward):
        raise AlignlabError("give exactly one of --reward-model FOLDER or --reward module:function",
                            field="reward")
    return load_scorer(cfg.reward_model or cfg.reward, precision=getattr(cfg, "precision", "fp32"))


def _sampling(cfg: SampleConfig, seed: int) -> SamplingConfig:

    # rs decodes in its training precision (bf16 autocast where the CPU/GPU has it); bon has none: fp32
    return SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          batch_size=cfg.gen_batch_size, seed=seed,
                          precision=resolve_precision(getattr(cfg, "precision", "fp32")))


def _prompts(cfg: SampleConfig) -> list[Any]:
    if not cfg.prompts:
        raise AlignlabError("no prompts: pass --prompts FILE", field="prompts")
    return load_prompts(cfg.prompts, limit=cfg.limit_prompts or None)


def sample_and_score(model: Any, tokenizer: Any, prompts: Sequence[Any], cfg: Any, scorer: Any, seed: int,
                     sampler: Sampler | None = None) -> dict[str, Any]:
    """n samples per prompt and their scores: ``prompts`` (the kept ones), ``indices`` (their positions in
    ``prompts``), ``groups``, ``scores`` and the ``skipped`` counts."""
    groups, info = sample_n(model, tokenizer, prompts, cfg.n, _sampling(cfg, seed), cfg.template,
                            cfg.max_prompt_tokens, sampler)
    kept_prompts, indices = info.pop("kept_prompts"), info.pop("kept_indices")
    scores, bad = score_samples(scorer, kept_prompts, groups, cfg.on_bad_score)
    return {"prompts": kept_prompts, "indices": indices, "groups": groups, "scores": scores,
            "skipped": {**info, "bad score": bad}}


def select_samples(sampled: dict[str, Any], tokenizer: Any, cfg: Any, mode: str = "best", top_k: int = 1,
                   threshold: float = 0.0) -> dict[str, Any]:
    """Add to :func:`sample_and_score`'s result the rows for samples.jsonl (every sample, ``kept`` marked) and
    the kept rows (the SFT data)."""
    rows, kept = [], []
    for p_index, (prompt, group, group_scores) in enumerate(zip(sampled["prompts"], sampled["groups"],
                                                                sampled["scores"])):
        valid = [i for i, s in enumerate(group_scores) if s is not None and math.isfinite(s)]
        chosen = {valid[i] for i in select([group_scores[i] for i in valid], mode=mode, top_k=top_k,
                                           threshold=threshold)} if valid else set()
        rendered = render_prompt(tokenizer, prompt, cfg.template)
        for i, (sample, score) in enumerate(zip(group, group_scores)):
            row = {"prompt_index": p_index, "sample": i, "prompt": prompt, "response": sample.text,
                   "score": score, "finished": sample.finished, "kept": i in chosen}
            rows.append(row)
            if i in chosen:
                # a sample cut at max_new_tokens is trained without EOS: the policy should not learn to stop there
                kept.append({"prompt": rendered, "completion": sample.text, "score": score,
                             "unfinished": not sample.finished})
    return {**sampled, "rows": rows, "kept": kept}


def sample_score_select(model: Any, tokenizer: Any, prompts: Sequence[Any], cfg: Any, scorer: Any, seed: int,
                        mode: str = "best", top_k: int = 1, threshold: float = 0.0,
                        sampler: Sampler | None = None, state: Any = None) -> dict[str, Any]:
    """Sample n per prompt, score, select. Returns rows for samples.jsonl, the kept rows and counts.

    With ``state`` (accelerate's process state) of several processes, each samples and scores every N-th
    prompt with its own seed; the results are gathered back into prompt order and selected on every process,
    so the result reads as one process's."""
    if state is None or state.num_processes == 1:
        return select_samples(sample_and_score(model, tokenizer, prompts, cfg, scorer, seed, sampler), tokenizer,
                              cfg, mode, top_k, threshold)
    from accelerate.utils import gather_object

    mine = list(range(state.process_index, len(prompts), state.num_processes))
    try:
        part = sample_and_score(model, tokenizer, [prompts[i] for i in mine], cfg, scorer,
                                _shard_seed(seed, state.process_index), sampler)
    except AlignlabError as e:
        if e.field != "prompts":  # a process whose every prompt is too long (or that has none) still takes part
            raise
        part = {"prompts": [], "indices": [], "groups": [], "scores": [],
                "skipped": {"prompt too long": len(mine), "bad score": 0}}
    mine_kept = [(mine[i], p, g, sc) for i, p, g, sc in zip(part["indices"], part["prompts"], part["groups"],
                                                               part["scores"])]
    every = gather_object([(mine_kept, part["skipped"])])
    merged = sorted((item for items, _ in every for item in items), key=lambda item: item[0])
    if not merged:
        raise AlignlabError(f"every prompt is longer than {cfg.max_prompt_tokens} tokens", field="prompts")
    skipped: dict[str, int] = {}
    for _, counts in every:
        for key, value in counts.items():
            skipped[key] = skipped.get(key, 0) + value
    indices, kept_prompts, groups, scores = (list(column) for column in zip(*merged))
    return select_samples({"prompts": kept_prompts, "indices": indices, "groups": groups, "scores": scores,
                           "skipped": skipped}, tokenizer, cfg, mode, top_k, threshold)


def _processes() -> Any:
    """accelerate's process state (rank, count, device) for ``torchrun``/``accelerate launch``; one process
    otherwise. CPU-only launches get a gloo group, as the trainers' Accelerator does."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _shard_seed(seed: int, rank: int) -> int:
    """Process 0 samples with ``seed`` itself (so one process is unchanged); the others with seeds derived from
    (seed, rank), so no two processes draw the same random stream."""
    if rank == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------- bon


def run_bon(cfg: BoNConfig) -> dict[str, Any]:
    """``alignlab bon``: best-of-n with its curve over k and the analytic KL."""
    check_backend(cfg.backend)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, allow_pickle=cfg.allow_pickle)
    scorer = _scorer(cfg)
    start = time.perf_counter()
    sampler = make_sampler(cfg.backend, model, tokenizer, checkpoint=_checkpoint(cfg.backend, cfg.model))
    result = sample_score_select(model, tokenizer, _prompts(cfg), cfg, scorer, cfg.seed, sampler=sampler)
    sampler.close()
    gold = None
    if cfg.gold:
        from alignlab.scoring import load_scorer

        gold_scorer = load_scorer(cfg.gold)
        flat_prompts = [r["prompt"] for r in result["rows"]]
        gold = gold_scorer.score(flat_prompts, [r["response"] for r in result["rows"]])
        for row, g in zip(result["rows"], gold):
            row["gold"] = g
    write_jsonl(out / "samples.jsonl", result["rows"])
    curve = []
    valid_groups = [[s for s in g if s is not None] for g in result["scores"]]
    valid_groups = [g for g in valid_groups if len(g) == cfg.n]
    gold_groups = None
    if gold is not None:
        gold_groups = [gold[i * cfg.n : (i + 1) * cfg.n] for i in range(len(result["scores"]))]
    for k in curve_ks(cfg.n):
        point = {"n": k, "kl_bound": best_of_n_kl(k),
                 "reward": sum(expected_best_of_k(g, k) for g in valid_groups) / max(1, len(valid_groups))}
        if gold_groups is not None:  # gold of the sample the reward picks among the first k
            picks = [max(range(k), key=lambda i, s=s: (s[i], -i)) for s in result["scores"]]
            point["gold_of_first_k_pick"] = sum(g[i] for g, i in zip(gold_groups, picks)) / len(picks)
        curve.append(point)
    summary = {"n": cfg.n, "prompts": len(result["prompts"]), "samples": len(result["rows"]),
               "skipped": result["skipped"], "kl_bound": best_of_n_kl(cfg.n), "curve": curve,
               "seconds": time.perf_counter() - start}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"best-of-{cfg.n} on {summary['prompts']} prompts ({summary['samples']} samples, "
          f"{summary['seconds']:.0f} s); skipped: {summary['skipped']}")
    print(f"{'n':>4} {'KL bound':>9} {'E[best reward]':>15}" + (" gold" if gold is not None else ""))
    for p in curve:
        g = f" {p['gold_of_first_k_pick']:.3f}" if "gold_of_first_k_pick" in p else ""
        print(f"{p['n']:>4} {p['kl_bound']:>9.3f} {p['reward']:>15.4f}{g}")
    print(f"samples: {out / 'samples.jsonl'}")
    return summary


# ----------------------------------------------------------------------------------------------- rs


def _checkpoint(backend: str, model: str) -> str | None:
    """The folder a vLLM engine loads (the model's own); the hf backend needs none."""
    return resolve_model(model) if backend == "vllm" else None


def run_rs(cfg: RSConfig) -> Path:
    """``alignlab rs``: R rounds of sample -> score -> select -> SFT; finished rounds are reused. Under
    ``torchrun``/``accelerate launch`` the sampling is shared out and the SFT is data-parallel (module
    docstring); only the main process writes files and runs the held-out evaluation."""
    check_backend(cfg.backend)
    state = _processes()
    say = print if state.is_main_process else (lambda *a, **k: None)
    out = Path(cfg.output_dir)
    # the folder's identity and lock (as a trainer's run folder): finished rounds are reused only by the same run
    lock = open_run_folder_everywhere(cfg, "rs", is_main=state.is_main_process, world_size=state.num_processes,
                                      note=say, parts=RS_PARTS)
    try:
        return _run_rs_rounds(cfg, state, say, out)
    finally:
        if lock is not None:
            lock.release()


RS_PARTS = ("round-*", "start_eval.json", "rounds.json")  # rejection sampling's own outputs in its folder


def _run_rs_rounds(cfg: RSConfig, state: Any, say: Any, out: Path) -> Path:
    from alignlab.train.sft import train_sft

    prompts = _prompts(cfg)
    scorer = _scorer(cfg)
    policy = cfg.model
    history = []
    held_out = HeldOut(cfg, scorer) if cfg.eval_prompts and state.is_main_process else None
    if held_out is not None:
        start_file = out / "start_eval.json"
        if not start_file.exists():
            start_file.write_text(json.dumps(held_out.measure(cfg.model), indent=1))
        held_out.report("start", json.loads(start_file.read_text()))
    for r in range(1, cfg.rounds + 1):
        round_dir = out / f"round-{r}"
        final = round_dir / "sft" / "final"
        round_dir.mkdir(exist_ok=True)
        if final.exists() and (round_dir / "summary.json").exists():
            say(f"round {r}: done earlier, reusing {final}")
            history.append(json.loads((round_dir / "summary.json").read_text()))
            if held_out is not None and "eval" in history[-1]:
                held_out.report(f"round {r}", history[-1]["eval"])
            policy = str(final)
            continue
        tokenizer = load_tokenizer(policy)
        model = load_model(policy, allow_pickle=cfg.allow_pickle).to(state.device)
        t0 = time.perf_counter()
        sampler = make_sampler(cfg.backend, model, tokenizer, checkpoint=_checkpoint(cfg.backend, policy))
        result = sample_score_select(model, tokenizer, prompts, cfg, scorer, cfg.seed + r, mode=cfg.select,
                                     top_k=cfg.top_k, threshold=cfg.threshold, sampler=sampler, state=state)
        sampler.close()
        del model, sampler
        if state.is_main_process:
            write_jsonl(round_dir / "samples.jsonl", result["rows"])
            write_jsonl(round_dir / "kept.jsonl", result["kept"])
        state.wait_for_everyone()  # every process's SFT reads kept.jsonl
        if not result["kept"]:
            raise AlignlabError(f"round {r}: no sample was kept (select={cfg.select}); nothing to fine-tune on")
        all_scores = [s for g in result["scores"] for s in g if s is not None]
        kept_scores = [k["score"] for k in result["kept"]]
        sft_cfg = replace(SFTConfig(**{k: getattr(cfg, k) for k in _sft_fields()}),
                          model=policy, data=str(round_dir / "kept.jsonl"), format="prompt_completion",
                          template="none", output_dir=str(round_dir / "sft"), seed=cfg.seed + r)
        train_sft(sft_cfg)
        summary = {"round": r, "policy": policy, "samples": len(result["rows"]), "kept": len(result["kept"]),
                   "mean_score": sum(all_scores) / max(1, len(all_scores)),
                   "mean_kept_score": sum(kept_scores) / max(1, len(kept_scores)),
                   "skipped": result["skipped"], "seconds": time.perf_counter() - t0}
        if held_out is not None:
            summary["eval"] = held_out.measure(str(final))
            held_out.report(f"round {r}", summary["eval"])
        if state.is_main_process:
            (round_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        say(f"round {r}: mean sample score {summary['mean_score']:.4f}, kept {summary['kept']} "
            f"(mean {summary['mean_kept_score']:.4f})")
        history.append(summary)
        policy = str(final)
    if state.is_main_process:
        (out / "rounds.json").write_text(json.dumps(history, indent=1))
    state.wait_for_everyone()
    say(f"final policy: {policy}")
    return Path(policy)


class HeldOut:
    """One sampled answer per held-out prompt (fixed seed), scored by the run's reward, with KL and fluency
    measured against the start model: what a round bought and what it cost in drift."""

    def __init__(self, cfg: RSConfig, scorer: Any) -> None:
        self.cfg, self.scorer = cfg, scorer
        self.prompts = load_prompts(cfg.eval_prompts)
        self.tokenizer = load_tokenizer(cfg.model)
        self.reference = load_model(cfg.model, allow_pickle=cfg.allow_pickle).eval()
        self.gold = None
        if cfg.gold:
            from alignlab.scoring import load_scorer

            self.gold = load_scorer(cfg.gold)

    def measure(self, policy_path: str) -> dict[str, Any]:
        from alignlab.evaluate import evaluate_samples
        from alignlab.generation import generate

        policy = self.reference if policy_path == self.cfg.model else load_model(
            policy_path, allow_pickle=self.cfg.allow_pickle).eval()
        samples = generate(policy, self.tokenizer, self.prompts, _sampling(self.cfg, self.cfg.eval_seed),
                           template=self.cfg.template)
        result = evaluate_samples(samples, self.prompts, gold_score=self.scorer.score, policy=policy,
                                  reference=self.reference, pad_token_id=self.tokenizer.pad_token_id)
        result["scores"] = result.pop("gold_scores")
        result["score"], result["score_ci95"] = result.pop("gold"), result.pop("gold_ci95")
        if self.gold is not None:
            result["gold_scores"] = [float(g) for g in self.gold.score(self.prompts, [s.text for s in samples])]
            result["gold"] = sum(result["gold_scores"]) / max(1, len(samples))
        return result

    @staticmethod
    def report(label: str, m: dict[str, Any]) -> None:
        print(f"{label}: held-out score {m['score']:.4f} ± {m['score_ci95']:.4f} over {m['n']} prompts, "
              f"KL from start {m.get('kl', 0.0):.2f} nats, fluency (start model's NLL/token) "
              f"{m['fluency_nll']:.3f}" + (f", gold {m['gold']:.4f}" if "gold" in m else ""))


def _sft_fields() -> list[str]:
    import dataclasses

    return [f.name for f in dataclasses.fields(SFTConfig)]


__all__ = ["BoNConfig", "RSConfig", "TrainConfig", "best_of_first_k", "best_of_n_kl", "curve_ks",
           "expected_best_of_k", "run_bon", "run_rs", "sample_n", "select"]
