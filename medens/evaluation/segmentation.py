"""Evaluate a BraTS segmenter checkpoint: metrics per case, predictions as NIfTI, one picture per case.

`python scripts/evaluate.py ckpt_path=saved_models/mri/unet_best.pth [split=val|test|predict]
[data=brats2023] [+label_codes=dataset|medens] [+inferer.overlap=0.25 +inferer.sw_batch_size=4 ...]`
writes into the run folder (sliding-window settings default to the checkpoint's own):

- ``metrics.json``: mean and per case Dice per class and region, HD95 per region (mm);
- ``per_case.csv``: the same, one row per case;
- ``predictions/<case>_pred.nii.gz``: the predicted label map on the input scan's voxel grid and
  affine (uncropped), so it opens aligned with the scan in any viewer. Label codes are the
  dataset's own (e.g. 4 = enhancing for BraTS 2021, 3 for 2023) by default, or medens classes
  0..3 with ``+label_codes=medens``;
- ``figures/<case>.png``: axial, coronal and sagittal slices through the tumour centroid with
  ground truth (top row) and prediction (bottom row) overlaid.

Data without ground truth (``require_label: false``, e.g. ``data=brats2023``) is predicted case by
case (split ``predict``); metrics are then reported only for the cases that have a label.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from medens.data.mri.brats import REGIONS, canonical_modality  # noqa: E402
from medens.data.mri.transforms import write_prediction_nifti  # noqa: E402
from medens.errors import ConfigError  # noqa: E402
from medens.evaluation.classification import save_figure  # noqa: E402
from medens.evaluation.evaluate import build_from_checkpoint  # noqa: E402
from medens.evaluation.external import is_partial, merge_data_config  # noqa: E402
from medens.evaluation.predict import predict_each_batch  # noqa: E402
from medens.metrics.segmentation import DICE_KEYS, HD95_KEYS, mean_metrics, segmentation_metrics  # noqa: E402
from medens.utils.atomic import atomic_path  # noqa: E402
from medens.utils.hashing import sha256_file  # noqa: E402
from medens.utils.jsonio import write_json_strict  # noqa: E402

log = logging.getLogger(__name__)

#: Overlay colours per medens class (BraTS viewers' habit: core red, oedema green, enhancing yellow).
CLASS_COLOURS = {1: (0.9, 0.1, 0.1), 2: (0.1, 0.8, 0.2), 3: (1.0, 0.85, 0.0)}
CLASS_LABELS = {1: "necrotic core", 2: "oedema", 3: "enhancing"}
LABEL_CODES = ("dataset", "medens")
#: Preferred display channel: FLAIR shows oedema and tumour best; T1c the enhancing rim.
DISPLAY_PREFERENCE = ("flair", "t1ce", "t2", "t1")


def to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient a 3-D ``volume`` to RAS (x right, y anterior, z superior) for display.

    Returns the reoriented array and its voxel spacing; only flips and axis swaps, no resampling.
    """
    ornt = nib.orientations.io_orientation(affine)
    zooms = np.sqrt((np.asarray(affine, np.float64)[:3, :3] ** 2).sum(axis=0))
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = zooms
    return np.ascontiguousarray(nib.orientations.apply_orientation(volume, ornt)), spacing


def _centroid(*masks: np.ndarray | None) -> tuple[int, int, int] | None:
    for m in masks:
        if m is not None and m.any():
            return tuple(int(round(c)) for c in np.argwhere(m).mean(axis=0))  # type: ignore[return-value]
    return None


def _overlay(label: np.ndarray) -> np.ndarray:
    rgba = np.zeros((*label.shape, 4), np.float32)
    for cls, colour in CLASS_COLOURS.items():
        rgba[label == cls] = (*colour, 0.45)
    return rgba


