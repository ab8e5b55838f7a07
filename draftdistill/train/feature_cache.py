"""Cached target features for EAGLE-3 training with data chains: the offline mode, for small runs
that see each context many times (several epochs over a prompt pool, or benchmark arms that share
contexts).

For each context row (prompt + response token ids) the cache keeps what the head needs from the
target: the aux hidden states it reads ([T, len(aux layers) * H]) and the target's final hidden
state ([T, H], after the final norm), from which the target's logits are one lm_head matmul away.
This is the pair SpecForge's offline mode stores; it costs 2 * (len(aux) + 1) * H bytes per token in
bf16 (4.6 KB for SmolLM2, 32 KB for an 8B Llama), where full logits would cost 2 * V. A context
seen again skips the target's decoder layers; a new one runs the target and is stored.

Files: DIR/meta.json (what the features were computed with: a run on another target or other aux
layers is refused), DIR/<2 hex>/<sha1 of the token ids>.safetensors holding `ids`, `aux` and `final`.
Each file is written to a temporary name and renamed, so a killed run leaves no half file; a file
that does not read back (or holds other ids) is computed again and overwritten. Safetensors only.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checkpoint import write_atomically


class FeatureCache:
    def __init__(self, directory: str | Path, identity: dict):
        """identity: what the features depend on (the target, its dtype, the aux layers), as JSON."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.identity = json.loads(json.dumps(identity))  # as it reads back from meta.json
        meta = self.directory / "meta.json"
        if not meta.is_file():
            write_atomically(meta, lambda tmp: Path(tmp).write_text(json.dumps(self.identity, indent=1)))
        try:
            stored = json.loads(meta.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            where = f"{meta}:{e.lineno}:{e.colno}" if isinstance(e, json.JSONDecodeError) else str(meta)
            raise ValueError(f"{where}: unreadable feature cache identity ({e}): point feature_cache at another "
                             f"directory, or remove {self.directory}") from None
        if stored != self.identity:
            raise ValueError(f"feature cache {self.directory} holds features of {stored}, this run needs "
                             f"{self.identity}: point feature_cache at another directory")
        self.rows_read = 0  # context rows served from the cache (the target's layers skipped)
        self.rows_computed = 0  # context rows the target ran over (the missing ones then stored)

    def path(self, ids: list[int]) -> Path:
        key = hashlib.sha1(json.dumps(ids).encode()).hexdigest()
        return self.directory / key[:2] / f"{key}.safetensors"

    def get(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(aux [T, A * H], final [T, H]) on the CPU, or None when the row is not (readably) stored."""
        path = self.path(ids)
        if not path.is_file():
            return None
        try:
            stored = load_file(path)
            if stored["ids"].tolist() != ids or stored["aux"].shape[0] != len(ids) \
                    or stored["final"].shape[0] != len(ids):
                raise ValueError("holds another context")
        except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as error:
            warnings.warn(f"feature cache file {path} is unreadable ({error}); computing it again")
            path.unlink(missing_ok=True)  # so that `store` writes it afresh
            return None
        return stored["aux"], stored["final"]

    def put(self, ids: list[int], aux: torch.Tensor, final: torch.Tensor) -> None:
        path = self.path(ids)
        path.parent.mkdir(exist_ok=True)
        tensors = {"ids": torch.tensor(ids, dtype=torch.long), "aux": aux.detach().contiguous().cpu(),
                   "final": final.detach().contiguous().cpu()}
        write_atomically(path, lambda tmp: save_file(tensors, tmp))  # two ranks storing a row write the same bytes

    def context(self, target, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(aux [B, L, A * H], the target's logits [B, L, V]) of a right-padded batch whose rows are all
        stored, the logits from the stored final states through the target's lm_head (its layers do
        not run); None at the first row that is not, and the caller runs the target and `store`s.
        Padded positions hold zeros: the head never reads them and they are never scored."""
        stored = []
        for i, n in enumerate(lengths):
            row = self.get(ids[i, : int(n)].tolist())
            if row is None:
                return None
            stored.append(row)
        self.rows_read += len(stored)
        aux = _pad([a for a, _ in stored], ids.shape[1]).to(ids.device)
        final = _pad([f for _, f in stored], ids.shape[1]).to(ids.device)
        return aux, target.get_output_embeddings()(final)

    def store(self, ids: torch.Tensor, lengths: torch.Tensor, aux: torch.Tensor, final: torch.Tensor) -> None:
        """The rows of a batch the target ran over (aux and final states [B, L, .]), those not stored yet."""
        for i, n in enumerate(lengths.tolist()):
            row = ids[i, :n].tolist()
            if not self.path(row).is_file():
                self.put(row, aux[i, :n], final[i, :n])
        self.rows_computed += len(lengths)


def cache_identity(target_name: str, target, aux_layer_ids: list[int]) -> dict:
    config = target.config
    return {"target": target_name, "dtype": str(next(target.parameters()).dtype).removeprefix("torch."),
            "hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
            "vocab_size": config.vocab_size, "aux_layer_ids": list(aux_layer_ids)}


def _pad(rows: list[torch.Tensor], length: int) -> torch.Tensor:
    out = rows[0].new_zeros((len(rows), length, rows[0].shape[-1]))
    for i, row in enumerate(rows):
        out[i, : row.shape[0]] = row
    return out
