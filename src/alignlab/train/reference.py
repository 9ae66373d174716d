"""The reference model's log-probabilities for the DPO family: from a frozen model, from the policy with its LoRA
adapter disabled (the base weights: no second model), or from a table computed once before training
(``precompute_ref``) and cached on disk under a fingerprint of the reference's weights, the compute precision and
the set of sequences scored, so a rerun on the same data and reference reads it back instead of recomputing.

A sequence is a :data:`Row`: its token ids and Hugging Face labels (``IGNORE_INDEX`` on the prompt); the cache
keys it by :func:`row_digest`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from alignlab.data.tokenize import IGNORE_INDEX
from alignlab.errors import AlignlabError
from alignlab.models import resolve_model
from alignlab.train.forward import (
    collate_aligned,
    collate_shared_prompt,
    completion_logps,
    shared_prompt_layout,
    shared_prompt_logps,
)
from alignlab.train.loop import Run

Row = tuple[list[int], list[int]]  # (input ids, labels with IGNORE_INDEX on the prompt)


def row_digest(ids: Sequence[int], labels: Sequence[int]) -> int:
    """A 64-bit digest of one scored sequence (its token ids and where its response starts): the key of its
    reference log-prob in the cache."""
    start = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
    h = hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=8)
    h.update(start.to_bytes(8, "little"))
    return int.from_bytes(h.digest(), "little", signed=True)


class Scored(NamedTuple):
    """What :func:`score_rows` returns: per-token response log-probs ``(n, k)`` (float32, zero where ``mask``
    is False), their ``mask`` ``(n, k)``, ``tokens`` (the rows' real tokens, as separate sequences) and
    ``encoded`` (the tokens the forward ran: fewer when rows share a prompt)."""

    token_logps: torch.Tensor
    mask: torch.Tensor
    tokens: int
    encoded: int


def score_rows(model: torch.nn.Module, rows: Sequence[Row], pad: int, run: Run) -> Scored:
    """One forward over ``rows`` in their order, each distinct prompt encoded once.

    Rows with the same prompt (a pair's chosen and rejected rows) are laid out as the prompt followed by each
    response (:func:`~alignlab.train.forward.collate_shared_prompt`): every response attends to the prompt and
    to itself only, so its log-probs are those of its own ``prompt + response`` row, while the prompt's tokens
    go through the model once instead of once per response. The layout suits the model
    (:func:`~alignlab.train.forward.shared_prompt_layout`): one unpadded row whose attention runs response by
    response (segment attention, for SDPA models), else packed rows under a 4D mask. Engines that shard
    weights between calls (FSDP, DeepSpeed ZeRO-3) cannot run the LM head outside the model's forward; they get
    one aligned row per sequence (:func:`~alignlab.train.forward.completion_logps`)."""
    seqs, labels = [r[0] for r in rows], [r[1] for r in rows]
    if run.shards_weights:
        batch = collate_aligned(seqs, labels, pad).to(run.device)
        with run.accelerator.autocast():
            token_logps = completion_logps(model, batch)
        tokens = int(batch.attention_mask.sum())
        return Scored(token_logps, batch.loss_mask, tokens, tokens)
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, (ids, lab) in enumerate(rows):
        start = next((j for j, t in enumerate(lab) if t != IGNORE_INDEX), len(lab))
        by_prompt.setdefault(tuple(ids[:start]), []).append(i)
    groups = [(list(prompt), [seqs[i][len(prompt):] for i in members]) for prompt, members in by_prompt.items()]
    batch = collate_shared_prompt(groups, pad, **shared_prompt_layout(model)).to(run.device)
    with run.accelerator.autocast():
        token_logps = shared_prompt_logps(model, batch)
    order = torch.tensor([i for members in by_prompt.values() for i in members], device=run.device)
    back = torch.empty_like(order)
    back[order] = torch.arange(len(order), device=run.device)  # row i is response back[i] of the batch
    return Scored(token_logps[back], batch.mask[back], batch.tokens, batch.encoded)


class Reference:
    """Where the reference log-probs come from: a frozen ``model``; the policy with its LoRA adapter disabled
    (``adapter_of``: the base weights, no second model); or a precomputed ``table`` (digest -> summed log-prob)."""

    def __init__(self, *, model: torch.nn.Module | None = None, adapter_of: torch.nn.Module | None = None,
                 table: dict[int, float] | None = None) -> None:
        if sum(x is not None for x in (model, adapter_of, table)) != 1:
            raise ValueError("give exactly one of model, adapter_of, table")
        self.model, self.adapter_of, self.table = model, adapter_of, table

    @torch.no_grad()
    def logps(self, rows: Sequence[Row], pad: int, run: Run) -> torch.Tensor:
        """Summed reference log-probs ``(n,)`` of the response tokens of ``rows``."""
        if self.table is not None:
            try:
                values = [self.table[row_digest(*row)] for row in rows]
            except KeyError:
                raise AlignlabError("a sequence is missing from the reference log-prob cache; delete the cache "
                                    "file or run without precompute_ref") from None
            return torch.tensor(values, dtype=torch.float32, device=run.device)
        if self.adapter_of is not None:
            peft_model = run.accelerator.unwrap_model(self.adapter_of)
            with peft_model.disable_adapter():
                token_logps = score_rows(peft_model, rows, pad, run).token_logps
        else:
            token_logps = score_rows(self.model, rows, pad, run).token_logps
        return token_logps.sum(-1)


# --------------------------------------------------------------------------------------------- the cache on disk


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def reference_fingerprint(name: str) -> str | None:
    """SHA-256 over the checksums of a checkpoint folder's weight and config files (and, for a LoRA adapter
    folder, its base model's); None for a hub id, which has no local files to hash."""
    folder = Path(resolve_model(name))
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".bin", ".pt", ".pth")
                            or f.name in ("config.json", "adapter_config.json")):
            h.update(f.name.encode())
            h.update(_file_sha256(f).encode())
    adapter = folder / "adapter_config.json"
    if adapter.exists():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        h.update(str(reference_fingerprint(base) if base else None).encode())
    return h.hexdigest()