def plot_case(
    image: np.ndarray,
    pred: np.ndarray,
    label: np.ndarray | None,
    affine: np.ndarray,
    path: str | Path,
    title: str = "",
    channel_name: str = "",
) -> Path:
    """PNG with axial, coronal and sagittal slices through the tumour centroid (ground truth's, else the
    prediction's, else the volume centre); top row ground truth, bottom row prediction, both over the image.

    ``image`` [H,W,D] (one channel), ``pred``/``label`` [H,W,D] medens classes, all on one voxel grid
    whose orientation ``affine`` gives (shown in RAS, patient's right on the image right).
    """
    img, sp = to_ras(image, affine)
    prd, _ = to_ras(pred.astype(np.uint8), affine)
    lab = to_ras(label.astype(np.uint8), affine)[0] if label is not None else None
    centre = _centroid(lab > 0 if lab is not None else None, prd > 0) or tuple(s // 2 for s in img.shape)
    cx, cy, cz = centre
    brain = img[img != 0]
    lo, hi = np.percentile(brain, [1, 99.5]) if brain.size else (0.0, 1.0)
    views = [
        ("axial", lambda v: v[:, :, cz].T, sp[1] / sp[0], f"z={cz}"),
        ("coronal", lambda v: v[:, cy, :].T, sp[2] / sp[0], f"y={cy}"),
        ("sagittal", lambda v: v[cx, :, :].T, sp[2] / sp[1], f"x={cx}"),
    ]
    rows = [("ground truth", lab), ("prediction", prd)]
    grey = plt.get_cmap("gray").with_extremes(bad="black")  # background (exactly 0 after z-score) black
    fig, axes = plt.subplots(2, 3, figsize=(12, 8.4), facecolor="black")
    for r, (row_name, seg) in enumerate(rows):
        for c, (view, cut, aspect, where) in enumerate(views):
            ax = axes[r, c]
            ax.imshow(np.ma.masked_equal(cut(img), 0), cmap=grey, vmin=lo, vmax=hi, origin="lower",
                      aspect=aspect, interpolation="nearest")  # fmt: skip
            if seg is not None:
                ax.imshow(_overlay(cut(seg)), origin="lower", aspect=aspect, interpolation="nearest")
            else:
                ax.text(0.5, 0.02, "no ground truth", color="white", ha="center", va="bottom", transform=ax.transAxes)
            ax.set_title(f"{row_name}: {view} ({where})", color="white", fontsize=10)
            ax.set_axis_off()
    handles = [Patch(color=CLASS_COLOURS[k], label=CLASS_LABELS[k]) for k in CLASS_COLOURS]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False, labelcolor="white", fontsize=10)
    fig.suptitle(f"{title}\nimage: {channel_name} (z-scored), RAS view", color="white", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 0.94))
    return save_figure(fig, path, dpi=100, tight=False, facecolor="black")


def _display_channel(channels: Sequence[str]) -> int:
    names = [canonical_modality(c) for c in channels]
    for pref in DISPLAY_PREFERENCE:
        if pref in names:
            return names.index(pref)
    return 0


def _prepare_data_cfg(cfg: DictConfig, ckpt: dict[str, Any]) -> DictConfig:
    """The data config to evaluate on: `data=<group>` if given (with the checkpoint's split seed and
    channel order), else the training data; an in-memory cache becomes lazy decoding of the split only."""
    hyper = ckpt.get("hyperparameters") or {}
    given = cfg.get("data")
    if is_partial(given):  # data.<key>= overrides: merged onto the checkpoint's own data config
        given = merge_data_config(ckpt, given, cfg.ckpt_path, str(cfg.get("split", "test")))
    data_cfg = given if given is not None else OmegaConf.create(hyper.get("data") or {})
    contract = hyper.get("io_contract") or {}
    with open_dict(data_cfg):
        if data_cfg.get("seed") is None:
            data_cfg.seed = hyper.get("seed", 0)
        channels = contract.get("channels")
        if given is not None and channels and [canonical_modality(m) for m in data_cfg.modalities] != list(channels):
            log.info("data.modalities %s -> %s (the network's channel order)", list(data_cfg.modalities), channels)
            data_cfg.modalities = list(channels)
        if data_cfg.get("cache") == "memory":
            data_cfg.cache, data_cfg.verify = "none", False
    return data_cfg


def _with_inferer_overrides(ckpt: dict[str, Any], overrides: Any) -> dict[str, Any]:
    """`+inferer.overlap=0.25` (or roi_size, sw_batch_size, mode) replaces the training inferer's value."""
    if not overrides:
        return ckpt
    hyper = ckpt.get("hyperparameters") or {}
    model = dict(hyper.get("model") or {})
    given = OmegaConf.to_container(overrides, resolve=True) if OmegaConf.is_config(overrides) else dict(overrides)
    model["inferer"] = {**(model.get("inferer") or {}), **given}
    return {**ckpt, "hyperparameters": {**hyper, "model": model}}


