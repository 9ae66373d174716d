"""The parts every trainer shares, written once: the run folder, accelerate, the optimizer and schedule, the
step plan (which examples go into which optimizer step, on which process), checkpoints that resume exactly,
NaN guards, signals, metrics and the progress bar.

A trainer (``sft.py``, ``reward_model.py``, ``dpo.py``, ``ppo.py``) stays a readable top-to-bottom loop and calls
these helpers by name. Why not the HF Trainer: its loop hides the algorithm, and its accumulation and
checkpoint semantics changed between versions; ours are small enough to read and test.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import yaml

from alignlab.config import TrainConfig, config_to_dict
from alignlab.errors import AlignlabError
from alignlab.models import resolve_precision
from alignlab.train.checkpoints import (
    find_valid_checkpoint,
    list_checkpoints,
    load_trainable_weights,
    rng_state,
    set_rng_state,
    verify_checkpoint,
    write_checkpoint,
)


def make_accelerator(cfg: TrainConfig) -> Any:
    """An ``accelerate.Accelerator`` for this run: DDP/FSDP/DeepSpeed come from ``accelerate launch``;
    bf16 becomes autocast (parameters and optimizer state stay fp32)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    precision = resolve_precision(cfg.precision)
    # accelerate keeps its state process-wide; several runs in one process (the lab, a notebook, the tests)
    # may ask for different precisions. Reset only the precision part, keeping the process group.
    AcceleratorState._reset_state(reset_partial_state=False)
    # without cpu=True accelerate treats a CPU-only multi-process launch (torchrun, accelerate launch) as
    # one process per copy instead of a gloo process group
    return Accelerator(mixed_precision="bf16" if precision == "bf16" else "no", cpu=not torch.cuda.is_available())


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------- optimizer


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases and norm weights (1-d tensors).

    The fused kernel (one pass over each tensor instead of a loop of elementwise ops) when the parameters
    allow it: the same update, a little faster (BENCHMARKS.md)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise AlignlabError("the model has no trainable parameters")
    params = decay + no_decay
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16) for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=fused or None)


