"""Training engine, in the shape of torchvision's classification references.

``train(cfg)`` is ``main(args)``: it reads the data, decodes every image once into an in-memory
uint8 cache (also kept on disk, so the next run starts at once), builds the model from the
registry and runs `train_one_epoch` / `predict_probs` per epoch. After each epoch it writes the
resumable state (``last.safetensors``), the history (CSV + JSON + curve PNG) and, when validation
ROC-AUC improved, the model checkpoint. At the end the best model's temperature (calibration) and
then its operating threshold are fitted on the validation set and stored in ``model.json``.

Each epoch's randomness (sampling order, augmentation, dropout) is seeded from ``(seed, epoch)``,
so a run resumed after a crash replays exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from . import CLASS_NAMES, __version__, distributed
from .adversary import OriginAdversary, build_adversary, pooled_features
from .cache import readable_images
from .calibration import calibrate_model, covid_probability
from .checkpoint import default_model_path, load_model, load_state, read_state_header, save_model, save_state
from .config import TrainConfig
from .data import Sample, data_fingerprint, load_samples, make_splits, write_splits
from .errors import CheckpointError, DataError
from .familiarity import FILE as FAMILIARITY_FILE, WARN_ABOVE, Familiarity
from .findings import FindingTask, build_finding_task, finding_sources, finding_targets
from .inference import autocast, logits_and_features, predict_probs
from .invariance import mixed_styles, twin_loss
from .models import build_model, get_spec
from .optim import ema_update, make_optimizer
from .presets import AUGMENTS, Preprocess
from .report import save_predictions_csv, write_history
from .segment import LungSegmenter

__all__ = ["train", "train_one_epoch"]

log = logging.getLogger(__name__)


FAMILIARITY_SAMPLE = 3000  # training films whose features define "familiar" (a sample: the statistics settle well before)


def _set_train_mode(model: nn.Module, frozen: Sequence[str]) -> None:
    model.train()
    for name in frozen:  # frozen layers keep their pretrained BatchNorm statistics
        distributed.unwrap(model).get_submodule(name).eval()


def train_one_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, images: torch.Tensor, labels: torch.Tensor,
    cfg: TrainConfig, pre: Preprocess, epoch: int, frozen: Sequence[str], device: torch.device, ema: nn.Module | None = None,
    dist: distributed.DistEnv = distributed.DistEnv(), sources: torch.Tensor | None = None,
    adversary: OriginAdversary | None = None, findings: FindingTask | None = None, targets: torch.Tensor | None = None,
) -> dict[str, float]:
    """One pass over the training images (updating ``ema`` after each step); returns mean loss, accuracy, img/s, seconds.

    With ``cfg.balanced`` both classes are drawn equally often; with ``cfg.balance_sources`` also every source
    (``sources``: an index per image) equally often within its class. An ``adversary`` adds its loss on the batch's
    sources (`covidxray.adversary`) and its epoch numbers to the result; so does a ``findings`` task
    (`covidxray.findings`) on the films whose ``targets`` are 0 or 1, which leave the COVID-19 loss, the training
    accuracy and the class balance (they are drawn as a third class). ``images`` ``(N, views, S, S)``: one view
    of each film is drawn per step. Under DDP (``dist.enabled``) every rank draws the same epoch order and trains on
    its slice ``batch[rank::world_size]`` of each global batch of ``cfg.batch_size`` images, so the steps, the class
    balance and the learning-rate schedule are those of a single process; the returned numbers are summed over ranks.
    """
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout and other global-RNG users
    n = len(labels)
    if cfg.balanced:
        drawn = labels if targets is None else torch.where(targets >= 0, 2, labels)
        order = torch.multinomial(_sampling_weights(drawn, sources if cfg.balance_sources else None), n, replacement=True,
                                  generator=g)
    else:
        order = torch.randperm(n, generator=g)
    if dist.enabled:
        order = distributed.pad_order(order, dist.world_size)
        # Same order on every rank, but each rank's augmentation and dropout noise is its own.
        rank_seed = distributed.rank_seed(cfg.seed * 100_003 + epoch, dist.rank)
        g = torch.Generator().manual_seed(rank_seed)
        torch.manual_seed(rank_seed)
    augment = AUGMENTS.get(cfg.augment)
    _set_train_mode(model, frozen)
    steps = math.ceil(len(order) / cfg.batch_size)
    loss_sum, correct, counted, seen, t0 = 0.0, 0, 0, 0, time.perf_counter()
    bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False, disable=not dist.is_main)
    for step in bar:
        idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size][dist.rank::dist.world_size]
        x = images[idx] if images.ndim == 3 else images[idx, torch.randint(images.shape[1], (len(idx),), generator=g)]
        x = x.unsqueeze(1).float() / 255.0
        if augment is not None:
            x = augment(x, g, labels[idx])
        x = ((x - pre.mean) / pre.std).to(device).contiguous(memory_format=torch.channels_last)
        y = labels[idx].to(device)
        covid = torch.ones_like(y, dtype=torch.bool) if targets is None else (targets[idx] < 0).to(device)
        kept = int(covid.sum())  # the films of the COVID-19 question
        with autocast(device), adversary.watch(model) if adversary is not None else nullcontext(), \
                pooled_features(model, get_spec(cfg.arch).head, "the finding task") if findings else nullcontext() as feats, \
                mixed_styles(distributed.unwrap(model), get_spec(cfg.arch).style, cfg.mixstyle):
            logits = model(x)
        ce = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing, reduction="none")
        loss = (ce * covid).sum() / max(kept, 1)
        adv = adversary.loss(y, sources[idx].to(device), (epoch + step / steps) / cfg.epochs) if adversary is not None else 0
        twin = twin_loss(model, x, logits, pre, g, cfg.consistency) if cfg.consistency else 0  # `covidxray.invariance`
        find = findings.loss(feats[-1], targets[idx].to(device)) if findings is not None else 0
        optimizer.zero_grad(set_to_none=True)
        (loss + adv + twin + find).backward()  # train_loss stays the classification loss alone
        optimizer.step()
        if ema is not None:
            ema.update_parameters(distributed.unwrap(model))
        if cfg.scheduler == "cosine":
            scheduler.step()
        loss_sum += loss.item() * kept
        correct += ((logits.argmax(1) == y) & covid).sum().item()
        counted, seen = counted + kept, seen + len(idx)
        bar.set_postfix(loss=f"{loss_sum / max(counted, 1):.4f}", img_s=f"{seen / (time.perf_counter() - t0):.1f}")
    if cfg.scheduler == "step":
        scheduler.step()
    secs = time.perf_counter() - t0
    if dist.enabled:
        loss_sum, correct, counted, seen = distributed.all_reduce_sum([loss_sum, correct, counted, seen])
    return {"train_loss": loss_sum / max(counted, 1), "train_acc": correct / max(counted, 1), "img_per_s": seen / secs,
            "train_seconds": secs, **(adversary.epoch_stats() if adversary is not None else {}),
            **(findings.epoch_stats() if findings is not None else {})}


def _sampling_weights(labels: torch.Tensor, sources: torch.Tensor | None) -> torch.Tensor:
    """Per-image weights giving each class half the draws and, with ``sources``, each source of a class an equal share."""
    cell = labels * (int(sources.max()) + 1 if sources is not None else 1) + (sources if sources is not None else 0)
    per_cell = torch.bincount(cell).float()
    cells_of_class = torch.bincount(torch.unique(cell) // (int(sources.max()) + 1 if sources is not None else 1), minlength=2)
    return 1.0 / (per_cell[cell] * cells_of_class[labels].float())


def _split(samples: list[Sample], name: str, limit: int | None, seed: int) -> list[Sample]:
    part = [s for s in samples if s.split == name]
    if limit and len(part) > limit:
        rng = np.random.default_rng(seed)
        part = [part[i] for i in sorted(rng.choice(len(part), limit, replace=False))]
    return part


def _model_meta(cfg: TrainConfig, pre: Preprocess, fingerprint: str, epoch: int, val_auc: float) -> dict[str, Any]:
    return {
        "arch": cfg.arch, "in_chans": 1, "num_classes": 2, "class_names": list(CLASS_NAMES), "positive_class": "covid",
        "preprocess": pre.to_dict(), "threshold": 0.5, "threshold_rule": "not chosen yet", "temperature": 1.0,
        "epoch": epoch, "val_auc": val_auc, "data_fingerprint": fingerprint, "train_config": asdict(cfg),
        "covidxray_version": __version__,
    }


def _segmenter(cfg: TrainConfig) -> LungSegmenter | None:
    """The lung segmenter (and input gate) for this run: ``cfg.segmenter``, the bundled one, or None."""
    if cfg.segmenter == "none":
        found = None
    elif cfg.segmenter == "bundled":
        found = default_model_path() / "segmenter.json"
        found = found if found.is_file() else None
    else:
        found = Path(cfg.segmenter)
    if found is None and cfg.lung_crop:
        raise DataError("cropping to the lungs needs a lung segmenter: pass --segmenter DIR (a folder with segmenter.json)")
    return LungSegmenter(found) if found is not None else None


def _resumed_config(cfg: TrainConfig, run: Path) -> TrainConfig:
    """The configuration a run was started with (from its resumable state), with ``cfg.epochs`` if larger."""
    state_path = run / "last.safetensors"
    if not state_path.is_file():
        raise DataError(f"{run}: nothing to resume (no last.safetensors); start the run without --resume")
    try:
        saved = TrainConfig(**read_state_header(state_path)["config"])
    except (KeyError, TypeError) as e:  # no config, or one from another covidxray version
        raise CheckpointError(f"{state_path}: its training config does not fit this covidxray ({e})") from e
    return replace(saved, out=str(run), epochs=max(cfg.epochs, saved.epochs) if cfg.epochs else saved.epochs)


def _preprocess(cfg: TrainConfig, run: Path, dist: distributed.DistEnv) -> Preprocess:
    """The run's `Preprocess`; the run gets a copy of its segmenter and input gate, which the lung crop uses."""
    spec = get_spec(cfg.arch)
    pre = Preprocess(size=cfg.size, equalize=cfg.equalize, mean=spec.mean, std=spec.std, mask_border=cfg.mask_border,
                     lung_crop=cfg.lung_crop, lung_margin=cfg.lung_margin, outside=cfg.outside, smooth=cfg.smooth,
                     equalize_lungs=cfg.equalize_lungs)
    segmenter = _segmenter(cfg)
    if segmenter is not None:
        if dist.is_main:
            segmenter.copy_to(run)  # the run carries its segmenter and input gate
        if cfg.lung_crop:
            pre = replace(pre, segmenter_sha256=segmenter.sha256, segmenter=segmenter)
    return pre


