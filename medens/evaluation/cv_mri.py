"""Leave-one-patient-out cross-validation of a brain-tumour segmentation recipe against the FLAIR baseline.

`python scripts/cross_validate.py experiment=mri_brats2015` (with `cv.mri.*` from
conf/cross_validate.yaml). The cases come through the experiment's `BraTSDataModule` (decode, z-score
over the brain, crop to the brain), so preprocessing is the project's. For each held-out patient:

- baseline: z-scored FLAIR > t inside the brain, t chosen on the fold's training cases (best mean Dice);
- model: a 2.5D U-Net (MONAI UNet, spatial_dims=2, the neighbouring axial slices as extra channels)
  trained on the training cases only with the nnU-Net lessons that fit a 2-core CPU: foreground
  oversampling, spatial augmentation (rotation, scaling, mirroring), intensity augmentation, a poly
  learning-rate schedule to a fixed number of steps, test-time flips, and postprocessing (brain mask,
  small/largest connected components) chosen on the fold's training cases.

With three patients an inner validation *patient* would leave one training case, so the choices that
need validation (FLAIR threshold, postprocessing) are made on the fold's training cases; nothing of the
held-out patient steers anything, and the schedule is fixed (no early stopping).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra.utils
import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from omegaconf import DictConfig, open_dict

from medens.errors import ConfigError, DataError
from medens.evaluation.baselines import choose_flair_threshold, flair_threshold_segment
from medens.evaluation.cross_validation import merged_from, read_runs, recipe_options, time_line
from medens.evaluation.statistics import paired_dice_comparison
from medens.metrics.segmentation import region_dice
from medens.models.mri_postprocess import (
    DEFAULT_CANDIDATES,
    brain_of,
    choose_postprocess,
    postprocess,
)
from medens.models.tta import flip_averaged_logits
from medens.utils.jsonio import write_json_and_markdown
from medens.utils.timing import cpu_seconds

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "context": 1,  # neighbouring axial slices on each side, as extra input channels (2.5D)
    "patch": [128, 128],
    "batch_size": 8,
    "steps": 400,
    "lr": 0.003,
    "weight_decay": 3e-5,
    "fg_prob": 0.67,  # foreground oversampling: share of patches centred on a tumour voxel
    "net": {"channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 0, "dropout": 0.0},
    "spatial_prob": 0.5,  # rotation + scaling
    "rotate_deg": 15.0,
    "scale": 0.15,
    "mirror": True,
    "intensity_prob": 0.5,
    "scale_intensity": 0.1,
    "shift_intensity": 0.1,
    "noise_std": 0.05,
    "tta_flips": True,
    "postprocess": "choose",  # choose (on the training cases) | none | a fixed candidate dict
    "postprocess_candidates": None,  # null: medens.models.mri_postprocess.DEFAULT_CANDIDATES
    "flair_grid": None,  # null: 0.5..3.0 step 0.1
    "eval_batch": 16,
    "max_cases": None,  # tests: only the first N cases
}


def mri_options(cfg: DictConfig) -> dict[str, Any]:
    """``cv.mri`` merged over `DEFAULTS`; unknown keys are a ConfigError."""
    opts = recipe_options(cfg, "mri", DEFAULTS)
    if int(opts["steps"]) < 1 or int(opts["batch_size"]) < 1 or int(opts["context"]) < 0:
        raise ConfigError(f"cv.mri: steps, batch_size >= 1 and context >= 0 needed, got {opts}")
    return opts


def load_cases(cfg: DictConfig) -> tuple[list[dict[str, Any]], list[str]]:
    """Every labelled case of the experiment's data as arrays (image [C,H,W,D], label, brain)."""
    dcfg = cfg.data.copy()
    with open_dict(dcfg):
        dcfg.val_fraction, dcfg.test_fraction = 0.0, 0.0
        dcfg.cache = "memory"
    dm = hydra.utils.instantiate(dcfg, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    ds = dm.dataset("all")
    ids = dm.split_case_ids("all")
    cases = []
    for i, cid in enumerate(ids):
        item = ds[i]
        if "label" not in item:
            continue
        img = np.asarray(item["image"], dtype=np.float32)
        cases.append(
            {
                "case_id": cid,
                "patient_id": _pid(dm, cid),
                "image": img,
                "label": np.asarray(item["label"])[0].astype(np.int64),
                "brain": brain_of(img),
            }
        )
    if "flair" not in dm.modalities:
        raise ConfigError(
            f"MRI cross-validation: the FLAIR baseline needs flair in data.modalities {dm.modalities}"
        )
    return cases, dm.modalities


def _pid(dm: Any, case_id: str) -> str:
    from medens.data.mri.brats import patient_id_from_case

    return patient_id_from_case(case_id, dm.patient_id_pattern)


def _slab(image: np.ndarray, z: int, ctx: int) -> np.ndarray:
    """[C*(2ctx+1), H, W]: the axial slice z and its neighbours (clamped at the ends)."""
    d = image.shape[-1]
    zs = [min(max(z + o, 0), d - 1) for o in range(-ctx, ctx + 1)]
    return image[..., zs].transpose(0, 3, 1, 2).reshape(-1, image.shape[1], image.shape[2])


class SliceSampler:
    """Random 2.5D training patches with foreground oversampling (numpy RNG, seeded)."""

    def __init__(self, cases: list[dict[str, Any]], opts: Mapping[str, Any], seed: int) -> None:
        self.ctx, self.patch = int(opts["context"]), [int(p) for p in opts["patch"]]
        self.fg_prob = float(opts["fg_prob"])
        self.rng = np.random.default_rng(seed)
        ph, pw = self.patch[0] // 2 + 1, self.patch[1] // 2 + 1
        self.cases = []
        for c in cases:
            img = np.pad(c["image"], ((0, 0), (ph, ph), (pw, pw), (0, 0)))
            lab = np.pad(c["label"], ((ph, ph), (pw, pw), (0, 0)))
            self.cases.append({
                "image": img, "label": lab,
                "fg": np.argwhere(lab > 0), "brain": np.argwhere(np.pad(c["brain"], ((ph, ph), (pw, pw), (0, 0)))),
            })  # fmt: skip

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for _ in range(n):
            c = self.cases[int(self.rng.integers(len(self.cases)))]
            pool = c["fg"] if len(c["fg"]) and self.rng.random() < self.fg_prob else c["brain"]
            h, w, z = pool[int(self.rng.integers(len(pool)))]
            h0, w0 = h - self.patch[0] // 2, w - self.patch[1] // 2
            sl = _slab(c["image"], int(z), self.ctx)[:, h0 : h0 + self.patch[0], w0 : w0 + self.patch[1]]
            xs.append(sl)
            ys.append(c["label"][h0 : h0 + self.patch[0], w0 : w0 + self.patch[1], z])
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))[:, None]