def lr_lambda(step: int, *, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warmup, then cosine/linear decay to 0 or
    constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> Any:
    """Warmup (``warmup_ratio`` of the steps) then ``cfg.schedule`` decay, as a ``LambdaLR``."""
    warmup = int(round(cfg.warmup_ratio * total_steps))

    def fn(step: int) -> float:
        return lr_lambda(step, total_steps=total_steps, warmup_steps=warmup, schedule=cfg.schedule)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


# --------------------------------------------------------------------------------------------- step plan


def plan_steps(
    lengths: Sequence[int],
    cfg: TrainConfig,
    world_size: int = 1,
    *,
    batch_builder: Callable[..., list[list[int]]] | None = None,
) -> list[list[int]]:
    """The example indices of every optimizer step, for the whole run, fixed by the seed.

    One step takes ``batch_size x grad_accum x world_size`` examples (the global batch). Epochs are shuffled
    with ``seed + epoch``; with ``group_by_length`` examples of similar length share a step. Because the plan
    is a pure function of (lengths, config), a resumed run simply continues at its step number, and every
    process computes the same plan and takes its own share (:func:`micro_batches`).
    """
    from alignlab.data.batching import length_grouped_batches

    n = len(lengths)
    if n == 0:
        raise AlignlabError("no training examples")
    global_batch = cfg.batch_size * cfg.grad_accum * world_size
    steps_per_epoch = max(1, n // global_batch) if n >= global_batch else 1
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, int(round(cfg.epochs * steps_per_epoch)))
    plan: list[list[int]] = []
    epoch = 0
    while len(plan) < total:
        if cfg.group_by_length:
            batches = (batch_builder or length_grouped_batches)(
                lengths, global_batch, seed=cfg.seed, epoch=epoch, shuffle=True
            )
        else:
            rng = np.random.default_rng([cfg.seed, epoch])
            order = rng.permutation(n).tolist()
            batches = [order[i : i + global_batch] for i in range(0, n, global_batch)]
        # a short last batch would weigh its few examples more; drop it unless it is all there is
        full = [b for b in batches if len(b) == global_batch] or batches
        plan.extend(full)
        epoch += 1
    return plan[:total]


def micro_batches(step_indices: Sequence[int], lengths: Sequence[int], cfg: TrainConfig, rank: int,
                  world_size: int, sizes: Sequence[int] | None = None, max_tokens: int | None = None
                  ) -> list[list[int]]:
    """This process's micro-batches of one optimizer step: the global batch sorted by length (less padding),
    cut into ``grad_accum x world_size`` slices, every ``world_size``-th slice taken by this rank.

    With ``max_tokens`` (default ``cfg.max_tokens``; 0 = off), a slice holding more tokens than that
    (``sizes[i]``: the tokens example ``i`` puts through the model, default ``lengths``) is cut into contiguous
    pieces of about equal tokens, every slice into the same number of pieces (at most the shortest slice's
    examples), so that processes with as many slices run as many forward passes (a sharded engine gathers
    weights in each). The trainers divide each piece's loss by the global batch's count, so the accumulated
    gradient is the one of the whole slice."""
    ordered = sorted(step_indices, key=lambda i: (lengths[i], i))
    n_slices = cfg.grad_accum * world_size
    size = math.ceil(len(ordered) / n_slices)
    slices = [s for s in (ordered[i * size : (i + 1) * size] for i in range(n_slices)) if s]
    limit = cfg.max_tokens if max_tokens is None else max_tokens
    if limit > 0 and slices:
        tokens = sizes if sizes is not None else lengths
        pieces = max(math.ceil(sum(tokens[i] for i in s) / limit) for s in slices)
        pieces = min(pieces, min(len(s) for s in slices))
        if pieces > 1:
            slices = [part for s in slices for part in _cut_even(s, [tokens[i] for i in s], pieces)]
            return [part for i, part in enumerate(slices) if (i // pieces) % world_size == rank]
    return slices[rank::world_size]


def _cut_even(items: list[int], weights: list[int], pieces: int) -> list[list[int]]:
    """``items`` cut into ``pieces`` non-empty contiguous runs of about equal total weight."""
    total, cuts, running = sum(weights), [0], 0
    for k, w in enumerate(weights):
        running += w
        left_after = len(items) - (k + 1)  # items still to place
        need = pieces - len(cuts)  # cuts still to make
        if need > 0 and (running >= total * len(cuts) / pieces or left_after == need):
            cuts.append(k + 1)
    cuts.append(len(items))
    return [items[a:b] for a, b in zip(cuts, cuts[1:])]


# --------------------------------------------------------------------------------------------- the run


class NonFiniteError(AlignlabError):
    """A NaN or inf in the loss or gradients."""


class Run:
    """One training run's folder and bookkeeping.

    Layout: ``config.yaml`` (resolved), ``metrics.jsonl``, ``checkpoints/step-N/``, ``final/`` and, for
    trainers that generate, ``samples.jsonl``. Only the main process writes.
    """

    def __init__(self, cfg: TrainConfig, stage: str, accelerator: Any | None = None) -> None:
        self.cfg = cfg
        self.stage = stage
        self.accelerator = accelerator if accelerator is not None else make_accelerator(cfg)
        self.out = Path(cfg.output_dir)
        self.is_main = self.accelerator.is_main_process
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.device = self.accelerator.device
        self.stop_requested: str | None = None
        self.skipped_steps = 0
        self.started = time.time()
        self._bar: Any = None
        self._tb: Any = None
        self._lock: Any = None
        self._undo: Any = None
        if self.engine == "DEEPSPEED" and getattr(cfg, "max_tokens", 0):
            # DeepSpeed steps its optimizer inside every backward: a micro-batch must be one forward
            self.print(f"note: max_tokens={cfg.max_tokens} is off under DeepSpeed (one forward per micro-batch)")
            cfg.max_tokens = 0
        self._open_folder()
        if self.is_main:
            (self.out / "checkpoints").mkdir(exist_ok=True)
            with open(self.out / "config.yaml", "w") as f:
                yaml.safe_dump({"stage": stage, **config_to_dict(cfg)}, f, sort_keys=False)
        if getattr(cfg, "offline", False):
            from alignlab.models import set_offline

            set_offline()
        if self.engine == "DEEPSPEED" and cfg.grad_accum > 1:
            # DeepSpeed steps its optimizer inside every backward, so our accumulation would step per micro-batch
            raise AlignlabError("under DeepSpeed keep grad_accum=1 and raise batch_size instead", field="grad_accum")
        seed_everything(cfg.seed)
        self._install_signal_handlers()

    def _open_folder(self) -> None:
        """Lock the run folder and check it holds this run or none (:mod:`alignlab.train.run_folder`); the main
        process decides and every process raises the same error, so no process is left waiting."""
        from alignlab.train.run_folder import open_run_folder_everywhere

        self._lock = open_run_folder_everywhere(self.cfg, self.stage, is_main=self.is_main,
                                                world_size=self.world_size, note=self.print)

    @property
    def engine(self) -> str:
        """accelerate's distributed type: ``NO``, ``MULTI_CPU``, ``MULTI_GPU``, ``FSDP``, ``DEEPSPEED`` …"""
        return str(self.accelerator.distributed_type).split(".")[-1]

    @property
    def shards_weights(self) -> bool:
        """True under engines that shard parameters between forward calls (FSDP, DeepSpeed): a weight may
        then only be used inside the wrapped model's ``forward``, and only a collective gathers them all."""
        return self.engine in ("FSDP", "DEEPSPEED", "MEGATRON_LM")

    def _trainable_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The trainable weights on the main process (None elsewhere). Under sharding engines every process
        must take part in ``accelerator.get_state_dict``, which gathers the full tensors."""
        unwrapped = self.accelerator.unwrap_model(model)
        names = {n for n, p in unwrapped.named_parameters() if p.requires_grad}
        if self.shards_weights:
            full = self.accelerator.get_state_dict(model)
            return {n: t.detach().cpu().contiguous() for n, t in full.items() if n in names} if self.is_main \
                else None
        if not self.is_main:
            return None
        return {n: p.detach().cpu().contiguous() for n, p in unwrapped.named_parameters() if n in names}

    # -- logging ---------------------------------------------------------------------------------------

    def log(self, step: int, metrics: dict[str, Any], *, file: str = "metrics.jsonl") -> None:
        """Append one JSON line (main process only) and mirror scalars to TensorBoard when installed."""
        if not self.is_main:
            return
        record = {"step": step, "time": round(time.time() - self.started, 3), **metrics}
        with open(self.out / file, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        if file == "metrics.jsonl":
            tb = self._tensorboard()
            if tb is not None:
                for k, v in metrics.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        tb.add_scalar(f"{self.stage}/{k}", v, step)

    def _tensorboard(self) -> Any:
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tensorboard"))
            except Exception:  # tensorboard not installed: JSONL only
                self._tb = False
        return self._tb or None

    def progress(self, total: int, start: int = 0, desc: str | None = None) -> Any:
        """A tqdm bar with ETA on the main process (a no-op object elsewhere or when disabled)."""
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=total, initial=start, desc=desc or self.stage, dynamic_ncols=True,
            disable=not (self.is_main and self.cfg.progress),
        )
        return self._bar

    def print(self, *args: Any) -> None:
        """Print on the main process without breaking the progress bar."""
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(" ".join(str(a) for a in args))
        else:
            print(*args, flush=True)

    # -- signals ---------------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: Any) -> None:
            self.stop_requested = signal.Signals(signum).name

        try:
            signal.signal(signal.SIGTERM, handler)
            signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread (e.g. inside a notebook worker): no handlers
            pass

    # -- the optimizer step --------------------------------------------------------------------------

    def check_finite(self, loss: torch.Tensor, step: int) -> bool:
        """False (and the step is to be skipped) for a non-finite loss with ``on_nan=skip``; raises with
        ``on_nan=stop``."""
        if torch.isfinite(loss).all():
            return True
        return self._nonfinite(f"loss is {loss.item()}", step)

    def _nonfinite(self, what: str, step: int) -> bool:
        if self.cfg.on_nan == "skip":
            self.skipped_steps += 1
            self.print(f"step {step}: {what}; skipping this step ({self.skipped_steps} skipped so far)")
            return False
        raise NonFiniteError(f"{what} at step {step}; the run stops: {self._last_finite()} (use on_nan=skip to skip "
                             "such steps, or a smaller lr)")

    def _last_finite(self) -> str:
        """Names the newest whole checkpoint: only finite states are ever checkpointed (:meth:`save_checkpoint`)."""
        last = find_valid_checkpoint(self.out / "checkpoints", warn=lambda *_: None)
        return f"the last good checkpoint is {last}" if last else "no checkpoint was written before it"

    def count_nonfinite(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
        """How many trainable tensors (and, given ``optimizer``, optimizer-state tensors) hold a NaN or inf, summed
        over processes (so every process takes the same decision, sharded engines included)."""
        tensors = [p.detach() for p in model.parameters() if p.requires_grad]
        if optimizer is not None:
            state = getattr(optimizer, "optimizer", optimizer).state
            tensors += [v for per_param in state.values() for v in per_param.values()
                        if torch.is_tensor(v) and v.is_floating_point()]
        flags = [~torch.isfinite(t).all() for t in tensors if t.numel()]
        bad = int(torch.stack(flags).sum()) if flags else 0
        return int(self.all_reduce_sum(bad))

    def _remember(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """With ``on_nan=skip``: a copy of the trainable weights and the optimizer state, to undo a step whose
        update leaves them non-finite."""
        inner = getattr(optimizer, "optimizer", optimizer)
        params = [p for p in model.parameters() if p.requires_grad]
        self._undo = (
            [(p, p.detach().clone()) for p in params],
            {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in inner.state[p].items()}
             for p in params if p in inner.state},
        )

    @torch.no_grad()
    def _restore(self, optimizer: torch.optim.Optimizer) -> None:
        inner = getattr(optimizer, "optimizer", optimizer)
        weights, state = self._undo
        for p, saved in weights:
            p.copy_(saved)
            if p in state:
                inner.state[p] = state[p]
            else:
                inner.state.pop(p, None)
        self._undo = None

    def optimizer_step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                       step: int, finite_loss: bool = True) -> float | None:
        """Clip, check the gradients are finite, step, zero. Returns the gradient norm, or None when the step
        was skipped: for a non-finite gradient, or because a micro-batch's loss was not finite (``finite_loss``
        False, from :meth:`check_finite` with ``on_nan=skip``: the gradients are dropped, nothing steps)."""
        if not finite_loss:
            optimizer.zero_grad(set_to_none=True)
            return None
        params = [p for p in model.parameters() if p.requires_grad]
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        norm = self.accelerator.clip_grad_norm_(params, max_norm)
        norm_value = float(norm)
        if not math.isfinite(norm_value):
            optimizer.zero_grad(set_to_none=True)
            if not self._nonfinite(f"gradient norm is {norm_value}", step):
                return None
        if self.cfg.on_nan == "skip":
            self._remember(model, optimizer)
        optimizer.step()
        # finite loss and gradients can still make non-finite weights (a huge lr, an overflow in the update):
        # checked after every step, so no later step or checkpoint builds on them
        bad = self.count_nonfinite(model)
        if bad:
            optimizer.zero_grad(set_to_none=True)
            if self.cfg.on_nan == "skip":
                self._restore(optimizer)
            self._nonfinite(f"the update left {bad} weight tensor(s) non-finite", step)
            if self.cfg.on_nan == "skip":
                self.print("  (the weights and optimizer state before the step are restored)")
            return None
        self._undo = None
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return norm_value

    @contextmanager
    def accumulate(self, model: torch.nn.Module, last: bool) -> Iterator[None]:
        """Skip the DDP gradient all-reduce on all but the last micro-batch of a step."""
        ctx = self.accelerator.no_sync(model) if (not last and self.world_size > 1) else nullcontext()
        with ctx:
            yield

    def all_reduce_sum(self, value: float | int) -> float:
        """Sum a number over processes (e.g. the loss-token count of the global batch)."""
        if self.world_size == 1:
            return float(value)
        t = torch.tensor([float(value)], device=self.device, dtype=torch.float64)
        return float(self.accelerator.reduce(t, reduction="sum").item())

    def gather_mean(self, value: float) -> float:
        """Mean of a per-process number."""
        return self.all_reduce_sum(value) / self.world_size

    # -- checkpoints ---------------------------------------------------------------------------------

    def should_save(self, step: int, total: int) -> bool:
        done = step + 1
        return done == total or (self.cfg.save_every > 0 and done % self.cfg.save_every == 0)

    def should_eval(self, step: int, total: int) -> bool:
        done = step + 1
        return done == total or (self.cfg.eval_every > 0 and done % self.cfg.eval_every == 0)

    def save_checkpoint(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: Any, extra: dict[str, Any] | None = None) -> Path | None:
        """Write ``checkpoints/step-N`` atomically: trainable weights (safetensors), optimizer, scheduler,
        RNG states, ``extra`` (trainer state such as a KL controller) and a manifest of checksums."""
        self.accelerator.wait_for_everyone()
        bad = self.count_nonfinite(model, optimizer)
        if bad:  # never write a checkpoint a resume would build on, nor name it "last good"
            raise NonFiniteError(f"step {step + 1}: {bad} weight or optimizer-state tensor(s) are non-finite, so no "
                                 f"checkpoint is written; {self._last_finite()}")
        path = None
        weights = self._trainable_weights(model)
        if self.is_main and weights is not None:
            state = {
                "step": step + 1,
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "skipped_steps": self.skipped_steps,
                "extra": extra or {},
            }
            path = write_checkpoint(self.out / "checkpoints", step + 1, weights, optimizer.state_dict(), state,
                                    keep=self.cfg.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        return path

    def checkpoint_or_stop(self, step: int, total: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           scheduler: Any, extra: dict[str, Any] | None = None) -> None:
        """End of an optimizer step (or PPO iteration): checkpoint when due or when a signal asked to stop,
        then exit (130 for SIGINT, 143 for SIGTERM) if one did."""
        if self.should_save(step, total) or self.stop_requested:
            self.save_checkpoint(step, model, optimizer, scheduler, extra=extra)
        if self.stop_requested:
            self.print(f"{self.stop_requested}: checkpoint written at step {step + 1}; rerun to resume")
            self.close()
            raise SystemExit(130 if self.stop_requested == "SIGINT" else 143)

    def resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Any) -> tuple[int, dict[str, Any]]:
        """Load the newest valid checkpoint (``resume=auto``) or the one named; returns (next step, extra
        state). A corrupted newest checkpoint is reported and the previous one used."""
        if self.cfg.resume == "never":
            self._truncate_logs(0)  # a fresh run in a used output_dir: its logs start empty, not appended
            return 0, {}
        explicit_path = self.cfg.resume not in ("auto", "latest")
        if self.shards_weights and (explicit_path or list_checkpoints(self.out / "checkpoints")):
            # the checkpoint holds full weights and the main process's optimizer state, which sharded
            # optimizers cannot load; stated here rather than resuming into a wrong state
            raise AlignlabError(f"resuming under {self.engine} is not supported yet: start a new output_dir, or "
                                "resume with DDP (examples/accelerate/ddp.yaml)", field="resume")
        if not explicit_path:
            found = find_valid_checkpoint(self.out / "checkpoints", warn=self.print)
            if found is None and list_checkpoints(self.out / "checkpoints"):
                raise AlignlabError("every checkpoint in this folder is unusable (see the warnings above), so the "
                                    "run cannot resume; to start afresh pass --overwrite true (or resume=never)",
                                    file=str(self.out / "checkpoints"))
            if found is None:
                self._truncate_logs(0)
                return 0, {}
        else:
            found = Path(self.cfg.resume)
            problem = verify_checkpoint(found)
            if problem:
                raise AlignlabError(f"cannot resume: {problem}", file=str(found))
        load_trainable_weights(self.accelerator.unwrap_model(model), found)
        optimizer.load_state_dict(torch.load(found / "optimizer.pt", weights_only=True, map_location="cpu"))
        if self.count_nonfinite(model, optimizer):
            raise AlignlabError("the checkpoint holds non-finite weights or optimizer state (a run that diverged), "
                                "so it is not resumed; resume from an earlier one (resume=PATH) or start afresh "
                                "(--overwrite true)", file=str(found))
        state = torch.load(found / "state.pt", weights_only=True)
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.skipped_steps = state.get("skipped_steps", 0)
        self._truncate_logs(int(state["step"]))
        self.print(f"resumed from {found} (step {state['step']})")
        return int(state["step"]), state.get("extra", {})

    def _truncate_logs(self, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from (a killed run may have logged steps it
        never saved), so the resumed run's logs read like an uninterrupted run's."""
        if not self.is_main:
            return
        for name in ("metrics.jsonl", "samples.jsonl"):
            path = self.out / name
            if not path.exists():
                continue
            kept, unreadable = [], 0
            for line in path.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line) if line.strip() else None
                except ValueError:  # a line cut short when a run was killed mid-write
                    record = None
                    unreadable += 1
                if isinstance(record, dict) and record.get("step", 0) <= step:
                    kept.append(line + "\n")
            if unreadable:
                self.print(f"note: {path}: dropped {unreadable} unreadable line(s) (cut short when a run stopped)")
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)

    def prepare_training(self, model: torch.nn.Module, total_steps: int) -> tuple[
            torch.nn.Module, torch.optim.Optimizer, Any, int, dict[str, Any]]:
        """The start every trainer shares: AdamW and its schedule over ``total_steps``, the accelerate
        wrappers (DDP/FSDP/DeepSpeed), then the newest valid checkpoint when resuming. Returns (model,
        optimizer, scheduler, first step, the checkpoint's extra trainer state)."""
        optimizer = make_optimizer(model, self.cfg)
        scheduler = make_scheduler(optimizer, self.cfg, total_steps)
        model, optimizer = self.accelerator.prepare(model, optimizer)
        start, extra = self.resume(model, optimizer, scheduler)
        model.train()
        return model, optimizer, scheduler, start, extra

    def finish(self, model: torch.nn.Module, tokenizer: Any, *, extra_files: dict[str, str] | None = None) -> Path:
        """The end every trainer shares: save the final model, close the logs; returns the run folder."""
        final = self.save_final(model, tokenizer, extra_files=extra_files)
        self.close()
        if final is not None:
            self.print(f"saved {final}")
        return self.out

    def save_final(self, model: torch.nn.Module, tokenizer: Any, *, extra_files: dict[str, str] | None = None,
                   name: str = "final") -> Path | None:
        """Save the trained model as a Hugging Face checkpoint folder (LoRA merged unless ``merge_lora``
        is off)."""
        from alignlab.models import save_model

        self.accelerator.wait_for_everyone()
        out = None
        full = self.accelerator.get_state_dict(model) if self.shards_weights and self.cfg.save_final else None
        if self.is_main and self.cfg.save_final:
            unwrapped = self.accelerator.unwrap_model(model)
            out = save_model(unwrapped, tokenizer, self.out / name, merge_lora=self.cfg.merge_lora,
                             extra_files=extra_files, state_dict=full)
        self.accelerator.wait_for_everyone()
        return out

    def peak_rss_mb(self) -> float:
        """This process's peak resident memory so far, in MiB."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def rss_mb(self) -> float:
        return psutil.Process().memory_info().rss / 2**20

    def close(self) -> None:
        """Close the progress bar and logs, and release the run folder's lock."""
        if self._bar is not None:
            self._bar.close()
        if self._tb:
            self._tb.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None
