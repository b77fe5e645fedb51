"""The T2Q stage of `qlip train-qlip`: a seeded split of the N prompts into training and held-out
prompts, T2Q trained on the first (MSE), its SROCC and PLCC against the labels of the second;
cached with its fingerprint (what the labels' raw scores were computed from, the embeddings, the
T2Q settings)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..files import load_tensors, read_json_dict, save_tensors, write_atomic
from ..methods.qlip import T2Q, train_t2q
from ..metrics import plcc, srocc
from ..pipeline.cache import claim, tensor_digest

MODEL_FILE, LABELS_FILE, METRICS_FILE = "t2q.safetensors", "labels.safetensors", "metrics.json"


@dataclass
class T2QResult:
    model: T2Q
    metrics: dict  # srocc, plcc (held-out), counts, label


def split(count: int, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) prompt indices, a seeded permutation."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    held = max(2, round(holdout * count))
    return order[held:].sort().values, order[:held].sort().values


def fit_t2q(folder: Path, pooled: torch.Tensor, raw: torch.Tensor, labels: torch.Tensor,
            inputs: str, config, log=print) -> T2QResult:
    """Train (or reload) T2Q on ``pooled [N, C]`` → ``labels [N]``; ``config`` a TrainQLIPConfig.
    ``inputs``: the digest of what the raw scores were computed from (``labels.label_inputs``),
    which names them in the cache's fingerprint: the scores themselves may differ in their last
    bits from run to run."""
    t2q_config = {k: v for k, v in asdict(config.t2q).items() if k != "progress"}
    fingerprint = {"labels": config.labels.fingerprint(), "t2q": t2q_config,
                   "holdout": config.t2q_holdout,
                   "data": tensor_digest({"pooled": pooled}), "label_inputs": inputs}
    # complete only with every file: a folder of the records alone (metrics.json, the
    # fingerprint) copied from another machine is trained again, as one cut before its end
    complete = all((folder / name).is_file() for name in (MODEL_FILE, LABELS_FILE, METRICS_FILE))
    if claim(folder, fingerprint, config.redo_stale, "T2Q") and complete:
        log(f"T2Q: reusing {folder}")
        model = T2Q(pooled.shape[1], config.t2q.hidden)
        remedy = f"delete {folder} (T2Q is trained again)"
        model.load_state_dict(load_tensors(folder / MODEL_FILE, remedy)[0])
        metrics = read_json_dict(folder / METRICS_FILE, remedy)
        return T2QResult(model.eval().requires_grad_(False), metrics)
    train, held = split(len(labels), config.t2q_holdout, config.t2q.seed)
    log(f"T2Q: {len(train)} training prompts, {len(held)} held out, label {config.labels.label}")
    model = train_t2q(pooled[train], labels[train], replace(config.t2q, progress=config.progress))
    with torch.no_grad():
        predicted = model(pooled[held])
    metrics = {"label": config.labels.label, "srocc": srocc(predicted, labels[held]),
               "plcc": plcc(predicted, labels[held]), "train_prompts": len(train),
               "heldout_prompts": len(held)}
    save_tensors({"raw": raw, "labels": labels, "train": train, "heldout": held},
                folder / LABELS_FILE)
    save_tensors(model.state_dict(), folder / MODEL_FILE)
    write_atomic(folder / METRICS_FILE, json.dumps(metrics, indent=1))  # written last: complete
    return T2QResult(model, metrics)