@dataclass
class _Data:
    """Decoded training and validation images with their labels and samples."""

    xtr: torch.Tensor
    ytr: torch.Tensor
    train_samples: list[Sample]
    xva: torch.Tensor
    yva: torch.Tensor
    val_samples: list[Sample]
    findings: torch.Tensor | None = None  # per training film, with --finding-task: `covidxray.findings.finding_targets`

    @property
    def source_index(self) -> torch.Tensor:
        names = sorted({s.source for s in self.train_samples})
        return torch.tensor([names.index(s.source) for s in self.train_samples])


def _load_data(cfg: TrainConfig, run: Path, pre: Preprocess) -> _Data:
    """Read the data (making a patient-grouped split when it has none) and decode train and validation once."""
    samples = load_samples(cfg.data, cfg.splits)
    if not any(s.split for s in samples):
        samples = make_splits(samples, seed=cfg.seed)
        write_splits(run / "splits.csv", samples)
        log.info("the data has no split: made a patient-grouped one and wrote %s", run / "splits.csv")
    task = finding_sources([s for s in samples if s.split == "train"]) if cfg.finding_task else set()
    if cfg.finding_task and not task:
        raise DataError(f"{cfg.data}: --finding-task needs training films of a source that gives both normal films and "
                        "films labelled 'other' (another finding); there are none")
    parts = []
    for name in ("train", "val"):
        part = _split(samples, name, cfg.limit, cfg.seed)
        part = part if name == "train" else [s for s in part if s.source not in task]  # the COVID-19 question's alone
        if not part or len({s.label for s in part}) < 2:
            raise DataError(f"{cfg.data}: the {name} split needs images of both classes (found {len(part)} images)")
        with distributed.main_first():  # rank 0 decodes and fills the cache; the other ranks then read it
            kept, images, _ = readable_images(part, pre, cfg.cache_dir, f"decoding {name}", *(
                (cfg.box_views, cfg.box_shift) if name == "train" else ()))
        parts += [images, torch.tensor([s.label for s in kept]), kept]
    return _Data(*parts, findings=finding_targets(parts[2], task) if task else None)


