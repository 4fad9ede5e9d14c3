"""Patient-grouped k-fold cross-validation of a chest X-ray recipe against the 32x32-pixel logistic regression.

`python scripts/cross_validate.py experiment=xray_samples` (with `cv.xray.*`). The images and the 14
NIH labels come through the project's NIH readers (`read_nih_table`, `load_xray_image`); every image is
decoded once to greyscale at ``cv.xray.image_size``. For each fold (patient-grouped, `patient_kfold` with
``data.seed``; by finding too with ``stratify``) an inner validation split of the fold's *training*
patients (``inner_val_fraction``) chooses the baseline's regularisation and the model's early-stopping
epoch; the held-out patients are only scored.

Model: a small residual CNN, trained from scratch or (``pretrain``) first on another chest X-ray set that
holds no NIH image (PneumoniaMNIST among the samples; no ImageNet weights on this machine), with
class-balanced BCE, affine + intensity augmentation, early stopping on the inner validation mean AUC,
and the mean probability of ``seeds`` models. Figures: per-fold and pooled mean AUC over the labels with
at least ``min_positives`` held-out positives, and a paired patient bootstrap of the pooled difference.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra.utils
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig

from medens.data.splits import patient_kfold, split_by_patient_list
from medens.data.xray import NIH_LABELS, find_label_csv, load_xray_image, read_nih_table
from medens.data.xray_readers import NIHReader, read_medmnist
from medens.errors import ConfigError, DataError
from medens.evaluation.baselines import fit_pixel_baseline, mean_auc
from medens.evaluation.calibration import apply_calibration, fit_calibration
from medens.evaluation.cross_validation import merged_from, read_runs, recipe_options, time_line
from medens.evaluation.statistics import PatientBootstrap, delong_test, summarise_replicates, weighted_auc
from medens.utils.atomic import write_csv
from medens.utils.jsonio import write_json_and_markdown
from medens.utils.timing import cpu_seconds

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "n_folds": 5,
    "stratify": False,  # true: deal patients so that every fold gets ~1/k of each finding's positives
    "inner_val_fraction": 0.15,
    "image_size": 32,
    "width": 16,  # channels of the first stage (x2 per stage, 4 stages)
    "dropout": 0.3,
    "epochs": 25,
    "patience": 5,
    "batch_size": 32,
    "lr": 0.002,
    "weight_decay": 0.0005,
    "max_pos_weight": 50.0,  # class balance: BCE pos_weight = negatives/positives per label, capped here
    "augment": True,
    "rotate_deg": 8.0,
    "translate": 0.06,
    "scale": 0.08,
    "intensity": 0.15,
    "seeds": [0, 1, 2, 3],
    "pretrain": None,  # a MedMNIST .npz of other chest X-rays to pretrain on (conf: the samples' PneumoniaMNIST)
    "pretrain_epochs": 8,
    "calibrate": "none",  # platt: per label, on the inner validation cases, before seeds and folds are pooled
    "min_positives": 5,  # labels scored: at least this many positives among the held-out cases
    "baseline_size": 32,
    "baseline_c": [0.001, 0.003, 0.01, 0.1],
    "max_images": None,  # tests: only the first N images of the table that exist on disk
}


def xray_options(cfg: DictConfig) -> dict[str, Any]:
    opts = recipe_options(cfg, "xray", DEFAULTS)
    if opts["calibrate"] not in ("none", "platt"):
        raise ConfigError(f"cv.xray.calibrate must be none or platt, got {opts['calibrate']!r}")
    if not 0 < float(opts["inner_val_fraction"]) < 1:
        raise ConfigError(f"cv.xray.inner_val_fraction must be in (0, 1), got {opts['inner_val_fraction']}")
    return opts


def load_images(
    root: Path, image_dir: str, csv: str | None, size: int, max_images: int | None
) -> pd.DataFrame:
    """Rows of the NIH table whose image exists, with ``pixels`` (size x size float32 in [0, 1])."""
    table = read_nih_table(find_label_csv(root, csv))  # (the datamodule's prepare_data wrote a synthetic set)
    folder = root / image_dir
    present = {p.name for p in folder.glob("*.png")} if folder.is_dir() else set()
    df = table[table["Image Index"].isin(present)].sort_values("Image Index").reset_index(drop=True)
    if max_images:
        df = df.iloc[: int(max_images)].reset_index(drop=True)
    if df.empty:
        raise DataError(f"X-ray cross-validation: no image of {root} table found in {folder}")
    pix = []
    for name in df["Image Index"]:
        im = load_xray_image(folder / name).resize((size, size), resample=3)  # bicubic
        pix.append(np.asarray(im, dtype=np.float32) / 255.0)
    df["pixels"] = pix
    return df


class SmallResNet(nn.Module):
    """Four residual stages (width, 2w, 4w, 8w), global average pooling, dropout, linear head."""

    def __init__(self, n_out: int, width: int = 32, dropout: float = 0.3) -> None:
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(
            nn.Conv2d(1, w[0], 3, padding=1, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU()
        )
        blocks, c_in = [], w[0]
        for i, c in enumerate(w):
            blocks.append(_Block(c_in, c, stride=1 if i == 0 else 2))
            c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(c_in, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out),
        )  # fmt: skip
        self.skip = (
            nn.Identity() if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


def _augment(x: torch.Tensor, opts: Mapping[str, Any], gen: torch.Generator) -> torch.Tensor:
    """Random rotation, scale, shift (one `grid_sample`) and gain/bias over the whole batch; home-made because
    MONAI's Rand* transforms work per item and the recipe augments its in-memory batch in one pass."""
    n = x.shape[0]
    ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(float(opts["rotate_deg"]))
    sc = 1 + (torch.rand(n, generator=gen) * 2 - 1) * float(opts["scale"])
    tx, ty = ((torch.rand(n, generator=gen) * 2 - 1) * float(opts["translate"]) * 2 for _ in range(2))
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), padding_mode="border",
                      align_corners=False)  # fmt: skip
    k = float(opts["intensity"])
    gain = 1 + (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * k
    bias = (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * k
    return x * gain + bias


def _predict(net: nn.Module, x: torch.Tensor) -> np.ndarray:
    net.eval()
    with torch.no_grad():
        return torch.cat([torch.sigmoid(net(x[i : i + 256])) for i in range(0, len(x), 256)]).numpy()


def load_pretraining_images(path: str | Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, size, size] in [0, 1], labels [N, k]) of a MedMNIST .npz's train and val splits (its test
    split stays unused): the other chest X-ray set the CNN is pretrained on."""
    try:
        splits = read_medmnist(path)  # the X-ray reader's own checks
    except DataError as exc:
        raise DataError(f"{path}: not a MedMNIST .npz with train/val images and labels ({exc})") from exc
    imgs = np.concatenate([splits["train"][0], splits["val"][0]])
    labels = np.concatenate([splits["train"][1], splits["val"][1]])
    if imgs.ndim == 4:  # RGB MedMNIST sets: luminance
        imgs = imgs @ np.array([0.299, 0.587, 0.114])
    x = torch.from_numpy(imgs.astype(np.float32) / 255.0)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)[:, 0].numpy()
    return x, labels.astype(np.float32)


def _train_epochs(
    net: nn.Module, xt: torch.Tensor, yt: torch.Tensor, opts: Mapping[str, Any], gen: torch.Generator,
    epochs: int, pos_weight: torch.Tensor | None = None,
) -> Iterator[float]:  # fmt: skip
    """AdamW with a one-cycle schedule over `epochs` epochs of shuffled, augmented batches (BCE, optionally
    class-balanced); yields the last batch's loss after each epoch, so a caller can validate or stop."""
    bs = int(opts["batch_size"])
    optim = torch.optim.AdamW(net.parameters(), lr=float(opts["lr"]), weight_decay=float(opts["weight_decay"]))
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, float(opts["lr"]), total_steps=epochs * math.ceil(len(xt) / bs))
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), bs):
            idx = order[i : i + bs]
            xb = _augment(xt[idx], opts, gen) if opts["augment"] else xt[idx]
            loss = F.binary_cross_entropy_with_logits(net(xb), yt[idx], pos_weight=pos_weight)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
        yield float(loss.detach())


