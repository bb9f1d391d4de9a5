"""``train-segmenter`` and ``train-gate``: rebuild the lung segmenter and the input gate the classifier ships with.

The bundled model is three trained artefacts, built in this order (``make model`` runs all three):

1. ``covidxray train-segmenter --data JSRT/manifest.csv --out runs/segmenter`` — the lung segmenter
   (`covidxray.segment_training`), trained on JSRT's lung masks;
2. ``covidxray train-gate --segmenter runs/segmenter ...`` — the input gate's head
   (`covidxray.gate_training`), on that segmenter's features; it is written into the same folder;
3. ``covidxray train --segmenter runs/segmenter ...`` — the classifier, which copies both into its run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import DataError

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train-segmenter`` and ``train-gate`` to the top-level subparsers."""
    from_default = "(default %(default)s)"
    s = sub.add_parser("train-segmenter", help="train the lung segmenter on a JSRT-style manifest (image + lung mask per row)",
                       description="Train the lung segmenter (a U-Net on lung masks, split by patient); writes "
                                   "segmenter.safetensors and segmenter.json into --out. The bundled one: 60 epochs at 112 px "
                                   "on JSRT (about 10 minutes on 2 CPU cores).")
    s.add_argument("--data", required=True, help="manifest CSV with path, mask and patient_id columns (JSRT's manifest.csv)")
    s.add_argument("--out", default="runs/segmenter", help=f"folder to write {from_default}")
    s.add_argument("--size", type=int, default=112, help=f"network input side in pixels, a multiple of 16 {from_default}")
    s.add_argument("--epochs", type=int, default=60, help=from_default)
    s.add_argument("--batch-size", type=int, default=16, help=from_default)
    s.add_argument("--lr", type=float, default=2e-3, help=f"peak learning rate (one-cycle) {from_default}")
    s.add_argument("--seed", type=int, default=0, help=from_default)
    s.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start the encoder from ImageNet weights (offline package; --no-pretrained: random init)")
    s.set_defaults(func=cmd_train_segmenter)

    g = sub.add_parser("train-gate", help="train the input gate (frontal chest X-ray or not) on a segmenter's features",
                       description="Train the input gate's head on the lung segmenter's encoder features and fit its "
                                   "threshold on validation films; writes gate.safetensors and the gate section of "
                                   "segmenter.json into the --segmenter folder (the segmenter itself is unchanged).")
    g.add_argument("--segmenter", required=True, help="folder holding segmenter.json (from train-segmenter); the gate is added there")
    g.add_argument("--data", required=True, help="the covid-cxr manifest.csv (frontal films)")
    g.add_argument("--splits", required=True, help="its split CSV (splits/covid-cxr.csv)")
    g.add_argument("--jsrt", required=True, help="JSRT manifest.csv (frontal films, split as the segmenter's patients)")
    g.add_argument("--not-frontal", required=True, help="not-frontal-cxr manifest.csv (lateral films and CT slices)")
    g.add_argument("--epochs", type=int, default=60, help=from_default)
    g.add_argument("--frontal-limit", type=int, default=2500, help=f"frontal training films used {from_default}")
    g.add_argument("--keep", type=float, default=0.998, help=f"share of validation films that must pass {from_default}")
    g.add_argument("--seed", type=int, default=0, help=from_default)
    g.set_defaults(func=cmd_train_gate)


def _existing(path: str, flag: str, what: str) -> str:
    if not Path(path).exists():
        raise DataError(f"{flag} {path}: no such file; give {what}")
    return path


def cmd_train_segmenter(args: argparse.Namespace) -> int:
    from ..segment_training import SegConfig, train_segmenter

    if args.size % 16:
        raise DataError(f"--size {args.size}: the segmenter's input side must be a multiple of 16 (e.g. 112)")
    if args.epochs < 1:
        raise DataError(f"--epochs {args.epochs}: train at least one epoch")
    _existing(args.data, "--data", "a manifest CSV with path, mask and patient_id columns (JSRT's manifest.csv)")
    cfg = SegConfig(data=args.data, out=args.out, size=args.size, epochs=args.epochs, batch_size=args.batch_size,
                    lr=args.lr, seed=args.seed, pretrained=args.pretrained)
    print(f"training the lung segmenter: {args.epochs} epochs at {args.size} px on {args.data}", flush=True)
    path = train_segmenter(cfg)
    metrics = json.loads(path.read_text())["metrics"]
    print(f"validation Dice {metrics['val']['dice_mean']:.4f}, test Dice {metrics['test']['dice_mean']:.4f}")
    print(f"wrote {path} and {path.parent / 'segmenter.safetensors'}; next: covidxray train-gate --segmenter {path.parent} ...")
    return 0


def cmd_train_gate(args: argparse.Namespace) -> int:
    from ..gate_training import GateConfig, train_gate

    if not (Path(args.segmenter) / "segmenter.json").is_file():
        raise DataError(f"--segmenter {args.segmenter}: no segmenter.json there; give the folder train-segmenter wrote")
    for flag, what in (("data", "the covid-cxr manifest.csv"), ("splits", "its split CSV"),
                       ("jsrt", "JSRT's manifest.csv"), ("not_frontal", "the not-frontal-cxr manifest.csv")):
        _existing(getattr(args, flag), f"--{flag.replace('_', '-')}", what)
    if not 0 < args.keep < 1:
        raise DataError(f"--keep {args.keep}: a share between 0 and 1 (e.g. 0.998)")
    cfg = GateConfig(segmenter=args.segmenter, covid_cxr=args.data, splits=args.splits, jsrt=args.jsrt,
                     not_frontal=args.not_frontal, epochs=args.epochs, frontal_limit=args.frontal_limit, keep=args.keep,
                     seed=args.seed)
    print(f"training the input gate on {args.segmenter}'s features ({args.epochs} epochs)", flush=True)
    gate = train_gate(cfg)
    print(f"threshold on P(frontal) {gate['threshold']:.4f} ({gate['threshold_rule']}); on held-out pictures:")
    for name, m in gate["test"].items():
        print(f"  {name}: {'n/a' if m['rate'] is None else format(m['rate'], '.3f')} of {m['n']}")
    print(f"wrote {Path(args.segmenter) / 'gate.safetensors'} and the gate section of {Path(args.segmenter) / 'segmenter.json'}")
    return 0
