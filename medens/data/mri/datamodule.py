"""Lightning DataModule over BraTS-format case folders (real releases or the synthetic set).

Life cycle:
- ``prepare_data`` (one process per node): the reader writes the synthetic set when asked, and with
  ``cache='disk'`` decodes every case once into ``cache_dir`` (errors recorded beside the cache).
- ``setup`` (every process, idempotent, reads only): discovers cases, checks headers, splits by
  patient, and decodes/verifies cases (``cache='memory'`` keeps them; ``'none'`` only checks them
  when ``verify=True``).

Reproducibility: loaders come from `medens.data.loaders.make_loader`: an `EpochShuffleSampler`
whose order depends only on (seed, epoch), sharded by rank under DDP (medens trainers set
``use_distributed_sampler=False``), yielding an item seed with every index. `CaseDataset`
reseeds its MONAI random transforms (``set_random_state``) from that seed before building the
item, so the patches and augmentations of epoch N are a pure function of (seed, epoch, index):
the same for a resumed run, with any number of workers, whatever the global RNG state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import nibabel as nib
from monai.data import Dataset as MonaiDataset
from monai.data import PersistentDataset, list_data_collate
from monai.transforms import Compose
from torch.utils.data import DataLoader, Dataset

from medens.data.loaders import make_loader
from medens.data.reader import plain_config
from medens.data.splits import patient_split
from medens.errors import ConfigError, DataError
from medens.utils.hashing import sha256_json
from medens.utils.jsonio import read_json_object
from medens.utils.paths import cache_root

from .brats import CANONICAL_MODALITIES, LABEL_NAMES, NUM_CLASSES, REGIONS, BraTSCase, resolve_modalities
from .readers import LEGACY_KEYS, BraTSReader, build_reader, legacy_reader
from .transforms import (
    build_decode_transform,
    build_eval_transform,
    build_train_transform,
    resolve_augment,
)

log = logging.getLogger(__name__)

CACHE_MODES = ("none", "memory", "disk")
SPLITS = ("train", "val", "test", "predict", "all")
_CACHE_FORMAT = 2  # bump when the decode chain changes meaning (2: MONAI NormalizeIntensityd/CropForegroundd)


def _data_error(exc: BaseException) -> DataError | None:
    """The DataError behind an exception (MONAI's Compose wraps transform errors in RuntimeError)."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 20:
        if isinstance(e, DataError):
            return e
        e = e.__cause__ or e.__context__
        seen += 1
    return None


def _cache_hash(item: Mapping[str, Any]) -> bytes:
    """Hash function for `PersistentDataset`: the precomputed key of the case (files + decode config)."""
    return str(item["cache_key"]).encode("utf-8")


class CaseDataset(Dataset):
    """Cases -> decoded items (from a memory list, a disk cache or on the fly) -> phase transform.

    ``set_random_state(seed)`` (called by `SeededItems` with the sampler's per-item seed) reseeds
    every MONAI random transform of the phase chain.
    """

    def __init__(self, decoded: Dataset | Sequence[dict], transform: Compose, seed: int = 0) -> None:
        self.decoded = decoded
        self.transform = transform
        self.set_random_state(seed)

    def __len__(self) -> int:
        return len(self.decoded)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        item = self.decoded[index]
        return self.transform(dict(item))  # shallow copy: the cached item is never modified

    def set_random_state(self, seed: int) -> None:
        """Reseed the random transforms (MONAI transforms keep their own RNG, not the global one)."""
        self.transform.set_random_state(seed=int(seed) % (2**32))


class _FlaggedItems(Dataset):
    """A rank's evaluation items: ``indices`` into ``dataset``, each flagged ``is_padding`` or not."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], padding: Sequence[bool]) -> None:
        self.dataset, self.indices, self.padding = dataset, list(indices), list(padding)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[self.indices[i]], "is_padding": self.padding[i]}


class BraTSDataModule(L.LightningDataModule):
    """BraTS segmentation data: items ``image`` [C,H,W,D] float32, ``label`` [1,H,W,D] int64 (0..3).

    Train items are ``samples_per_volume`` random patches per case, so a train batch holds
    ``batch_size * samples_per_volume`` patches. Val/test/predict items are whole brain-cropped
    volumes (``val_batch_size`` 1, shapes differ) for sliding-window inference, carrying ``affine``,
    ``original_shape``, ``crop_start``/``crop_end``, ``spacing``, ``reference_file`` and ``case_id``
    (see `medens.data.mri.transforms.write_prediction_nifti`).

    Cases without ground truth are accepted with ``require_label=False``; they appear only in the
    ``predict`` split. ``on_error='skip'`` drops bad cases and counts them in ``skipped_cases``.

    ``source`` is the reader of the release's naming scheme and label codes (`medens.data.mri.readers`:
    a reader, a short name or a ``{_target_: ...}`` config); the flat keys of older configs and
    checkpoints (``naming``, ``label_preset``, ``synthetic``, ...) are accepted in its place.
    """

    def __init__(
        self,
        root: str = "data/brats_synthetic",
        source: BraTSReader | str | Mapping[str, Any] | None = None,
        modalities: Sequence[str] = CANONICAL_MODALITIES,
        patch_size: Sequence[int] = (128, 128, 128),
        pos_neg_ratio: float = 1.0,
        samples_per_volume: int = 2,
        batch_size: int = 2,
        val_batch_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        seed: int = 0,
        cache: str = "memory",
        cache_dir: str | None = None,
        augment: Mapping[str, Any] | None = None,
        on_error: str = "error",
        require_label: bool = True,
        verify: bool = True,
        crop_foreground: bool = True,
        crop_margin: int = 0,
        **legacy: Any,
    ) -> None:
        super().__init__()
        if unknown := sorted(set(legacy) - set(LEGACY_KEYS)):
            import difflib
            import inspect

            params = [*inspect.signature(BraTSDataModule).parameters][:-1]
            close = difflib.get_close_matches(unknown[0], [*params, *LEGACY_KEYS], n=1)
            raise ConfigError(f"unknown config key 'data.{unknown[0]}': BraTSDataModule takes {params} "
                              f"(and data.source).{f' Did you mean {close[0]!r}?' if close else ''}")  # fmt: skip
        if source is not None and legacy:
            raise ConfigError(
                f"data.source is given: {sorted(legacy)} belong under data.source, not beside it"
            )
        self.reader = build_reader(source) if source is not None else legacy_reader(legacy)
        self.save_hyperparameters(logger=False, ignore=["source", *legacy])
        # Hydra passes OmegaConf containers; the checkpoint stores these hyperparameters and must hold
        # plain python only (medens loads checkpoints with weights_only=True)
        for key in list(self.hparams):
            self.hparams[key] = plain_config(self.hparams[key])
        self.hparams["source"] = self.reader.config()
        self.root = Path(str(root)).expanduser()
        self._modalities = resolve_modalities(plain_config(modalities))
        self.reader.check(self._modalities)  # fail fast on config typos
        self.label_map = self.reader.codes
        self.patch_size = [int(p) for p in plain_config(patch_size)]
        self.pos_neg_ratio = float(pos_neg_ratio)
        self.samples_per_volume = int(samples_per_volume)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.seed = int(seed)
        if cache not in CACHE_MODES:
            raise ConfigError(f"cache: '{cache}' is not one of {list(CACHE_MODES)}")
        self.cache = cache
        self.cache_dir = Path(str(cache_dir)).expanduser() if cache_dir else cache_root() / "mri"
        self.augment = resolve_augment(plain_config(augment) if augment else None)
        if on_error not in ("error", "skip"):
            raise ConfigError(f"on_error: '{on_error}' is not one of ['error', 'skip']")
        self.on_error = on_error
        self.require_label = bool(require_label)
        self.verify = bool(verify)
        self.crop_foreground = bool(crop_foreground)
        self.crop_margin = int(crop_margin)
        # fail fast on bad patch / ratio values
        build_train_transform(self.patch_size, self.pos_neg_ratio, self.samples_per_volume, self.augment)

        self._decode = build_decode_transform(self.label_map, self.crop_foreground, self.crop_margin)
        self._cases: list[BraTSCase] | None = None
        self._splits: dict[str, list[str]] = {}
        self._decoded: dict[str, dict] = {}
        self._datasets: dict[str, CaseDataset] = {}
        self.skipped_cases: dict[str, str] = {}

    # ------------------------------------------------------------------ public properties
    @property
    def modalities(self) -> list[str]:
        """Canonical modality names in channel order."""
        return list(self._modalities)

    @property
    def num_channels(self) -> int:
        return len(self._modalities)

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES

    @property
    def label_names(self) -> list[str]:
        return list(LABEL_NAMES)

    def io_contract(self) -> dict[str, Any]:
        """What a model trained on this data expects and produces (kept in every checkpoint).

        Channel order is the configured modality list; labels are medens classes, with the raw code
        -> class map of this dataset; there is no resampling, so ``spacing`` lists the voxel spacings
        (mm) seen in the cases (from the NIfTI headers).
        """
        spacings: list[list[float]] = []
        for case in self._cases or []:
            try:
                zooms = nib.load(str(case.image_files[0])).header.get_zooms()[:3]
            except Exception:  # unreadable files were reported by setup; the contract stays usable
                continue
            sp = [round(float(z), 4) for z in zooms]
            if sp not in spacings:
                spacings.append(sp)
        brain = "mask file" if any(c.mask_file is not None for c in self._cases or []) else "non-zero voxels"
        return {
            "modality": "mri",
            "channels": self.modalities,
            "input_channels": self.num_channels,
            "label_names": self.label_names,
            "label_map": {str(k): int(v) for k, v in sorted(self.label_map.items())},
            "regions": {r: list(c) for r, c in REGIONS.items()},
            "spacing": spacings[0] if len(spacings) == 1 else spacings,
            "resampling": None,
            "patch_size": list(self.patch_size),
            "preprocessing": {
                "normalize": "per-channel z-score over non-zero (brain) voxels (NormalizeIntensityd); background 0",
                "brain": brain,
                "crop_foreground": self.crop_foreground,
                "crop_margin": self.crop_margin,
            },
            "naming": self.reader.naming,
            "reader": self.hparams["source"]["_target_"],
            "output": "logits [classes, H, W, D] over label_names (argmax for the label map)",
        }

    @property
    def cases(self) -> list[BraTSCase]:
        """Valid cases after setup (bad ones skipped by ``on_error='skip'`` are not listed)."""
        self._require_setup()
        assert self._cases is not None
        return list(self._cases)

    def split_case_ids(self, split: str) -> list[str]:
        """Case ids of ``train``/``val``/``test`` (labelled cases), or ``predict``/``all`` (every valid case)."""
        self._require_setup()
        if split not in SPLITS:
            raise ConfigError(f"split '{split}' is not one of {list(SPLITS)}")
        return list(self._splits[split])

    def split_patient_ids(self, split: str) -> set[str]:
        """Patients of a split (follow-up cases of one patient share it)."""
        return {self.reader.patient_id(c) for c in self.split_case_ids(split)}

    @property
    def patient_id_pattern(self) -> str | None:
        """The reader's patient-id regex (None: built-in BraTS rules)."""
        return self.reader.patient_id_pattern

    # ------------------------------------------------------------------ lifecycle
    def prepare_data(self) -> None:
        """Rank-0 work that writes files: synthetic generation and the disk cache."""
        if self.reader.prepare(self.root):
            log.info("wrote synthetic BraTS set to %s (%s)", self.root, self.reader.config())
        if self.cache == "disk":
            from medens.utils.locking import owned_lock

            with owned_lock(Path(self.cache_dir) / ".mri-cache.lock", "MRI decoded-volume cache build"):
                self._fill_disk_cache()

    def _fill_disk_cache(self) -> None:
        """Decode every case not yet in the disk cache (each file written atomically), recording failures."""
        cases, _ = self._discover()
        keys = {c.case_id: self._cache_key(c) for c in cases}
        todo = [c for c in cases if not self._error_file(keys[c.case_id]).is_file() and not self._on_disk(c)]
        ds = self._persistent(todo)
        for cid, message in self._decode_each(todo, lambda i, _: ds[i]).items():
            self._write_error(keys[cid], message)

    def _decode_each(
        self, cases: Sequence[BraTSCase], decode: Callable[[int, BraTSCase], Any]
    ) -> dict[str, str]:
        """``decode(i, case)`` for every case; {case id: message} of the bad ones (MONAI wraps a DataError)."""
        bad = {}
        for i, case in enumerate(cases):
            try:
                decode(i, case)
            except Exception as e:
                if (err := _data_error(e)) is None:
                    raise
                bad[case.case_id] = str(err)
        return bad

    def setup(self, stage: str | None = None) -> None:
        """Discover, validate and split (once); later calls are no-ops."""
        if self._cases is not None:
            return
        cases, errors = self._discover()
        bad: dict[str, str] = {cid: str(e) for cid, e in errors.items()}

        def keep(_: int, case: BraTSCase) -> None:
            self._decoded[case.case_id] = self._decode(self._case_dict(case))

        if self.cache == "memory":
            bad.update(self._decode_each(cases, keep))
        elif self.cache == "disk":
            pending = []
            for case in cases:
                if (err := self._error_file(self._cache_key(case))).is_file():
                    bad[case.case_id] = read_json_object(err, "MRI cache error record", DataError)["error"]
                elif not self._on_disk(case):
                    pending.append(case)
            ds = self._persistent(pending)  # prepare_data was not run (plain use outside a Trainer)
            bad.update(self._decode_each(pending, lambda i, _: ds[i]))
        elif self.verify:
            bad.update(self._decode_each(cases, lambda _, c: self._decode(self._case_dict(c))))
        if bad and self.on_error == "error":
            lines = "\n  ".join(bad[c] for c in sorted(bad))
            raise DataError(
                f"{len(bad)} bad BraTS case(s) under {self.root} (set on_error=skip to skip them):\n  {lines}"
            )
        for cid in sorted(bad):
            log.warning("skipping case %s: %s", cid, bad[cid])
        self.skipped_cases = dict(sorted(bad.items()))
        # split over every labelled case folder found (bad ones included), so that skipping a
        # broken case does not move the other patients between splits
        all_ids = sorted({c.case_id for c in cases} | set(errors))
        labelled = [c.case_id for c in cases if c.has_label] + [cid for cid in errors if self.require_label]
        labelled = sorted(set(labelled))
        patients = [self.reader.patient_id(c) for c in labelled]
        idx = (
            patient_split(patients, self.val_fraction, self.test_fraction, self.seed)
            if labelled
            else {"train": [], "val": [], "test": []}
        )
        good = {c.case_id for c in cases} - set(bad)
        self._splits = {
            s: [labelled[i] for i in idx[s] if labelled[i] in good] for s in ("train", "val", "test")
        }
        self._splits["all"] = [c for c in all_ids if c in good]
        self._splits["predict"] = list(self._splits["all"])
        self._cases = [c for c in cases if c.case_id in good]
        log.info(
            "BraTS %s: %d cases (train %d, val %d, test %d, skipped %d)",
            self.root,
            len(self._cases),
            len(self._splits["train"]),
            len(self._splits["val"]),
            len(self._splits["test"]),
            len(bad),
        )

    # ------------------------------------------------------------------ datasets and loaders
    def dataset(self, split: str) -> CaseDataset:
        """The dataset of a split (train: random patches; others: whole volumes)."""
        self._require_setup()
        if split not in self._datasets:
            ids = self.split_case_ids(split)
            by_id = {c.case_id: c for c in self._cases or []}
            cases = [by_id[c] for c in ids]
            if split == "train":
                transform = build_train_transform(
                    self.patch_size, self.pos_neg_ratio, self.samples_per_volume, self.augment
                )
            else:
                transform = build_eval_transform()
            if self.cache == "memory":
                decoded: Any = [self._decoded[c.case_id] for c in cases]
            elif self.cache == "disk":
                decoded = self._persistent(cases)
            else:
                decoded = MonaiDataset([self._case_dict(c) for c in cases], transform=self._decode)
            self._datasets[split] = CaseDataset(decoded, transform, seed=self.seed)
        return self._datasets[split]

    def train_dataloader(self) -> DataLoader:
        ds = self.dataset("train")
        if len(ds) == 0:
            raise DataError(
                f"no labelled training cases under {self.root} (found {len(self.split_case_ids('all'))} "
                f"usable cases; skipped {len(self.skipped_cases)})"
            )
        return self._loader(ds, self.batch_size, shuffle=True)

    def _loader(self, ds: CaseDataset, batch_size: int, shuffle: bool) -> DataLoader:
        return make_loader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=self.seed,
            trainer=getattr(self, "trainer", None),
            num_workers=self.num_workers,
            collate_fn=list_data_collate,
            pin_memory=self.pin_memory,
        )

    def _eval_loader(self, split: str) -> DataLoader:
        """Whole volumes in case order; under DDP each rank takes every world-th case, none twice,
        so metrics summed across ranks (`BraTSSegmentationMetrics`) are exact means over the split.

        Under DDP every rank also runs the same number of batches: Lightning skips the evaluation
        hooks on a rank without batches, and the collectives of the other ranks' epoch end would then
        hang. A rank with fewer cases repeats one, flagged ``is_padding=True``; models skip such items.
        """
        ds = self.dataset(split)
        trainer = getattr(self, "trainer", None)
        world = int(trainer.world_size) if trainer is not None else 1
        rank = int(trainer.global_rank) if trainer is not None else 0
        own = list(range(rank, len(ds), world))
        view: Dataset = ds
        if world > 1 and len(ds) > 0:
            per_rank = -(-len(ds) // world)
            pads = [own[0] if own else 0] * (per_rank - len(own))
            view = _FlaggedItems(ds, [*own, *pads], [False] * len(own) + [True] * len(pads))
            own = list(range(per_rank))
        return DataLoader(
            view,
            batch_size=self.val_batch_size,
            sampler=own,
            num_workers=self.num_workers,
            collate_fn=list_data_collate,
            pin_memory=self.pin_memory,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("predict")

    # ------------------------------------------------------------------ internals
    def _require_setup(self) -> None:
        if self._cases is None:
            raise RuntimeError("BraTSDataModule.setup() has not been called")

    def _discover(self) -> tuple[list[BraTSCase], dict[str, DataError]]:
        return self.reader.list_cases(self.root, self._modalities, self.require_label)

    def _case_dict(self, case: BraTSCase) -> dict[str, Any]:
        d: dict[str, Any] = {
            "case_id": case.case_id,
            "image_files": [str(p) for p in case.image_files],
            "modalities": list(case.modalities),
            "cache_key": self._cache_key(case),
        }
        if case.label_file is not None:
            d["label_file"] = str(case.label_file)
        if case.mask_file is not None:
            d["mask_file"] = str(case.mask_file)
        return d

    def _cache_key(self, case: BraTSCase) -> str:
        """Changes whenever a file or the decode configuration changes, so a stale cache is never read."""
        record = {
            "format": _CACHE_FORMAT,
            **self.reader.fingerprint(case),
            "crop": [self.crop_foreground, self.crop_margin],
        }
        return f"{case.case_id}-{sha256_json(record)[:32]}"

    def _persistent(self, cases: Sequence[BraTSCase]) -> PersistentDataset:
        return PersistentDataset(
            [self._case_dict(c) for c in cases],
            transform=self._decode,
            cache_dir=self.cache_dir,
            hash_func=_cache_hash,
        )

    def _on_disk(self, case: BraTSCase) -> bool:
        return (self.cache_dir / f"{self._cache_key(case)}.pt").is_file()

    def _error_file(self, key: str) -> Path:
        return self.cache_dir / f"{key}.error.json"

    def _write_error(self, key: str, message: str) -> None:
        from medens.utils.jsonio import write_json_strict

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        write_json_strict(self._error_file(key), {"error": message}, indent=None)
