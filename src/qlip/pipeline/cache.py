"""Caches of long runs, reused only when what made them matches.

A cache is a folder with ``fingerprint.json``: the inputs and settings that made it (a JSON
dict). :func:`claim` reuses a folder of the same fingerprint, refuses one of another (naming the
fields that differ and what to do), or empties it when asked to redo. :class:`ChunkStore` runs a
long job over items (prompts) chunk by chunk, each chunk a safetensors file written atomically
with the digest of its items in its metadata: an interrupted run resumes at the first missing
chunk, and a longer list of the same items reuses every chunk it shares with the shorter one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..files import (
    crash_point,
    load_tensors,
    read_json_dict,
    read_tensor_metadata,
    save_tensors,
    write_atomic,
)

FINGERPRINT_FILE = "fingerprint.json"
CHUNK_REMEDY = "delete it (the chunk is computed again)"


class StaleCacheError(ValueError):
    """A cache folder holds results made from other inputs than the ones asked for now."""


def digest(value) -> str:
    """A short SHA-256 of a JSON-able value (keys sorted)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A short SHA-256 of named tensors' names, shapes, dtypes and values."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}{tuple(value.shape)}{value.dtype}".encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def file_digest(path: str | Path, block: int = 1 << 20) -> str:
    """A short SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            h.update(chunk)
    return h.hexdigest()[:16]


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(old: dict, new: dict) -> list[str]:
    """What differs between two fingerprints, one ``"key: old (cached) vs new (now)"`` each."""
    old, new = _flat(old), _flat(new)
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} (cached) vs {new.get(k)!r} (now)" for k in keys
            if old.get(k) != new.get(k)]


def claim(folder: str | Path, fingerprint: dict, redo: bool = False, what: str = "cache") -> bool:
    """Make ``folder`` the cache of ``fingerprint``. Returns True when it already holds results
    of the same inputs (reuse them), False when it is new or was emptied (``redo``). A folder of
    other inputs without ``redo`` raises :class:`StaleCacheError`.

    >>> if claim("runs/w4/qlip_work/t2q", {"labels": "ab12", "iters": 2000}): ...  # doctest: +SKIP
    """
    folder = Path(folder)
    fingerprint = json.loads(json.dumps(fingerprint, default=str))  # as it reads back
    path = folder / FINGERPRINT_FILE
    if path.is_file():
        old = read_json_dict(path, f"delete {folder} (it is computed again)")
        if old == fingerprint:
            return True
        if not redo:
            changes = "; ".join(differences(old, fingerprint)[:4])
            raise StaleCacheError(
                f"{folder} holds a {what} made from other inputs ({changes}); compute it again "
                f"with --redo-stale (redo=True), or delete {folder}")
        shutil.rmtree(folder)
    elif folder.is_dir() and any(folder.iterdir()):
        if not redo:
            raise StaleCacheError(f"{folder} holds files but no {FINGERPRINT_FILE}: not a cache "
                                  "this version wrote; delete it or pass --redo-stale")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(fingerprint, indent=1))
    return False


class ChunkStore:
    """Results of ``compute(start, stop)`` over items ``[start, stop)``, ``chunk`` items a file.

    >>> store = ChunkStore("runs/w4/qlip_work/t2q_data", {"steps": 25}, chunk=64)  # doctest: +SKIP
    >>> data = store.run(keys, lambda a, b: {"x": f(prompts[a:b])}, desc="T2Q data")  # doctest: +SKIP
    """

    def __init__(self, folder: str | Path, fingerprint: dict, chunk: int, redo: bool = False,
                 what: str = "cache"):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1; got {chunk}")
        self.folder, self.chunk, self.redo, self.what = Path(folder), chunk, redo, what
        claim(self.folder, {**fingerprint, "chunk": chunk}, redo, what)

    def path(self, start: int) -> Path:
        return self.folder / f"chunk_{start:07d}.safetensors"

    def _valid(self, start: int, keys: Sequence[str]) -> bool:
        """Does the chunk at ``start`` hold the results of ``keys`` (its items)?"""
        path = self.path(start)
        if not path.is_file():
            return False
        meta = read_tensor_metadata(path, CHUNK_REMEDY)
        count = int(meta.get("count", -1))
        if count == len(keys) and meta.get("items") == digest(list(keys)):
            return True
        if 0 < count < len(keys) and meta.get("items") == digest(list(keys[:count])):
            return False  # the last chunk of a shorter run of the same items: extend it
        if self.redo:
            return False
        raise StaleCacheError(f"{path} holds results of other items than the ones asked for "
                              f"now; pass --redo-stale to compute it again, or delete {self.folder}")

    def run(self, keys: Sequence[str], compute: Callable[[int, int], dict[str, torch.Tensor]],
            desc: str = "", progress: bool = True) -> dict[str, torch.Tensor]:
        """Every chunk's results (computed where missing), concatenated along dim 0."""
        if not keys:
            raise ValueError(f"{desc or self.what}: nothing to compute (no items)")
        starts = range(0, len(keys), self.chunk)
        done = [s for s in starts if self._valid(s, keys[s : s + self.chunk])]
        bar = tqdm(total=len(keys), desc=desc, unit="item", disable=not progress,
                   initial=sum(len(keys[s : s + self.chunk]) for s in done))
        for start in starts:
            if start in done:
                continue
            items = keys[start : start + self.chunk]
            result = compute(start, start + len(items))
            save_tensors(result, self.path(start),
                        {"items": digest(list(items)), "count": str(len(items))})
            crash_point("chunk")
            bar.update(len(items))
        bar.close()
        parts = [load_tensors(self.path(s), CHUNK_REMEDY)[0]
                 for s in starts]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
