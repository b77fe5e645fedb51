"""Training QLIP on a quantized model, end to end (`qlip train-qlip`): T2Q data (FP generations
of N prompts) → labels → T2Q → FP trajectories → Q2B → ``qlip.json`` + ``qlip.safetensors``.

Every stage keeps its results in the work folder (default ``<quantized>/qlip_work``) with the
fingerprint of what made them, so a rerun resumes where it stopped (the FP runs per chunk of
prompts, Q2B per checkpoint) and reuses a stage only when its inputs match; a stage of other
inputs is refused with the differing fields named (``redo_stale`` recomputes it). The FP stages
(T2Q data, real features, trajectories) depend on the base model only, so trainings of several
bit sets on one quantized model share them.

>>> modules = train_qlip(TrainQLIPConfig("runs/qd-w4", q2b=Q2BConfig(bits=(8, 16, 32))))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..cli_args import output_folder
from ..files import FolderLock, copy_atomic, write_atomic
from ..methods.calib_data import CalibrationSet
from ..methods.qlip import Q2B, Q2BConfig, Q2BTrainConfig, QLIPModules, T2QConfig, save_qlip
from ..methods.qlip.train import train_q2b
from ..nn import QuantConfig, quant_units
from ..pipeline import load_pipeline, load_quantized
from ..pipeline.cache import ChunkStore, claim, digest, file_digest, tensor_digest
from ..pipeline.prompts import check_prompts, prompt_lengths, truncation_note
from ..pipeline.qlip_data import FPRunConfig, generate_t2q_data, prompt_sensitivity, trajectory_data
from ..pipeline.saving import CONFIG_FILE, STATE_FILE, fingerprint, read_config
from .labels import LabelConfig, label_inputs, normalized_labels, raw_scores
from .reach import reach
from .sources import MEASURED, LabelSource, complexity_source, folder_source, reference_source
from .t2q_stage import T2QResult, fit_t2q

REFERENCE = "reference"
# where `stop_after` may end the job: each FP stage in order (they need no quantized model, so they
# can run while the quantizer still calibrates, into the work folder a later job reuses)
STOP_POINTS = ("t2q_data", "t2q", "trajectories")


@dataclass
class TrainQLIPConfig:
    """Everything `qlip train-qlip` does; each field is one flag."""

    quantized: str = ""  # a folder made by `qlip quantize`
    model: str = REFERENCE  # the base model the folder was quantized from
    out: str | None = None  # where qlip.json goes (default: the quantized folder itself)
    work_dir: str | None = None  # the stages' caches (default: <quantized>/qlip_work)
    device: str = "cpu"
    prompts: str | None = None  # a file, one prompt a line; None: the reference world's own
    num_prompts: int = 10_000  # N, T2Q's FP generations (the paper's 10k)
    prompt_seed: int = 0  # which reference-world prompts
    # reference world: leave out every text of the held-out set (False only for demos: an
    # evaluation on held-out prompts would then score texts the policy was trained on)
    exclude_heldout: bool = True
    q2b_prompts: int = 128  # the first prompts, whose FP trajectories train Q2B
    sampling: FPRunConfig = field(default_factory=FPRunConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    real: str | None = None  # user models: a folder of real images (GIQA, realism)
    inception_weights: str | None = None  # user models: torch-fidelity Inception weights
    clip: str | None = None  # user models: a local CLIP folder (the image_text label)
    t2q: T2QConfig = field(default_factory=T2QConfig)
    t2q_holdout: float = 0.1  # share of the N prompts T2Q's SROCC/PLCC are measured on
    q2b: Q2BConfig = field(default_factory=Q2BConfig)
    q2b_train: Q2BTrainConfig = field(default_factory=Q2BTrainConfig)
    redo_stale: bool = False  # recompute a stage whose cache was made from other inputs
    truncate: bool = False  # cut prompts over the tokenizer's limit instead of refusing them
    stop_after: str | None = None  # one of STOP_POINTS: run the FP stages up to it, then stop
    progress: bool = True

    def __post_init__(self):
        if self.stop_after is not None and self.stop_after not in STOP_POINTS:
            raise ValueError(f"stop_after must be one of {STOP_POINTS}; got {self.stop_after!r}")
        if not self.quantized and self.stop_after is None:
            raise ValueError("TrainQLIPConfig.quantized: pass --quantized DIR (a `qlip quantize` "
                             "folder), or --stop-after STAGE to run the FP stages only")
        if not self.quantized and self.labels.label == "sensitivity":
            raise ValueError("the sensitivity label is measured on the quantized model: pass "
                             "--quantized DIR")
        if not self.quantized and self.work_dir is None:
            raise ValueError("without --quantized, pass --work-dir DIR for the stages' caches")
        if self.num_prompts < 2 or not 1 <= self.q2b_prompts <= self.num_prompts:
            raise ValueError(f"need num_prompts >= 2 and 1 <= q2b_prompts <= num_prompts; got "
                             f"{self.num_prompts}, {self.q2b_prompts}")
        if not 0 < self.t2q_holdout < 1 or round(self.t2q_holdout * self.num_prompts) < 2:
            raise ValueError(f"t2q_holdout must leave >= 2 held-out and >= 2 training prompts; "
                             f"got {self.t2q_holdout} of {self.num_prompts}")

    @property
    def work(self) -> Path:
        return Path(self.work_dir or Path(self.quantized) / "qlip_work")

    def to_dict(self) -> dict:
        return asdict(self) | {"q2b": self.q2b.to_dict()}


@dataclass
class ModelFacts:
    """What the quantized folder says about itself, read before any work."""

    meta: dict | None  # None: no quantized model (the FP stages only, `stop_after`)
    config: QuantConfig | None
    digest: str  # of the saved quantizer state: names the quantized model in fingerprints


def _same_model(given: str, recorded: str) -> bool:
    if given == recorded:
        return True
    return Path(given).expanduser().resolve() == Path(recorded).expanduser().resolve()


def check_inputs(config: TrainQLIPConfig, own_source: bool = False) -> ModelFacts:
    """Every check that needs no model loaded; raises with what to do. ``own_source``: the
    caller measures the labels itself (no --real/--clip needed)."""
    if not config.quantized:  # the FP stages only
        _check_prompts(config, own_source)
        return ModelFacts(None, None, "")
    folder = Path(config.quantized)
    if not folder.is_dir():
        raise FileNotFoundError(f"--quantized {folder}: no such folder; make one with `qlip "
                                "quantize --abits-options ... --out DIR`")
    meta = read_config(folder)  # refuses a folder that is not a quantized model
    quant = QuantConfig.from_dict(meta["quant_config"])
    bank, bits = quant.abits_options, config.q2b.bits
    missing = sorted(set(bits) - set(bank))
    if missing:
        raise ValueError(f"--bits {','.join(map(str, bits))}: {missing} not in the activation bank "
                         f"of {folder} {list(bank)}; choose --bits among them or quantize again "
                         f"with --abits-options {','.join(map(str, sorted(set(bank) | set(bits))))}")
    if meta.get("base_model") and not _same_model(config.model, meta["base_model"]):
        raise ValueError(f"{folder} was quantized from {meta['base_model']!r}, not "
                         f"{config.model!r}: pass --model {meta['base_model']}")
    if quant.act_steps is not None and config.sampling.steps > quant.act_steps:
        raise ValueError(f"{folder} has per-step activation tables of {quant.act_steps} steps; "
                         f"--steps {config.sampling.steps} is more")
    _check_prompts(config, own_source)
    _check_out(config, folder)
    return ModelFacts(meta, quant, file_digest(folder / STATE_FILE))


def _check_prompts(config: TrainQLIPConfig, own_source: bool) -> None:
    world = config.model == REFERENCE
    if config.prompts is None and not world:
        raise ValueError("--prompts FILE is needed for a model other than the reference model")
    if config.prompts is not None and not Path(config.prompts).is_file():
        raise FileNotFoundError(f"--prompts {config.prompts}: no such file")
    if not (world or own_source or _timestep_only(config)):
        _check_label_inputs(config)


def _timestep_only(config: TrainQLIPConfig) -> bool:
    """A timestep-only Q2B (``--ignore-prompt``) with no FP stage asked for: neither T2Q data,
    labels nor T2Q are needed, only the trajectories."""
    return config.q2b.ignore_prompt and config.stop_after in (None, "trajectories")


def _check_label_inputs(config: TrainQLIPConfig) -> None:
    """A user's model: what the label is measured with must be given."""
    if config.labels.needs_real and not (config.real and Path(config.real).is_dir()):
        raise FileNotFoundError(f"the {config.labels.label} label needs --real DIR (a folder of "
                                f"real images) on a model other than the reference model")
    if config.labels.label == "image_text" and not config.clip:
        raise ValueError("the image_text label needs --clip DIR (a local CLIP model folder) on a "
                         "model other than the reference model")