def _build(cfg: TrainConfig, resume: bool, device: torch.device, data: _Data):
    """Model (frozen layers marked), origin adversary and finding task (or None), optimiser, scheduler, and the weight
    average saved."""
    model = build_model(cfg.arch, in_chans=1, num_classes=2, weights=None if resume else cfg.weights)
    frozen = get_spec(cfg.arch).freezable if cfg.freeze else ()
    for name in frozen:
        model.get_submodule(name).requires_grad_(False)
    model = model.to(device).to(memory_format=torch.channels_last)
    adversary = build_adversary(model, cfg.arch, data.ytr, data.source_index, cfg.origin_adversary, cfg.seed, device)
    findings = build_finding_task(model, cfg.arch, data.findings, cfg.finding_task, cfg.seed, device)
    extra = nn.ModuleList([m for m in (adversary, findings) if m is not None]) or None  # training-only heads
    optimizer, scheduler = make_optimizer(model, cfg, math.ceil(len(data.ytr) / cfg.batch_size), extra)
    # The weights' moving average is validated and shipped: on small, noisy data it is steadier from epoch to epoch.
    ema = AveragedModel(model, multi_avg_fn=ema_update(cfg.ema), use_buffers=True) if cfg.ema else None
    return model, frozen, adversary, findings, optimizer, scheduler, ema


