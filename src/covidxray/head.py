"""The classifier's last layer refitted on the features of its own training films, as prediction sees them.

The network's head is learnt together with the backbone, under the training's augmentation (crops moved and
scaled, label-conditional softening of normal films) and regularisation, and it is never shown a film as it is
served. Refitting only that layer afterwards - an L2-regularised logistic regression on the training films'
pre-logit features, its strength chosen by the validation split's ROC-AUC - is last-layer retraining
(Kirichenko, Izmailov & Wilson, "Last Layer Re-Training is Sufficient for Robustness to Spurious Correlations",
ICLR 2023). The backbone and so the features, the familiarity statistics and the ONNX graphs' inputs stay as they
are; temperature and threshold are fitted again on validation (`covidxray.calibration`), as at the end of training.

The penalty is on the weights of the features as they are, not standardised ones: standardising would give the
near-constant features (some are exactly 0 on every training film) the largest weights, which makes the head
follow noise there - the int8 graph's rounding, for one (its parity check refused such a head: test ROC-AUC
0.98 -> 0.66) - for no gain on validation (`bench/head_refit.py`).

    covidxray refit-head runs/default          # rewrites the run's weights and model.json; export and evaluate again

`covidxray.headfit.fit_head` is the fit alone (NumPy in, a `LinearHead` out); `refit_run` applies it to a run, and
keeps the features it fitted on beside the weights (``head-features.safetensors``, float16) so that a site can refit
the head with its own normal films added (`covidxray.headfit.site_head`, ``covidxray site add NAME --normals DIR
--refit-head``) without the training data.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from .calibration import Calibration, calibrate_model
from .checkpoint import resolve_data, run_dir, save_model
from .errors import DataError
from .evaluate import predict_split
from .headfit import C_GRID, FEATURES_FILE, HeadFeatures, LinearHead, Refit, fit_head
from .models import get_spec
from .predictor import Predictor

__all__ = ["C_GRID", "LinearHead", "Refit", "fit_head", "set_head", "refit_run"]

log = logging.getLogger(__name__)


def set_head(model: torch.nn.Module, arch: str, head: LinearHead) -> None:
    """Write ``head`` into the network's classifier layer (`covidxray.models.ModelSpec.head`), in place."""
    layer = model.get_submodule(get_spec(arch).head)
    weight, bias = head.two_class()
    if tuple(layer.weight.shape) != tuple(weight.shape):
        raise DataError(f"{arch}: its head is {tuple(layer.weight.shape)}, the refitted one {tuple(weight.shape)}")
    with torch.no_grad():
        layer.weight.copy_(weight.to(layer.weight))
        layer.bias.copy_(bias.to(layer.bias))


def refit_run(run: str | os.PathLike, data: str | None = None, splits: str | None = None,
              target_sensitivity: float | None = None, pooled: bool = False,
              cache_dir: str | None = None) -> tuple[Refit, Calibration]:
    """Refit a trained run's head on its training split (`fit_head`), calibrate it again on validation (temperature,
    logit shift, threshold: Youden's J, or ``target_sensitivity`` on every COVID-19 origin, or on all of them together
    with ``pooled``) and rewrite its weights
    and ``model.json`` atomically. ONNX graphs and reports made before belong to the old head: export and evaluate
    again. The familiarity statistics stay valid (the features do not change)."""
    predictor = Predictor(run, backend="torch")
    arch = predictor.meta["arch"]
    data, splits = resolve_data(run, predictor.meta, data, splits)
    train, _, train_feats, _ = predict_split(predictor, data, splits, "train", cache_dir)
    val, _, val_feats, _ = predict_split(predictor, data, splits, "val", cache_dir)
    refit = fit_head(train_feats, [s.label for s in train], val_feats, [s.label for s in val])
    set_head(predictor.model, arch, refit.head)
    layer = predictor.model.get_submodule(get_spec(arch).head)

    def relogit() -> np.ndarray:  # the validation logits of the model as it is now: its head on the features it gave
        with torch.no_grad():
            return layer(torch.from_numpy(val_feats).to(layer.weight)).cpu().numpy()

    val_y = np.array([s.label for s in val])
    cal, _ = calibrate_model(predictor.model, arch, val_y, relogit(), relogit, True,
                             target_sensitivity=target_sensitivity, sources=[s.source for s in val], pooled=pooled)
    margin = np.diff(relogit(), axis=1)[:, 0] / cal.temperature  # the calibrated logit of COVID-19 (shift in the bias)
    kept = HeadFeatures(train_feats, np.array([s.label for s in train]), val_feats, val_y)
    meta = {**predictor.meta, **cal.to_meta(),  # val_auc stays the trained epoch's; the refit's is beside it
            "head_refit": {"method": "L2 logistic regression on the training split's pre-logit features "
                                     "(last-layer retraining); C chosen by validation ROC-AUC",
                           "c": refit.c, "train_images": len(train), "val_auc": refit.val_auc[refit.c],
                           "val_auc_by_c": {f"{c:g}": a for c, a in refit.val_auc.items()},
                           # what a site's head keeps (`site_head`): this sensitivity on validation at the threshold
                           "val_sensitivity": float((1 / (1 + np.exp(-margin[val_y == 1])) >= cal.threshold).mean()),
                           "features_file": FEATURES_FILE, "features_sha256": kept.save(run_dir(run))}}
    save_model(run_dir(run), predictor.model.cpu(), meta)
    log.info("refitted the head of %s on %d training films: C=%g, validation ROC-AUC %.4f; T=%.3f, threshold %.4f",
             run, len(train), refit.c, refit.val_auc[refit.c], cal.temperature, cal.threshold)
    return refit, cal