def augment(
    x: torch.Tensor, y: torch.Tensor, opts: Mapping[str, Any], gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched 2D augmentation: rotation + scaling (affine grid; nearest for labels), mirroring, intensity.
    Home-made because it transforms a whole batch of slices in one `grid_sample`; MONAI's Rand* work per item."""
    n = x.shape[0]
    if float(opts["spatial_prob"]) > 0:
        on = torch.rand(n, generator=gen) < float(opts["spatial_prob"])
        ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(float(opts["rotate_deg"])) * on
        sc = 1 + (torch.rand(n, generator=gen) * 2 - 1) * float(opts["scale"]) * on
        cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
        theta = torch.stack(
            [torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)], 1
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        y = F.grid_sample(y.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False).long()
    if opts["mirror"]:
        for dim in (2, 3):
            flip = torch.rand(n, generator=gen) < 0.5
            x[flip], y[flip] = x[flip].flip(dim), y[flip].flip(dim)
    p = float(opts["intensity_prob"])
    if p > 0:
        c = x.shape[1]
        on = (torch.rand(n, 1, 1, 1, generator=gen) < p).float()
        scale = 1 + (torch.rand(n, c, 1, 1, generator=gen) * 2 - 1) * float(opts["scale_intensity"]) * on
        shift = (torch.rand(n, c, 1, 1, generator=gen) * 2 - 1) * float(opts["shift_intensity"]) * on
        noise = torch.randn(x.shape, generator=gen) * float(opts["noise_std"]) * on
        brain = (x != 0).float()
        x = (x * scale + shift + noise) * brain
    return x, y


def build_net(opts: Mapping[str, Any], in_channels: int) -> UNet:
    n = opts["net"]
    return UNet(spatial_dims=2, in_channels=in_channels, out_channels=4, channels=list(n["channels"]),
                strides=list(n["strides"]), num_res_units=int(n["num_res_units"]), norm="INSTANCE",
                dropout=float(n["dropout"]))  # fmt: skip


def train_model(cases: list[dict[str, Any]], opts: Mapping[str, Any], seed: int) -> tuple[UNet, list[float]]:
    """Fixed schedule of ``steps`` AdamW steps with a poly learning rate (nnU-Net's (1 - t/T)^0.9)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sampler = SliceSampler(cases, opts, seed)
    in_ch = cases[0]["image"].shape[0] * (2 * int(opts["context"]) + 1)
    net = build_net(opts, in_ch)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    optim = torch.optim.AdamW(
        net.parameters(), lr=float(opts["lr"]), weight_decay=float(opts["weight_decay"])
    )
    steps = int(opts["steps"])
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda t: (1 - t / steps) ** 0.9)
    losses: list[float] = []
    net.train()
    for step in range(steps):
        x, y = augment(*sampler.batch(int(opts["batch_size"])), opts, gen)
        loss = loss_fn(net(x), y)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, steps // 10) == 0:
            log.info("  step %d/%d loss %.4f", step + 1, steps, float(np.mean(losses[-50:])))
    return net, losses


@torch.no_grad()
def predict_case(net: UNet, image: np.ndarray, opts: Mapping[str, Any]) -> np.ndarray:
    """Log-softmax [4, H, W, D] over every axial slice (padded to the net's stride); with ``tta_flips`` the
    log of the softmax averaged over the slice's mirrorings (`flip_averaged_logits`, as the 3D module)."""
    net.eval()
    ctx = int(opts["context"])
    _, h, w, d = image.shape
    m = int(np.prod(opts["net"]["strides"]))
    ph, pw = (-h) % m, (-w) % m
    out = np.zeros((4, h, w, d), dtype=np.float32)
    bs = int(opts["eval_batch"])
    for z0 in range(0, d, bs):
        zs = list(range(z0, min(d, z0 + bs)))
        x = torch.from_numpy(np.stack([_slab(image, z, ctx) for z in zs]))
        x = F.pad(x, (0, pw, 0, ph))
        logp = flip_averaged_logits(net, x) if opts["tta_flips"] else torch.log_softmax(net(x), 1)
        out[..., zs] = logp[:, :, :h, :w].permute(1, 2, 3, 0).numpy()
    return out


def cross_validate_mri(cfg: DictConfig) -> dict[str, Any]:
    """Leave-one-patient-out CV of model vs FLAIR threshold; report written to ``cfg.paths.output_dir``."""
    opts = mri_options(cfg)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), cpu_seconds()
    cases, modalities = load_cases(cfg)
    if opts["max_cases"]:
        cases = cases[: int(opts["max_cases"])]
    patients = sorted({c["patient_id"] for c in cases})
    if len(patients) < 2:
        raise DataError(
            f"MRI cross-validation needs at least 2 patients, found {len(patients)} under {cfg.data.root}"
        )
    folds_cfg = cfg.cv.get("folds")
    folds_run = list(range(len(patients))) if folds_cfg is None else [int(f) for f in folds_cfg]
    fi = modalities.index("flair")
    grid = opts["flair_grid"] or tuple(np.round(np.arange(0.5, 3.01, 0.1), 2))
    seed = int(cfg.get("seed") or 0)
    rows = []
    for k in folds_run:
        tf, tc = time.perf_counter(), cpu_seconds()
        test = [c for c in cases if c["patient_id"] == patients[k]]
        train = [c for c in cases if c["patient_id"] != patients[k]]
        assert not {c["patient_id"] for c in test} & {c["patient_id"] for c in train}
        thr, thr_table = choose_flair_threshold(
            [c["image"][fi] for c in train],
            [c["brain"] for c in train],
            [c["label"] > 0 for c in train],
            grid,
        )
        log.info(
            "fold %d (held out %s): FLAIR threshold %.2f on %d training cases",
            k,
            patients[k],
            thr,
            len(train),
        )
        net, losses = train_model(train, opts, seed + k)
        train_pred = [np.argmax(predict_case(net, c["image"], opts), 0) for c in train]
        if opts["postprocess"] == "choose":
            cands = opts["postprocess_candidates"] or DEFAULT_CANDIDATES
            spec, pp_table = choose_postprocess(
                train_pred, [c["label"] for c in train], [c["brain"] for c in train], cands
            )
        elif opts["postprocess"] == "none":
            spec, pp_table = {}, []
        else:
            spec, pp_table = dict(opts["postprocess"]), []
        for c in test:
            raw = np.argmax(predict_case(net, c["image"], opts), 0)
            pred = postprocess(raw, c["brain"], spec)
            base = flair_threshold_segment(c["image"][fi], c["brain"], thr).astype(np.int64)
            d_model, d_raw = region_dice(pred, c["label"]), region_dice(raw, c["label"])
            if opts["tta_flips"]:  # the same network without test-time mirroring: the ablation costs no training
                plain = np.argmax(predict_case(net, c["image"], {**opts, "tta_flips": False}), 0)
                d_no_tta = region_dice(postprocess(plain, c["brain"], spec), c["label"])
            else:
                d_no_tta = d_model
            d_base = region_dice(base, c["label"])  # the baseline segments the whole tumour only
            rows.append({
                "fold": k, "case_id": c["case_id"], "patient_id": c["patient_id"],
                "dice_model": d_model, "dice_model_raw": d_raw, "dice_model_no_tta": d_no_tta,
                "dice_wt_flair": d_base["wt"],
                "flair_threshold": thr, "postprocess": spec, "final_loss": float(np.mean(losses[-50:])),
                "train_cases": [t["case_id"] for t in train],
                "seconds": round(time.perf_counter() - tf, 1), "cpu_seconds": round(cpu_seconds() - tc, 1),
                "flair_threshold_table": thr_table, "postprocess_table": pp_table,
            })  # fmt: skip
            log.info("fold %d %s: Dice wt/tc/et %.4f/%.4f/%.4f (raw wt %.4f), FLAIR wt %.4f", k, c["case_id"],
                     d_model["wt"], d_model["tc"], d_model["et"], d_raw["wt"], d_base["wt"])  # fmt: skip
    report = summarise_mri(rows, opts, int(cfg.cv.get("bootstrap", 2000) or 1))
    report |= {"wall_seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(cpu_seconds() - c0, 1),
               "experiment": {"task_name": cfg.get("task_name"), "data_root": str(cfg.data.root),
                              "modalities": modalities, "seed": seed}}  # fmt: skip
    write_json_and_markdown(out_dir, "cv_report", report, markdown_mri)
    log.info("cross-validation report: %s", out_dir / "cv_report.md")
    return report


def summarise_mri(rows: list[dict[str, Any]], opts: Mapping[str, Any], n_boot: int) -> dict[str, Any]:
    """Per-case rows -> means, wins and the paired comparison of whole-tumour Dice (model - FLAIR)."""
    wt_m = np.array([r["dice_model"]["wt"] for r in rows])
    wt_b = np.array([r["dice_wt_flair"] for r in rows])
    report: dict[str, Any] = {
        "design": "leave-one-patient-out; FLAIR threshold and postprocessing chosen on each fold's training cases",
        "recipe": dict(opts),
        "n_folds": len(rows),
        "per_fold": rows,
        "mean_dice_model": {
            r: float(np.mean([x["dice_model"][r] for x in rows])) for r in ("wt", "tc", "et")
        },
        "mean_dice_model_raw": {
            r: float(np.mean([x["dice_model_raw"][r] for x in rows])) for r in ("wt", "tc", "et")
        },
        "mean_dice_model_no_tta": {  # (rows of reports from before this column: the model's own figure)
            r: float(np.mean([x.get("dice_model_no_tta", x["dice_model"])[r] for x in rows])) for r in ("wt", "tc", "et")
        },
        "mean_dice_wt_flair": float(wt_b.mean()),
        "folds_model_better_wt": f"{int((wt_m > wt_b).sum())}/{len(rows)}",
    }
    report["objective"] = report["mean_dice_model"]["wt"]
    if len(rows) >= 2:
        report["paired_wt_dice"] = paired_dice_comparison(
            wt_m, wt_b, [r["case_id"] for r in rows], [r["patient_id"] for r in rows], max(n_boot, 1), 0
        )
    return report


def markdown_mri(report: Mapping[str, Any]) -> str:
    """Per-fold table and summary."""
    lines = [
        f"# Cross-validation: {report.get('experiment', {}).get('task_name', 'mri')}",
        "",
        report["design"] + ".",
        "",
        "| fold | case | WT model | TC model | ET model | WT no postprocessing | WT no TTA | WT FLAIR | FLAIR t | "
        "postprocess | CPU s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in report["per_fold"]:
        m = r["dice_model"]
        lines.append(f"| {r['fold']} | {r['case_id']} | {m['wt']:.4f} | {m['tc']:.4f} | {m['et']:.4f} | "
                     f"{r['dice_model_raw']['wt']:.4f} | {r.get('dice_model_no_tta', m)['wt']:.4f} | {r['dice_wt_flair']:.4f} | {r['flair_threshold']:.2f} | "
                     f"{r['postprocess'] or 'none'} | {r['cpu_seconds']:.0f} |")  # fmt: skip
    mm = report["mean_dice_model"]
    lines += [
        "",
        f"- mean Dice model: WT {mm['wt']:.4f}, TC {mm['tc']:.4f}, ET {mm['et']:.4f}; FLAIR baseline WT "
        f"{report['mean_dice_wt_flair']:.4f}; folds where the model's WT is better: {report['folds_model_better_wt']}",
        f"- mean WT Dice without the postprocessing {report['mean_dice_model_raw']['wt']:.4f}, without test-time "
        f"mirroring {report['mean_dice_model_no_tta']['wt']:.4f}",
    ]
    pc = report.get("paired_wt_dice")
    if pc:
        md = pc["mean_difference"]
        lines.append(
            f"- WT Dice difference (model - FLAIR): {md['value']:+.4f}, patient bootstrap 95% CI "
            f"[{md['ci_low']:+.4f}, {md['ci_high']:+.4f}] ({md['n_patients']} patients); Wilcoxon p = "
            f"{pc['wilcoxon']['p_value']:.3g} (with {pc['n_cases']} cases the smallest two-sided p is "
            f"{2 / 2 ** pc['n_cases']:.3g})"
        )
    lines += time_line(report)
    return "\n".join(lines) + "\n"


def merge_mri(dirs: Sequence[str | Path], out_dir: Path, n_boot: int) -> dict[str, Any]:
    """One report from runs that each held out some patients (e.g. folds run as parallel processes)."""
    reports = read_runs(dirs)
    rows = sorted((r for rep in reports for r in rep["per_fold"]), key=lambda r: r["fold"])
    if len({r["case_id"] for r in rows}) != len(rows):
        raise DataError(f"cv merge: the runs {list(map(str, dirs))} hold out the same case twice")
    report = summarise_mri(rows, reports[0]["recipe"], n_boot)
    report |= merged_from(reports, dirs)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_and_markdown(out_dir, "cv_report", report, markdown_mri)
    return report