def _check_out(config: TrainQLIPConfig, folder: Path) -> None:
    out = Path(config.out) if config.out else folder
    theirs = out / CONFIG_FILE
    if out.resolve() != folder.resolve() and theirs.is_file():
        if file_digest(theirs) != file_digest(folder / CONFIG_FILE) or \
                file_digest(out / STATE_FILE) != file_digest(folder / STATE_FILE):
            raise ValueError(f"--out {out} holds another quantized model; choose an empty folder")


def training_prompts(config: TrainQLIPConfig) -> tuple[list[str], list | None]:
    """The N training prompts (texts) and, on the reference world, their world prompts."""
    if config.prompts is not None:
        from ..cli_args import read_prompt_file

        texts = read_prompt_file(config.prompts)
        if len(texts) < config.num_prompts:
            raise ValueError(f"--prompts {config.prompts} holds {len(texts)} prompts; "
                             f"--num-prompts {config.num_prompts} needs that many")
        return texts[: config.num_prompts], None
    from ..world.domain import heldout_free_prompts
    from ..world.domain import training_prompts as world_training_prompts

    pick = heldout_free_prompts if config.exclude_heldout else world_training_prompts
    world = pick(config.num_prompts, config.prompt_seed)
    return [p.text for p in world], world


def _image_size(pipe) -> int:
    return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))


