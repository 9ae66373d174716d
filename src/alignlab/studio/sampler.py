"""The studio's sampler: one background thread that owns the models and keeps the next items ready.

Labelling items: whenever a labeller active in the last few minutes has fewer than ``ahead`` items waiting, the
thread samples ``k`` answers for the next prompt (cycling through the prompt list) and stores them. Identical
answers are resampled (a ranking needs distinct answers); a prompt that still gives fewer than two distinct
answers is skipped and counted. A/B rounds: on request, one answer from the starting model and one from a
trained model for each A/B prompt, stored in a random order that the page never learns.
"""

from __future__ import annotations

import random
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any

from alignlab.data.studio_db import StudioDB
from alignlab.errors import AlignlabError


@dataclass
class SamplerSettings:
    """What the sampler makes: ``k`` answers per prompt, the decoding settings, and how far ahead it works."""

    k: int = 2
    max_new_tokens: int = 96
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0
    ahead: int = 3
    ab_size: int = 10


class Sampler:
    """The background sampler of one studio.

    Args:
        db: the store.
        model: the model to sample from (checkpoint folder, hub id or built-in name).
        prompts: the prompt list (strings or chat messages).
        settings: :class:`SamplerSettings`.
        default_labeller: the labeller counted as active before anyone has asked for an item.
    """

    def __init__(self, db: StudioDB, model: str, prompts: list[Any], settings: SamplerSettings,
                 default_labeller: str) -> None:
        self.db = db
        self.model_name = model
        self.prompts = prompts
        self.settings = settings
        self.state = "starting"  # starting -> loading -> ready | error
        self.error = ""
        self.skipped_prompts = 0
        self.ab_status: dict[int, str] = {}  # round -> sampling | ready | error: ...
        self._active: dict[str, float] = {default_labeller: time.time()}
        self._ab_requests: list[tuple[int, str]] = []
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="studio-sampler", daemon=True)
        self._position = db.prompts_used()
        self._model: Any = None
        self._tokenizer: Any = None
        self._chat = False

    def start(self) -> None:
        """Start the thread (it loads the model first)."""
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to finish after its current item and wait a little for it."""
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        self._thread.join(timeout=30)

    def touch(self, labeller: str) -> None:
        """Mark ``labeller`` active, so the sampler keeps items ready for them."""
        with self._wake:
            self._active[labeller] = time.time()
            self._wake.notify_all()

    def request_ab(self, round_id: int, after_model: str) -> None:
        """Sample the items of A/B round ``round_id`` (the starting model against ``after_model``)."""
        with self._wake:
            self.ab_status[round_id] = "waiting"
            self._ab_requests.append((round_id, after_model))
            self._wake.notify_all()

    def sampling_settings(self) -> dict[str, Any]:
        """The decoding settings stored with every item."""
        s = self.settings
        return {"k": s.k, "max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p,
                "seed": s.seed, "template": "chat" if self._chat else "none"}

    def status(self) -> dict[str, Any]:
        """For the page: the sampler's state, error, skipped prompts and settings."""
        return {"state": self.state, "error": self.error, "skipped_prompts": self.skipped_prompts,
                "model": self.model_name, "prompts": len(self.prompts), **asdict(self.settings)}

    # -- the thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.state = "loading"
            from alignlab.models import load_model, load_tokenizer

            self._tokenizer = load_tokenizer(self.model_name)
            self._model = load_model(self.model_name).eval()
            self._chat = bool(getattr(self._tokenizer, "chat_template", None))
            self.state = "ready"
        except Exception as error:  # shown on the page; the server keeps serving what is stored
            self.state = "error"
            self.error = str(error) if isinstance(error, AlignlabError) else traceback.format_exc(limit=3)
            return
        while True:
            with self._wake:
                while not self._stop and not self._ab_requests and self._shortfall() <= 0:
                    self._wake.wait(timeout=2.0)
                if self._stop:
                    return
                request = self._ab_requests.pop(0) if self._ab_requests else None
            try:
                if request is not None:
                    self._sample_ab(*request)
                else:
                    self._sample_item()
            except Exception as error:
                if request is not None:
                    self.ab_status[request[0]] = f"error: {error}"
                else:
                    self.state = "error"
                    self.error = traceback.format_exc(limit=3)
                    return

    def _shortfall(self) -> int:
        """How many items the most behind active labeller lacks (active: asked within 10 minutes)."""
        now = time.time()
        active = [name for name, seen in self._active.items() if now - seen < 600]
        return max((self.settings.ahead - self.db.pending(name) for name in active), default=0)

    def _prompt(self, index: int) -> Any:
        prompt = self.prompts[index % len(self.prompts)]
        if isinstance(prompt, dict):  # an Alpaca mapping (a task's prompts): its text, as the trainers read it
            prompt = str(prompt.get("instruction", "")) + (f"\n\n{prompt['input']}" if prompt.get("input") else "")
        if self._chat and isinstance(prompt, str):
            return [{"role": "user", "content": prompt}]
        return prompt

    def _generate(self, model: Any, prompt: Any, n: int, seed: int) -> list[tuple[str, bool]]:
        from alignlab.generation import SamplingConfig, generate

        s = self.settings
        sampling = SamplingConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                  batch_size=max(n, 1), seed=seed)
        samples = generate(model, self._tokenizer, [prompt] * n, sampling, template="chat" if self._chat else "none")
        return [(sample.text, not sample.finished) for sample in samples]

    def _sample_item(self) -> None:
        k, index = self.settings.k, self._position
        self._position += 1
        prompt = self._prompt(index)
        answers: dict[str, bool] = {}
        for attempt in range(4):  # identical answers are sampled again
            for text, unfinished in self._generate(self._model, prompt, k - len(answers),
                                                   self.settings.seed * 1_000_003 + index * 7 + attempt):
                if text.strip() and text not in answers and len(answers) < k:
                    answers[text] = unfinished
            if len(answers) == k:
                break
        if len(answers) < 2:
            self.skipped_prompts += 1
            return
        self.db.add_item(prompt, list(answers), list(answers.values()), [self.model_name] * len(answers),
                         model=self.model_name, sampling=self.sampling_settings())

    def _sample_ab(self, round_id: int, after_model: str) -> None:
        from alignlab.models import load_model

        self.ab_status[round_id] = "sampling"
        after = load_model(after_model).eval()
        size = self.settings.ab_size
        labelled = self.db.prompts_used()
        # prompts not yet shown for labelling come first (held out from training), then the rest
        order = list(range(labelled, len(self.prompts))) + list(range(min(labelled, len(self.prompts))))
        rng = random.Random(self.settings.seed * 31 + round_id)
        for n, index in enumerate(order[:size]):
            prompt = self._prompt(index)
            seed = self.settings.seed * 1_000_003 + 500_000 + n
            before_text, before_cut = self._generate(self._model, prompt, 1, seed)[0]
            after_text, after_cut = self._generate(after, prompt, 1, seed)[0]
            shown = [(before_text, before_cut, "before"), (after_text, after_cut, "after")]
            rng.shuffle(shown)
            self.db.add_item(prompt, [a for a, _, _ in shown], [u for _, u, _ in shown], [s for _, _, s in shown],
                             model=f"{self.model_name} | {after_model}", sampling=self.sampling_settings(),
                             kind="ab", ab_round=round_id)
        del after
        self.ab_status[round_id] = "ready"