def state_dict_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor of a loaded model (for references that are not local folders)."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def reference_cache_path(root: Path, fingerprint: str, precision: str, digests: Sequence[int]) -> Path:
    """The cache file for these reference weights, compute precision and set of scored sequences."""
    h = hashlib.sha256(json.dumps({"reference": fingerprint, "precision": precision, "version": 1}).encode())
    h.update(np.asarray(sorted(set(digests)), dtype=np.int64).tobytes())
    return root / f"{h.hexdigest()[:32]}.safetensors"


def compute_reference_table(reference: Reference, rows: Sequence[Row], pad: int, run: Run, batch_size: int
                            ) -> dict[int, float]:
    """Score ``rows`` with ``reference`` (each process a share, gathered): digest -> summed log-prob."""
    unique = list({row_digest(*row): row for row in rows}.items())
    unique.sort(key=lambda item: len(item[1][0]))
    mine = unique[run.rank :: run.world_size]
    table: dict[int, float] = {}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine), desc="reference log-probs", disable=not (run.is_main and run.cfg.progress))
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        values = reference.logps([row for _, row in chunk], pad, run).tolist()
        table.update((digest, value) for (digest, _), value in zip(chunk, values))
        bar.update(len(chunk))
    bar.close()
    if run.world_size > 1:
        from accelerate.utils import gather_object

        merged: dict[int, float] = {}
        for part in gather_object([table]):
            merged.update(part)
        table = merged
    return table


def write_reference_cache(path: Path, table: dict[int, float], meta: dict[str, str]) -> None:
    """Write the table as safetensors (``digests`` int64, ``logps`` float32) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digests = torch.tensor(list(table), dtype=torch.int64)
    logps = torch.tensor(list(table.values()), dtype=torch.float32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"digests": digests, "logps": logps}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def read_reference_cache(path: Path, digests: Sequence[int]) -> dict[int, float] | None:
    """The cached table when the file exists and holds every digest asked for, else None."""
    if not path.exists():
        return None
    try:
        data = load_file(str(path))
    except Exception:  # a damaged file is recomputed
        return None
    table = dict(zip(data["digests"].tolist(), data["logps"].tolist()))
    return table if all(d in table for d in digests) else None