def pretrain_backbone(opts: Mapping[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Stem and residual stages of a `SmallResNet` trained on `opts["pretrain"]` (no NIH image is used, so
    one backbone serves every fold); the head is the fine-tuning's own."""
    x, y = load_pretraining_images(opts["pretrain"], int(opts["image_size"]))
    if y.max() > 1:  # multi-class labels in one column: one-hot
        y = np.eye(int(y.max()) + 1, dtype=np.float32)[y[:, 0].astype(int)]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    mu, sd = float(x.mean()), float(x.std() + 1e-6)
    xt, yt = torch.from_numpy((x - mu) / sd)[:, None].float(), torch.from_numpy(y)
    net = SmallResNet(y.shape[1], int(opts["width"]), float(opts["dropout"]))
    epochs = int(opts["pretrain_epochs"])
    losses = list(_train_epochs(net, xt, yt, opts, gen, epochs))
    log.info("pretrained on %s: %d images, %d epochs, last loss %.4f", opts["pretrain"], len(xt), epochs,
             losses[-1] if losses else float("nan"))  # fmt: skip
    return {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("head.")}


def train_cnn(
    x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray, opts: Mapping[str, Any], seed: int,
    backbone: Mapping[str, torch.Tensor] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    """Train with early stopping on the inner validation mean AUC; returns the best epoch's weights.
    `backbone`: pretrained stem and stages to start from (`pretrain_backbone`)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    mu, sd = float(x_tr.mean()), float(x_tr.std() + 1e-6)
    xt = torch.from_numpy((x_tr - mu) / sd)[:, None].float()
    xv = torch.from_numpy((x_va - mu) / sd)[:, None].float()
    yt = torch.from_numpy(y_tr).float()
    net = SmallResNet(y_tr.shape[1], int(opts["width"]), float(opts["dropout"]))
    if backbone is not None:
        missing = net.load_state_dict(dict(backbone), strict=False).missing_keys
        assert all(k.startswith("head.") for k in missing), missing
    net.norm = (mu, sd)  # type: ignore[assignment]
    pos = yt.sum(0)
    # class balance per label: negatives/positives, capped (1.0: plain BCE, no balancing)
    pos_weight = ((len(yt) - pos) / pos.clamp(min=1)).clamp(min=1.0, max=float(opts["max_pos_weight"]))
    best: dict[str, Any] = {"auc": -1.0, "epoch": -1, "state": None}
    history = []
    for epoch, _ in enumerate(_train_epochs(net, xt, yt, opts, gen, int(opts["epochs"]), pos_weight)):
        auc = mean_auc(y_va, _predict(net, xv))
        history.append(auc)
        if auc is not None and auc > best["auc"]:
            best = {"auc": auc, "epoch": epoch, "state": {k: v.clone() for k, v in net.state_dict().items()}}
        elif epoch - best["epoch"] >= int(opts["patience"]):
            break
    if best["state"] is not None:
        net.load_state_dict(best["state"])
    return net, {"best_epoch": best["epoch"], "best_inner_val_auc": best["auc"], "epochs_run": len(history)}


def predict_cnn(net: nn.Module, x: np.ndarray) -> np.ndarray:
    mu, sd = net.norm  # type: ignore[misc]
    return _predict(net, torch.from_numpy((x - mu) / sd)[:, None].float())


def cross_validate_xray(cfg: DictConfig) -> dict[str, Any]:
    """K-fold CV of the CNN recipe vs the pixel logistic regression; report in ``cfg.paths.output_dir``."""
    opts = xray_options(cfg)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), cpu_seconds()
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    dm.prepare_data()  # writes the synthetic set where the config asks for one; real data: nothing
    if not isinstance(dm.reader, NIHReader):
        raise ConfigError(f"X-ray cross-validation reads the NIH layout (data/source=xray_nih or xray_synthetic); "
                          f"data.source is the {dm.reader.name!r} reader")  # fmt: skip
    df = load_images(dm.root, dm.reader.image_dir, dm.reader.csv, int(opts["image_size"]), opts["max_images"])
    x = np.stack(df["pixels"].to_list())
    y = np.stack(df["targets"].to_list()).astype(np.float32)
    pids = df["Patient ID"].astype(str).to_numpy()
    seed = int(cfg.data.get("seed", cfg.get("seed", 0)) or 0)
    n_folds = int(opts["n_folds"])
    folds = patient_kfold(list(pids), n_folds, seed, labels=y if opts["stratify"] else None)
    run = cfg.cv.get("folds")
    run = list(range(n_folds)) if run is None else [int(f) for f in run]
    prob_m = np.full(y.shape, np.nan)
    prob_b = np.full(y.shape, np.nan)
    fold_of = np.full(len(y), -1)
    rows = []
    backbones = {int(s): pretrain_backbone(opts, int(s)) for s in opts["seeds"]} if opts["pretrain"] else {}
    for k in run:
        tf, tc = time.perf_counter(), cpu_seconds()
        tr_all, te = np.asarray(folds[k]["train"]), np.asarray(folds[k]["val"])
        inner = split_by_patient_list(list(pids[tr_all]), float(opts["inner_val_fraction"]), seed + k)
        tr, va = tr_all[inner["train"]], tr_all[inner["val"]]
        assert not set(pids[te]) & set(pids[tr_all]) and not set(pids[va]) & set(pids[tr])
        base, c_table = fit_pixel_baseline(
            x[tr], y[tr], x[va], y[va], opts["baseline_c"], int(opts["baseline_size"])
        )
        prob_b[te] = base.predict_proba(x[te])
        runs, probs = [], []
        for s in opts["seeds"]:
            net, info = train_cnn(x[tr], y[tr], x[va], y[va], opts, int(s) + 100 * k, backbones.get(int(s)))
            p_te = predict_cnn(net, x[te])
            if opts["calibrate"] == "platt":  # one probability scale for the folds and seeds that are pooled
                cal = fit_calibration(predict_cnn(net, x[va]), y[va], NIH_LABELS, "platt")
                p_te = apply_calibration(p_te, cal, NIH_LABELS)
            probs.append(p_te)
            runs.append({"seed": int(s), **info})
        prob_m[te] = np.mean(probs, axis=0)
        fold_of[te] = k
        rows.append({
            "fold": k, "n_train": int(len(tr)), "n_inner_val": int(len(va)), "n_test": int(len(te)),
            "n_test_patients": int(len(set(pids[te]))), "inner_val_patients": sorted(set(pids[va])),
            "auc_model": mean_auc(y[te], prob_m[te]), "auc_pixel_lr": mean_auc(y[te], prob_b[te]),
            "baseline_c_table": c_table, "models": runs,
            "seconds": round(time.perf_counter() - tf, 1), "cpu_seconds": round(cpu_seconds() - tc, 1),
        })  # fmt: skip
        log.info("fold %d: mean AUC model %s vs pixel LR %s (%d images)", k, rows[-1]["auc_model"],
                 rows[-1]["auc_pixel_lr"], len(te))  # fmt: skip
    done = fold_of >= 0
    report = summarise_xray(y[done], prob_m[done], prob_b[done], pids[done], rows, opts,
                            int(cfg.cv.get("bootstrap", 2000) or 1))  # fmt: skip
    report |= {"wall_seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(cpu_seconds() - c0, 1),
               "n_images": int(len(y)), "n_patients": int(len(set(pids))),
               "experiment": {"task_name": cfg.get("task_name"), "data_root": str(cfg.data.root), "seed": seed}}  # fmt: skip
    pred = pd.DataFrame({"image": df["Image Index"][done], "patient_id": pids[done], "fold": fold_of[done],
                  **{f"y_{n}": y[done, j] for j, n in enumerate(NIH_LABELS)},
                  **{f"model_{n}": prob_m[done, j] for j, n in enumerate(NIH_LABELS)},
                  **{f"pixel_lr_{n}": prob_b[done, j] for j, n in enumerate(NIH_LABELS)}})  # fmt: skip
    write_csv(pred, out_dir / "cv_predictions.csv")
    write_json_and_markdown(out_dir, "cv_report", report, markdown_xray)
    log.info("cross-validation report: %s", out_dir / "cv_report.md")
    return report


def summarise_xray(
    y: np.ndarray, pm: np.ndarray, pb: np.ndarray, pids: np.ndarray, rows: list[dict[str, Any]],
    opts: Mapping[str, Any], n_boot: int,
) -> dict[str, Any]:  # fmt: skip
    """Pooled mean AUC over the scored labels, per-label AUCs with DeLong, and the paired patient bootstrap."""
    cols = [
        j for j in range(y.shape[1]) if y[:, j].sum() >= int(opts["min_positives"]) and (y[:, j] == 0).any()
    ]
    per_label = {}
    for j in cols:
        try:
            dl = delong_test(y[:, j] == 1, pm[:, j], pb[:, j])
        except DataError as exc:
            dl = {"error": str(exc)}
        per_label[NIH_LABELS[j]] = {"n_positive": int(y[:, j].sum()), "auc_model": mean_auc(y[:, [j]], pm[:, [j]]),
                                    "auc_pixel_lr": mean_auc(y[:, [j]], pb[:, [j]]), "delong": dl}  # fmt: skip
    report: dict[str, Any] = {
        "design": f"{opts['n_folds']}-fold patient-grouped; inner validation {opts['inner_val_fraction']:.0%} of each "
        "fold's training patients (baseline C, early stopping)",
        "recipe": dict(opts),
        "labels_scored": [NIH_LABELS[j] for j in cols],
        "per_fold": rows,
        "per_label": per_label,
        "mean_auc_model_over_folds": float(
            np.mean([r["auc_model"] for r in rows if r["auc_model"] is not None])
        ),
        "mean_auc_pixel_lr_over_folds": float(
            np.mean([r["auc_pixel_lr"] for r in rows if r["auc_pixel_lr"] is not None])
        ),
        "pooled_auc_model": mean_auc(y, pm, cols),
        "pooled_auc_pixel_lr": mean_auc(y, pb, cols),
        "folds_model_better": f"{sum(r['auc_model'] > r['auc_pixel_lr'] for r in rows)}/{len(rows)}",
    }
    report["objective"] = report["pooled_auc_model"]
    if cols and len(set(pids)) >= 2:
        boot = PatientBootstrap(pids, max(n_boot, 1), 0, what="paired mean AUC")
        yb = y == 1

        def diff(w: np.ndarray) -> np.ndarray:
            return np.nanmean([weighted_auc(yb[:, j], pm[:, j], w) - weighted_auc(yb[:, j], pb[:, j], w)
                               for j in cols], axis=0)  # fmt: skip

        reps = boot.replicates(diff)
        ok = reps[np.isfinite(reps)]
        share = float(np.mean(ok <= 0)) if ok.size else None
        report["paired_mean_auc_difference"] = summarise_replicates(float(diff(np.ones((1, len(y))))[0]), reps) | boot.record() | {
            "share_model_not_better": share,
            "p_two_sided": None if share is None else float(min(1.0, 2 * min(share, 1 - share + 1 / ok.size))),
        }  # fmt: skip
    return report


def markdown_xray(report: Mapping[str, Any]) -> str:
    lines = [
        f"# Cross-validation: {report.get('experiment', {}).get('task_name', 'xray')}",
        "",
        report["design"]
        + f"; labels scored (>= {report['recipe']['min_positives']} held-out positives): "
        + ", ".join(report["labels_scored"])
        + ".",
        "",
        "| fold | train | inner val | held out | mean AUC model | mean AUC pixel LR | CPU s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["per_fold"]:
        lines.append(f"| {r['fold']} | {r['n_train']} | {r['n_inner_val']} | {r['n_test']} | "
                     f"{r['auc_model']:.4f} | {r['auc_pixel_lr']:.4f} | {r['cpu_seconds']:.0f} |")  # fmt: skip
    lines += [
        "",
        f"- pooled mean AUC: model {report['pooled_auc_model']:.4f}, pixel LR {report['pooled_auc_pixel_lr']:.4f}; "
        f"folds where the model is better: {report['folds_model_better']}",
    ]
    pc = report.get("paired_mean_auc_difference")
    if pc:
        lines.append(f"- pooled mean AUC difference (model - pixel LR): {pc['value']:+.4f}, patient bootstrap "
                     f"x{pc['n_resamples']} 95% CI [{pc['ci_low']:+.4f}, {pc['ci_high']:+.4f}], two-sided p = "
                     f"{pc['p_two_sided']:.3g}")  # fmt: skip
    lines.append("")
    lines.append("| label | positives | AUC model | AUC pixel LR | DeLong p |")
    lines.append("|---|---:|---:|---:|---:|")
    for name, v in report["per_label"].items():
        p = v["delong"].get("p_value")
        lines.append(f"| {name} | {v['n_positive']} | {v['auc_model']:.4f} | {v['auc_pixel_lr']:.4f} | "
                     f"{'n/a' if p is None else format(p, '.3g')} |")  # fmt: skip
    if closing := time_line(report):  # after a blank line, below the per-label table
        lines += ["", *closing]
    return "\n".join(lines) + "\n"


def merge_xray(dirs: Sequence[str | Path], out_dir: Path, n_boot: int) -> dict[str, Any]:
    """One report from runs that each scored some folds (e.g. folds run as parallel processes)."""
    reports = read_runs(dirs)
    rows = [r for rep in reports for r in rep["per_fold"]]
    df = pd.concat([pd.read_csv(Path(d) / "cv_predictions.csv", dtype={"patient_id": str}) for d in dirs],
                   ignore_index=True)  # fmt: skip
    if df["image"].duplicated().any() or len({r["fold"] for r in rows}) != len(rows):
        raise DataError(f"cv merge: the runs {list(map(str, dirs))} share folds or images")
    y = df[[f"y_{n}" for n in NIH_LABELS]].to_numpy()
    pm = df[[f"model_{n}" for n in NIH_LABELS]].to_numpy()
    pb = df[[f"pixel_lr_{n}" for n in NIH_LABELS]].to_numpy()
    report = summarise_xray(y, pm, pb, df["patient_id"].to_numpy(), sorted(rows, key=lambda r: r["fold"]),
                            reports[0]["recipe"], n_boot)  # fmt: skip
    report |= merged_from(reports, dirs) | {"n_images": int(len(df)), "n_patients": int(df["patient_id"].nunique())}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(df, out_dir / "cv_predictions.csv")
    write_json_and_markdown(out_dir, "cv_report", report, markdown_xray)
    return report