def label_source(config: TrainQLIPConfig, pipe, world_prompts: list | None) -> LabelSource | None:
    """The reference world's evaluator and renders; a user's real folder and networks; or, for
    the sensitivity label on a user's model, nothing (no image is generated for T2Q)."""
    size = _image_size(pipe)
    if world_prompts is not None and config.model == REFERENCE and config.real is None:
        return reference_source(world_prompts, size, config.device)
    if config.labels.label in ("sensitivity", "length") and config.real is None:
        return None  # no FP image is measured
    if config.labels.label == "complexity" and config.real is None:
        return complexity_source()
    return folder_source(config.real, config.inception_weights, config.clip, size, config.device)


class _Stages:
    """The job's state between stages; one method per stage."""

    def __init__(self, config: TrainQLIPConfig, facts: ModelFacts, base_fingerprint: str,
                 log: Callable[[str], None]):
        self.config, self.facts, self.log = config, facts, log
        self.sampling = replace(config.sampling, progress=config.progress)
        self.base = {"model": config.model, "base": base_fingerprint}
        self.times: dict[str, float] = {}

    def timed(self, name: str, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        self.times[name] = round(time.perf_counter() - start, 1)
        self.config.work.mkdir(parents=True, exist_ok=True)
        write_atomic(self.config.work / "status.json", json.dumps(self.times, indent=1))
        return result

    def t2q_data(self, pipe, texts, source: LabelSource | None) -> dict[str, torch.Tensor]:
        what = "FP generations" if source else "text embeddings"
        self.log(f"T2Q data: {what} of {len(texts)} prompts -> {self.config.work}/t2q_data")
        measure = source.measure if source else None
        measured = {"measure": getattr(source, "name", ""),
                    "measured": ",".join(MEASURED) if source else ""}
        return generate_t2q_data(pipe, texts, measure, self.config.work / "t2q_data",
                                 self.sampling, self.base | measured, self.config.redo_stale)

    def real_features(self, source: LabelSource) -> torch.Tensor:
        self.log(f"real features: {len(source.real_keys)} real images ({source.name})")
        store = ChunkStore(self.config.work / "real_features", {"source": source.name},
                           self.sampling.chunk, self.config.redo_stale, "real-feature set")
        return store.run(source.real_keys, lambda a, b: {"features": source.real_chunk(a, b)},
                         "real features", self.config.progress)["features"]

    def sensitivity(self, pipe, texts) -> torch.Tensor:
        low = self.config.q2b.bits[0]
        self.log(f"sensitivity: every prompt's FP trajectory at A{low} vs FP")
        return prompt_sensitivity(pipe, texts, low, self.config.work / f"sensitivity_A{low}",
                                  self.sampling, self.base | {"quantized": self.facts.digest},
                                  self.config.redo_stale)

    def trajectories(self, pipe, texts):
        count = self.config.q2b_prompts
        self.log(f"trajectories: FP trajectories of the first {count} prompts")
        return trajectory_data(pipe, texts[:count], self.config.work / "trajectories",
                               self.sampling, self.base, self.config.redo_stale)


def _raw_scores(stages: _Stages, pipe, texts, data, source) -> tuple[torch.Tensor, str]:
    """The label's raw scores, and the digest of what they were computed from."""
    labels = stages.config.labels
    real = stages.timed("real features", stages.real_features, source) if labels.needs_real else None
    sens = stages.timed("sensitivity", stages.sensitivity, pipe, texts) \
        if labels.label == "sensitivity" else None
    lengths = prompt_lengths(pipe, texts) if labels.label == "length" else None
    inputs = tensor_digest(label_inputs(labels, data, real, sens, lengths))
    return torch.from_numpy(raw_scores(labels, data, real, sens, lengths)), inputs


@dataclass
class Q2BInputs:
    """What Q2B trains on, from the stages before it (:func:`prepare_q2b`)."""

    pipe: object  # the pipeline, the quantized model loaded into its UNet
    t2q: T2QResult | None  # None: the timestep-only Q2B (--ignore-prompt), no T2Q
    texts: list[str]  # the N training prompts
    world: list | None  # their world prompts (reference world) or None
    pooled: torch.Tensor | None  # [N, C] the prompts' pooled text embeddings (None: no T2Q)
    rows: CalibrationSet  # FP trajectories of the first q2b_prompts prompts
    prompt_of_row: torch.Tensor  # [rows] each row's prompt index
    quality: torch.Tensor  # [rows] T2Q's q of each row's prompt (0.5 for the timestep-only)
    stages: _Stages

    @property
    def rows_digest(self) -> str:
        """Names the rows in fingerprints: the sampling, the base model, the prompts."""
        count = self.stages.config.q2b_prompts
        return digest([self.stages.sampling.fingerprint(), self.stages.base, self.texts[:count]])


def _fit_q2b(inputs: Q2BInputs) -> tuple[Q2B, list]:
    stages, pipe = inputs.stages, inputs.pipe
    config = stages.config
    units = quant_units(pipe.unet)
    dynamic = [n for n, u in units.items() if u.dynamic]
    q2b = Q2B(len(dynamic), config.sampling.steps, config.q2b).to(pipe.unet.device)
    train = replace(config.q2b_train, progress=config.progress)
    # fields added later leave the fingerprint at their old value, so earlier caches stay valid
    q2b_fields = config.q2b.to_dict()
    if not q2b_fields["ignore_prompt"]:
        del q2b_fields["ignore_prompt"]
    train_fields = _without(asdict(train), "iters")
    if train.optimizer == "adam":
        del train_fields["optimizer"]
    fingerprint = {"q2b": q2b_fields, "train": train_fields, "quantized": stages.facts.digest,
                   "t2q": "none" if inputs.t2q is None
                   else tensor_digest(inputs.t2q.model.state_dict()),
                   "rows": inputs.rows_digest}
    label = "noprompt" if inputs.t2q is None else config.labels.label
    folder = config.work / f"q2b_A{'-'.join(map(str, config.q2b.bits))}_{label}"
    claim(folder, fingerprint, config.redo_stale, "Q2B checkpoint")
    stages.log(f"Q2B: {train.iters} iterations on {len(inputs.rows)} rows of "
               f"{config.q2b_prompts} prompts, {len(dynamic)} dynamic units -> {folder}")
    history = stages.timed("q2b", train_q2b, pipe.unet, q2b, units, inputs.rows, inputs.quality,
                           train, folder)
    return q2b.cpu(), history


def _without(values: dict, *keys: str) -> dict:
    return {k: v for k, v in values.items() if k not in keys and k != "progress"}


def _metrics(config: TrainQLIPConfig, fitted: T2QResult | None, history: list, texts, world,
             times: dict) -> dict:
    tail = history[-max(1, len(history) // 10):]
    q2b = {"iters": len(history), **{k: sum(h[k] for h in tail) / len(tail)
                                     for k in ("loss", "mse", "fab")}}
    kept = "excluded" if config.exclude_heldout else "kept"
    world_source = f"reference world, held-out texts {kept}, seed {config.prompt_seed}"
    prompts = {"source": config.prompts or world_source, "count": len(texts)}
    if world is not None:
        levels = [p.richness for p in world]
        prompts["richness"] = {str(r): levels.count(r) for r in sorted(set(levels))}
    return {"t2q": None if fitted is None else fitted.metrics, "q2b": q2b, "prompts": prompts,
            "seconds": times, "job": config.to_dict()}


def _write(modules: QLIPModules, config: TrainQLIPConfig) -> Path:
    folder = Path(config.quantized)
    out = Path(config.out) if config.out else folder
    if out.resolve() != folder.resolve():  # a copy of the model, so that --quantized OUT works
        out.mkdir(parents=True, exist_ok=True)
        for name in (CONFIG_FILE, STATE_FILE):  # each whole or absent: a kill leaves no torn copy
            copy_atomic(folder / name, out / name)
    return save_qlip(modules, out)


def train_qlip(config: TrainQLIPConfig, log: Callable[[str], None] = print,
               source: LabelSource | None = None) -> QLIPModules | None:
    """Run (or resume) every stage and save T2Q and Q2B into ``config.out`` (default: the
    quantized folder), with T2Q's held-out SROCC/PLCC and the training record in qlip.json.
    ``source`` replaces what measures the labels (default: :func:`label_source`). With
    ``config.stop_after`` it runs the FP stages up to that one and returns None: their caches in
    the work folder are then reused by a full job on any quantized model of the same base."""
    facts = check_inputs(config, own_source=source is not None)
    texts, world = training_prompts(config)
    with FolderLock(output_folder(str(config.work), "--work-dir"), "qlip train-qlip"):
        inputs = _prepare(config, facts, texts, world, log, source)
        return None if inputs is None else _finish(inputs)


def prepare_q2b(config: TrainQLIPConfig, log: Callable[[str], None] = print,
                source: LabelSource | None = None) -> Q2BInputs:
    """The stages before Q2B's training (T2Q data, labels, T2Q, trajectories), run or reused
    from the work folder as :func:`train_qlip` runs them: what a study of Q2B's own settings
    trains on (``benchmarks/q2b_sweep.py``). Needs ``config.quantized``.

    >>> inputs = prepare_q2b(TrainQLIPConfig("runs/qd-w4", q2b_prompts=64))  # doctest: +SKIP
    >>> inputs.rows, inputs.quality  # Q2B's training rows and each row's T2Q q  # doctest: +SKIP
    """
    if not config.quantized or config.stop_after is not None:
        raise ValueError("prepare_q2b needs a quantized model (--quantized) and no stop_after")
    facts = check_inputs(config, own_source=source is not None)
    texts, world = training_prompts(config)
    with FolderLock(output_folder(str(config.work), "--work-dir"), "qlip train-qlip"):
        return _prepare(config, facts, texts, world, log, source)


def _prepare(config: TrainQLIPConfig, facts: ModelFacts, texts: list[str], world: list | None,
             log: Callable[[str], None], source: LabelSource | None) -> Q2BInputs | None:
    """The stages before Q2B, in the work folder (held); None where ``stop_after`` ends them.
    A timestep-only Q2B (``--ignore-prompt``) skips T2Q's stages: its every row's q is 0.5."""
    pipe = load_pipeline(config.model, config.device)
    over = check_prompts(pipe, texts, config.truncate)
    if over:
        log(truncation_note(over, len(texts), pipe.tokenizer.model_max_length))
    if facts.meta is None:
        base_fingerprint = fingerprint(pipe.unet)
    else:
        base_fingerprint = facts.meta["base_fingerprint"]
        load_quantized(pipe.unet, config.quantized)
    stages = _Stages(config, facts, base_fingerprint, log)

    def done(stage: str) -> bool:
        if config.stop_after != stage:
            return False
        log(f"stopped after {stage} (--stop-after); the caches are in {config.work}")
        return True

    fitted = pooled = None
    if not _timestep_only(config):
        source = source or label_source(config, pipe, world)
        data = stages.timed("t2q data", stages.t2q_data, pipe, texts, source)
        if done("t2q_data"):
            return None
        raw, inputs = _raw_scores(stages, pipe, texts, data, source)
        fitted = stages.timed("t2q", fit_t2q, config.work / f"t2q_{config.labels.label}",
                              data["pooled"], raw, normalized_labels(raw.numpy()), inputs,
                              config, log)
        if done("t2q"):
            return None
        pooled = data["pooled"]
    rows, prompt_of_row = stages.timed("trajectories", stages.trajectories, pipe, texts)
    if done("trajectories"):
        return None
    with torch.no_grad():
        quality = (torch.full((len(rows),), 0.5) if fitted is None
                   else fitted.model(pooled[: config.q2b_prompts])[prompt_of_row])
    return Q2BInputs(pipe, fitted, texts, world, pooled, rows, prompt_of_row, quality, stages)


def _finish(inputs: Q2BInputs) -> QLIPModules:
    """Train Q2B and save QLIP's modules and metrics."""
    config, fitted = inputs.stages.config, inputs.t2q
    q2b, history = _fit_q2b(inputs)
    units = quant_units(inputs.pipe.unet)
    names = [n for n, u in units.items() if u.dynamic]
    metrics = _metrics(config, fitted, history, inputs.texts, inputs.world, inputs.stages.times)
    metrics["q2b"] |= reach(q2b, units, names)  # how far the prompt can move the bits
    modules = QLIPModules(None if fitted is None else fitted.model,
                          q2b.eval().requires_grad_(False), names, metrics)
    path = _write(modules, config)
    at = metrics["q2b"]["fab_at_quality"]
    bits = (f"Q2B mean bits {metrics['q2b']['fab']:.2f} (last tenth of training); FAB at "
            f"predicted quality 0 / 1: {at['0']:.3f} / {at['1']:.3f}")
    if fitted is None:
        inputs.stages.log(f"timestep-only Q2B (no T2Q, the prompt ignored): {bits}; saved to "
                          f"{path}")
    else:
        inputs.stages.log(f"T2Q held-out SROCC {fitted.metrics['srocc']:.3f}, PLCC "
                          f"{fitted.metrics['plcc']:.3f}; {bits}; saved to {path}")
    return modules