def _validate(scored: nn.Module, data: _Data, pre: Preprocess, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    t0 = time.perf_counter()
    p = predict_probs(scored, data.xva, pre, cfg.eval_batch_size, device=device)
    y = data.yva.numpy()
    val_loss = float(F.nll_loss(torch.log(torch.from_numpy(np.stack([1 - p, p], 1)).clamp(min=1e-7)), data.yva))
    return {"val_loss": val_loss, "val_auc": float(roc_auc_score(y, p)), "val_acc": float(((p >= 0.5) == y).mean()),
            "val_seconds": time.perf_counter() - t0}


def _finish(run: Path, cfg: TrainConfig, pre: Preprocess, data: _Data, device: torch.device, t_start: float,
            best_auc: float, best_epoch: int) -> None:
    """Temperature, then operating threshold on the calibrated probabilities (both fitted on validation
    predictions of the best model, never on test data), and the familiarity statistics."""
    best, meta = load_model(run)
    best = best.to(device)
    logits, val_feats = logits_and_features(best, cfg.arch, data.xva, pre, cfg.eval_batch_size, device)
    cal, logits = calibrate_model(best, cfg.arch, data.yva.numpy(), logits, lambda: logits_and_features(
        best, cfg.arch, data.xva, pre, cfg.eval_batch_size, device)[0], cfg.logit_shift,
        target_sensitivity=cfg.target_sensitivity, sources=[s.source for s in data.val_samples])
    p = covid_probability(logits, cal.temperature)
    # Unfamiliarity: the training films' feature distribution, scaled by the validation films' distances.
    sample = torch.from_numpy(np.random.default_rng(cfg.seed).permutation(len(data.xtr))[:FAMILIARITY_SAMPLE])
    own = data.xtr if data.xtr.ndim == 3 else data.xtr[:, 0]  # with --box-views: the view serving prepares
    _, train_feats = logits_and_features(best, cfg.arch, own[sample], pre, cfg.eval_batch_size, device)
    familiarity = Familiarity.fit(train_feats, val_feats)
    meta.update(cal.to_meta(), train_seconds=time.perf_counter() - t_start,
                familiarity={"file": FAMILIARITY_FILE, "sha256": familiarity.save(run), "warn_above": WARN_ABOVE,
                             "train_images": len(sample), "val_images": len(val_feats)})
    for k in ("format", "weights_file", "weights_sha256"):
        meta.pop(k)
    save_model(run, best, meta)
    save_predictions_csv(run / "val_predictions.csv", [s.key for s in data.val_samples], data.yva.numpy(), p,
                         meta["threshold"], sources=[s.source for s in data.val_samples])
    log.info("best validation AUC %.4f at epoch %d; temperature %.3f (validation ECE %.4f -> %.4f); threshold %.4f (%s); "
             "run in %s", best_auc, best_epoch + 1, cal.temperature, cal.ece_before, cal.ece_after, meta["threshold"],
             cal.threshold_rule, run)


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train (or with ``resume`` continue) the run in ``cfg.out``; returns the run directory.

    Raises:
        DataError: when the data has no training or validation images.
    """
    run = Path(cfg.out)
    state_path = run / "last.safetensors"
    cfg = _resumed_config(cfg, run) if resume else cfg
    run.mkdir(parents=True, exist_ok=True)
    distributed.seed_everything(cfg.seed, cfg.deterministic)
    dist, device = distributed.setup(cfg.device)  # rank 0 of 1 on default_device(cfg.device) unless started by torchrun
    if cfg.batch_size % dist.world_size:
        raise DataError(f"the batch size ({cfg.batch_size}) is the global batch and must split evenly over "
                        f"{dist.world_size} processes; use a multiple of {dist.world_size} or another process count")
    pre = _preprocess(cfg, run, dist)
    data = _load_data(cfg, run, pre)
    log.info("training %s on %d images (%d COVID-19), validating on %d (%d COVID-19)",
             cfg.arch, len(data.ytr), int(data.ytr.sum()), len(data.yva), int(data.yva.sum()))
    if dist.enabled:
        log.info("DDP on %d processes (%s): %d images per process per step; rank 0 validates and writes",
                 dist.world_size, device.type, cfg.batch_size // dist.world_size)
    model, frozen, adversary, findings, optimizer, scheduler, ema = _build(cfg, resume, device, data)
    scored = ema.module if ema is not None else model
    # the adversary and the finding task are training state only: resumed with the rest, never in the saved classifier
    modules = {k: m for k, m in {"model": model, "ema": ema, "adversary": adversary, "findings": findings}.items()
               if m is not None}
    fingerprint = data_fingerprint(cfg.data, cfg.splits)
    history: list[dict[str, Any]] = []
    best_auc, best_epoch, start = -1.0, -1, 0
    if resume:
        header = load_state(state_path, modules, optimizer)
        scheduler.load_state_dict(header["scheduler"])
        history, best_auc, best_epoch, start = header["history"], header["best_auc"], header["best_epoch"], header["epoch"] + 1
        log.info("resuming %s after epoch %d (best validation AUC %.4f at epoch %d)", run, start, best_auc, best_epoch + 1)
    # Only the module that trains is wrapped (DDP, torch.compile): `model` is what gets saved, so
    # state dicts carry no `module.` prefix and a run resumes under any number of processes.
    trained = distributed.wrap(model, dist, device, cfg.compile)
    t_start = time.perf_counter() - sum(h["train_seconds"] + h["val_seconds"] for h in history)
    for epoch in range(start, cfg.epochs):
        if cfg.patience and best_epoch >= 0 and epoch - best_epoch > cfg.patience:
            log.info("early stop: no better validation AUC for %d epochs", cfg.patience)
            break
        stats = train_one_epoch(trained, optimizer, scheduler, data.xtr, data.ytr, cfg, pre, epoch, frozen, device, ema,
                                dist=dist, sources=data.source_index, adversary=adversary, findings=findings,
                                targets=data.findings)
        # rank 0 validates; its numbers decide best epoch and early stop on every rank
        row = {"epoch": epoch + 1, **stats, **_validate(scored, data, pre, cfg, device),
               "lr": optimizer.param_groups[0]["lr"]} if dist.is_main else None
        row = distributed.broadcast_object(row)
        history.append(row)
        log.info("epoch %d/%d  loss %.4f  val loss %.4f  val AUC %.4f  %.1f img/s", epoch + 1, cfg.epochs,
                 stats["train_loss"], row["val_loss"], row["val_auc"], stats["img_per_s"])
        if row["val_auc"] > best_auc:
            best_auc, best_epoch = row["val_auc"], epoch
            if dist.is_main:
                save_model(run, scored, _model_meta(cfg, pre, fingerprint, epoch + 1, best_auc))
        if dist.is_main:  # one writer: the other ranks keep the same history and best epoch in memory only
            save_state(state_path, modules, optimizer, {
                "config": asdict(cfg), "epoch": epoch, "scheduler": scheduler.state_dict(), "history": history,
                "best_auc": best_auc, "best_epoch": best_epoch,
            })
            write_history(run, history)
    if dist.is_main:  # what follows is rank 0's alone; distributed.teardown() makes the others wait for it
        _finish(run, cfg, pre, data, device, t_start, best_auc, best_epoch)
    return run