def evaluate_segmenter(cfg: DictConfig, out_dir: Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    """Sliding-window prediction of every case of a split; metrics (JSON/CSV), NIfTI and PNG per case
    (`ckpt`: `cfg.ckpt_path` as `evaluate` loaded it)."""
    ckpt_path = Path(cfg.ckpt_path)
    label_codes = str(cfg.get("label_codes", "dataset"))
    if label_codes not in LABEL_CODES:
        raise ConfigError(f"label_codes must be one of {list(LABEL_CODES)}, got {label_codes!r}")
    ckpt = _with_inferer_overrides(ckpt, cfg.get("inferer"))
    model, dm, hyper = build_from_checkpoint(ckpt, ckpt_path, _prepare_data_cfg(cfg, ckpt))
    dm.prepare_data()
    dm.setup("predict")
    split = str(cfg.get("split", "test"))
    if not dm.require_label:
        split = "predict"  # inference data: every case, metrics where a label exists
    if split == "all":
        split = "predict"  # every case of the folder (the datamodule's predict split)
    loaders = {"val": dm.val_dataloader, "test": dm.test_dataloader, "predict": dm.predict_dataloader}
    if split not in loaders:
        raise ConfigError(f"split must be one of {list(loaders)}, got {split!r}")
    case_ids = dm.split_case_ids(split)
    if not case_ids:
        sizes = ", ".join(f"{s} {len(dm.split_case_ids(s))}" for s in ("train", "val", "test"))
        raise ConfigError(f"split {split!r} of {dm.root} holds no case ({sizes}); choose another with split=...")
    channels = list(model.io_contract.get("channels") or dm.modalities)
    show = _display_channel(channels)
    rows: list[dict[str, Any]] = []
    from medens.evaluation.segmentation_report import prepare_report

    report_inputs = prepare_report(cfg, dm)  # options, case table and subgroup columns checked before predicting
    out_dir.mkdir(parents=True, exist_ok=True)

    def one_case(batch: dict[str, Any], prediction: dict[str, Any], seconds: float) -> None:
        """Metrics, NIfTI and figure of one predicted case (`trainer.predict`, batch size 1, on the CPU)."""
        cid = batch["case_id"][0]
        pred = prediction["pred"][0, 0].numpy()
        has_label = "label" in batch
        label = batch["label"][0, 0].numpy().astype(np.uint8) if has_label else None
        report_inputs.sample.add(cid, prediction["logits"][0], label, batch["image"][0])  # voxels for calibration
        row: dict[str, Any] = {"case_id": cid, "has_label": has_label, "inference_seconds": round(seconds, 2)}
        if label is not None:
            spacing = batch["spacing"][0].numpy()
            row.update(segmentation_metrics(pred, label, spacing, include_hd95=True,
                                            empty_penalty=model.hd95_empty_penalty))  # fmt: skip
        write_prediction_nifti(pred, batch, out_dir / "predictions" / f"{cid}_pred.nii.gz", index=0,
                               label_map=dm.label_map if label_codes == "dataset" else None)  # fmt: skip
        affine = batch["affine"][0].numpy()
        dice_txt = (f"Dice WT {row['dice_wt']:.3f}  TC {row['dice_tc']:.3f}  ET {row['dice_et']:.3f}"
                    if has_label else "no ground truth")  # fmt: skip
        plot_case(batch["image"][0, show].numpy(), pred, label, affine, out_dir / "figures" / f"{cid}.png",
                  title=f"{cid}  ({dice_txt})", channel_name=channels[show])  # fmt: skip
        log.info("%s: %s (%.1f s)", cid, dice_txt, seconds)
        rows.append(row)

    # the module's predict_step (sliding window) through Lightning's trainer.predict, one case per batch
    predict_each_batch(model, loaders[split](), one_case, str(cfg.get("device", "cpu")))

    labelled = [r for r in rows if r["has_label"]]
    metric_keys = [*DICE_KEYS, *HD95_KEYS, *(f"{k}_undefined" for k in HD95_KEYS)]
    mean = mean_metrics([{k: r[k] for k in metric_keys} for r in labelled]) if labelled else {}
    report = {
        "mean_dice": mean.get("dice_mean"),
        "mean": mean,
        "per_case": {r["case_id"]: {k: v for k, v in r.items() if k != "case_id"} for r in rows},
        "n_cases": len(rows),
        "n_labelled": len(labelled),
        "split": split,
        "regions": {r: list(c) for r, c in REGIONS.items()},
        "label_codes": label_codes,
        "hd95": "mm, symmetric 95th percentile; null where exactly one mask is empty (counted in *_undefined)",
        "checkpoint": str(ckpt_path.resolve()),
        "checkpoint_sha256": sha256_file(ckpt_path),
        "checkpoint_epoch": ckpt.get("epoch"),
        "channels": channels,
        "data": str(dm.root),
        "inferer": {k: v for k, v in (hyper.get("model", {}).get("inferer") or {}).items() if k != "_target_"},
        "tta_flips": bool(getattr(model, "tta_flips", False)),  # test-time mirroring of the prediction
        "postprocess": model.active_postprocess() if hasattr(model, "active_postprocess") else None,
    }
    from medens.evaluation.segmentation_report import add_intervals_and_report

    add_intervals_and_report(cfg, report, rows, metric_keys, dm, out_dir, report_inputs, ckpt, ckpt_path)
    write_json_strict(out_dir / "metrics.json", report)  # undefined metrics (NaN) become null
    columns = ["case_id", "has_label", *metric_keys, "inference_seconds"]
    with atomic_path(out_dir / "per_case.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in columns} for r in rows)
    if labelled:
        log.info("mean Dice %.4f (WT %.4f, TC %.4f, ET %.4f) on %d %s cases -> %s", mean["dice_mean"],
                 mean["dice_wt"], mean["dice_tc"], mean["dice_et"], len(labelled), split, out_dir)  # fmt: skip
    else:
        log.info("predicted %d unlabelled case(s) -> %s", len(rows), out_dir)
    return report
