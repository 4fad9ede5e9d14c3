"""The inference endpoint as a client uses it: `scripts/serve.py` started as a process, spoken to over HTTP.

A module fixture takes the session's tiny X-ray, CT and MRI models (`tiny_models`: one epoch each), exports
them (TorchScript, ONNX), stacks them into an ensemble export, and runs `scripts/evaluate.py` on the X-ray
model; every test then talks to real servers.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import PYTHON, ROOT, cli_ok, copy_root, run_cli
from tests.servers import AWS_TEST_ENV, ServeProcess, free_port, stop

pytest.importorskip("fastapi", reason="the serve extra is not installed")

TARGETS = ["xray_torchscript", "ct_onnx", "mri_torchscript"]


# ----------------------------------------------------------------------------------------------- fixtures
def _fake_meta_learner(root: Path) -> Path:
    """A meta-learner checkpoint over the three tiny base models (untrained MLP: the stacking stage has
    its own tests; here only the served ensemble must equal the traced one)."""
    from medens.checkpoint.io import CHECKPOINT_FORMAT, atomic_torch_save
    from medens.ensemble.base_models import MRI_FEATURES
    from medens.models.meta_learner import StackingMLP
    from medens.utils.hashing import sha256_file

    sm = root / "saved_models"
    bases = {
        "xray": sm / "xray" / "resnet18_best.pth",
        "ct": sm / "ct" / "3dcnn_best.pth",
        "mri": sm / "mri" / "unet_best.pth",
    }
    xray_labels = torch.load(bases["xray"], weights_only=True)["hyperparameters"]["io_contract"][
        "label_names"
    ]
    names = [f"xray.{n}" for n in xray_labels] + ["ct.malignancy"] + [f"mri.{n}" for n in MRI_FEATURES]
    torch.manual_seed(0)
    mlp = StackingMLP(len(names) + 3, 2, (16, 8), 0.0)
    path = sm / "ensemble" / "meta_learner.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    contract = {
        "modality": "ensemble", "targets": ["malignancy", "progression"], "feature_names": names,
        "feature_mean": [0.1] * len(names), "feature_std": [0.5] * len(names),
        "base_checkpoints": {m: {"path": str(p), "sha256": sha256_file(p)} for m, p in bases.items()},
    }  # fmt: skip
    atomic_torch_save(
        {"format": CHECKPOINT_FORMAT, "epoch": 1, "model_state_dict": mlp.state_dict(), "optimizer_state_dict": None,
         "scheduler_state_dict": None, "train_loss": 0.6, "val_loss": 0.6, "val_auc": 0.5, "best_metric": 0.5,
         "monitor": "val/auc", "timestamp": "2026-01-01T00:00:00+00:00",
         "hyperparameters": {"modality": "ensemble", "model": {"net": {"hidden": [16, 8], "dropout": 0.0}},
                             "data": {}, "io_contract": contract}},
        path,
    )  # fmt: skip
    return path


def build_served_root(root: Path) -> Path:
    """The session's tiny trained models (copied into `root`), their exports (+ the ensemble) and an X-ray
    evaluation."""
    env = {"OMP_NUM_THREADS": "1"}
    _fake_meta_learner(root)
    cli_ok(run_cli("export.py", f"targets=[{','.join(TARGETS)},ensemble_traced]",
                   "checkpoints.xray=${paths.saved_models_dir}/xray/resnet18_best.pth", root=root, env=env))  # fmt: skip
    cli_ok(run_cli("evaluate.py", "ckpt_path=saved_models/xray/resnet18_best.pth", "split=test",
                   "bootstrap.n_resamples=20", "report_html=false", "hydra.run.dir=outputs/eval_xray",
                   root=root, env=env))  # fmt: skip
    return root


@pytest.fixture(scope="module")
def served_root(tiny_models: Path, tmp_path_factory) -> Path:
    return build_served_root(copy_root(tiny_models, tmp_path_factory.mktemp("serve")))


def multipart(files: dict[str, bytes], fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for k, v in (fields or {}).items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for k, v in files.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{k}.nii.gz"\r\n'
                  "Content-Type: application/octet-stream\r\n\r\n".encode())  # fmt: skip
        out.write(v + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def servers(served_root: Path):
    started = {
        m: ServeProcess(served_root, f"model={m}", "max_body_mb=2") for m in ("xray", "ct", "mri", "ensemble")
    }
    try:
        yield {m: s.wait() for m, s in started.items()}
    finally:
        for s in started.values():
            s.stop()


# ----------------------------------------------------------------------------------------------- inputs
def xray_images(root: Path) -> pd.DataFrame:
    """evaluate.py's per-image predictions, with the image file of each."""
    pred = pd.read_csv(root / "outputs" / "eval_xray" / "predictions.csv")
    files = {p.name: p for p in (root / "data").rglob("*.png")}
    pred["path"] = [files[c] for c in pred["case_id"]]
    return pred


def ct_scan(root: Path) -> tuple[bytes, tuple[float, float, float]]:
    """A synthetic LUNA16 scan as NIfTI bytes and the world-mm centre of its first nodule."""
    import SimpleITK as sitk

    ann = next((root / "data").rglob("annotations.csv"))
    row = pd.read_csv(ann).iloc[0]
    mhd = next(p for p in ann.parent.rglob(f"{row['seriesuid']}.mhd"))
    out = root / "scan.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(mhd)), str(out))
    return out.read_bytes(), (float(row["coordX"]), float(row["coordY"]), float(row["coordZ"]))


def mri_files(root: Path) -> tuple[Path, dict[str, bytes]]:
    case = sorted(p for p in (root / "data").rglob("*_flair.nii*"))[0].parent
    files = {}
    for mod in ("t1", "t1ce", "t2", "flair"):
        files[mod] = next(case.glob(f"*_{mod}.nii*")).read_bytes()
    return case, files


# ----------------------------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_ping_and_info(servers):
    for model, s in servers.items():
        status, body = s.get("/ping")
        assert status == 200 and body["model"] == model and body["version"] == "unversioned"
        assert len(body["sha256"]) == 64
    _, info = servers["xray"].get("/info")
    assert info["export"] == "xray_torchscript" and info["label_names"][0] == "Atelectasis"
    assert servers["ct"].get("/info")[1]["export"] == "ct_onnx"


@pytest.mark.slow
def test_xray_prediction_equals_evaluate(servers, served_root):
    pred = xray_images(served_root)
    names = servers["xray"].get("/info")[1]["label_names"]
    for _, row in pred.head(3).iterrows():
        status, body = servers["xray"].post(row["path"].read_bytes(), "image/png")
        assert status == 200, body
        assert body["label_names"] == names and body["model_name"] == "resnet18"
        expected = [row[f"prob_{n}"] for n in names]
        np.testing.assert_allclose(body["probabilities"], expected, atol=2e-5)
    # any size, RGB, JPEG: decoded to greyscale like the training images
    from PIL import Image

    im = Image.open(pred["path"].iloc[0]).convert("RGB").resize((97, 61))
    buf = io.BytesIO()
    im.save(buf, format="JPEG")
    status, body = servers["xray"].post(buf.getvalue(), "image/jpeg")
    assert status == 200 and len(body["probabilities"]) == 14


@pytest.mark.slow
def test_ct_prediction_from_scan_and_centre(servers, served_root):
    data, centre = ct_scan(served_root)
    x, y, z = centre
    status, body = servers["ct"].post(data, "application/gzip", f"?x={x}&y={y}&z={z}")
    assert status == 200, body
    assert body["label_names"] == ["malignant"] and 0.0 < body["probabilities"][0] < 1.0
    # offline: the same patch through the checkpoint's own network (eager PyTorch)
    from medens.serving.preprocess import ct_tensor

    contract = json.loads((served_root / "saved_models/exports/manifest.json").read_text())["exports"][
        "ct_onnx"
    ]["io_contract"]
    patch = ct_tensor(data, contract, centre)
    ckpt = torch.load(served_root / "saved_models/ct/3dcnn_best.pth", weights_only=True)
    from monai.networks.nets import resnet18

    net = resnet18(**{k: v for k, v in ckpt["hyperparameters"]["model"]["net"].items() if k != "_target_"})
    net.load_state_dict(ckpt["model_state_dict"])
    with torch.no_grad():
        p = torch.sigmoid(net.eval()(patch[None]))[0, 0].item()
    assert body["probabilities"][0] == pytest.approx(p, abs=1e-4)
    # a pre-cropped nodule volume (no centre) as multipart
    body2, ctype = multipart({"ct": data})
    status, out = servers["ct"].post(body2, ctype)
    assert status == 200 and len(out["probabilities"]) == 1


@pytest.mark.slow
def test_mri_segmentation_equals_offline_sliding_window(servers, served_root):
    case, files = mri_files(served_root)
    body, ctype = multipart(files)
    status, out = servers["mri"].post(body, ctype, "?segmentation=true")
    assert status == 200, out
    assert out["label_names"][0] == "background" and sum(out["voxels"].values()) == int(np.prod(out["shape"]))
    seg = gzip.decompress(base64.b64decode(out["segmentation_nifti_gz_base64"]))
    status, raw = servers["mri"].post(body, ctype, "?output=nifti")
    assert status == 200 and gzip.decompress(raw) == seg
    import nibabel as nib

    served = np.asarray(nib.Nifti1Image.from_bytes(seg).dataobj)
    # offline: evaluation's model (Lightning module, eager U-Net, its own sliding-window inferer)
    from medens.evaluation.evaluate import build_from_checkpoint
    from medens.serving.preprocess import mri_case, segmentation_nifti

    ckpt = torch.load(served_root / "saved_models/mri/unet_best.pth", weights_only=True)
    model, _, hyper = build_from_checkpoint(ckpt, "unet_best.pth")
    image, decoded = mri_case(files, hyper["io_contract"])
    assert model.tta_flips and model.active_postprocess() is not None  # the recipe of experiment=mri
    entry = json.loads((served_root / "saved_models/exports/manifest.json").read_text())["exports"]["mri_torchscript"]
    assert entry["inference"]["tta_flips"] is True and entry["inference"]["postprocess"] == ckpt["postprocess"]
    with torch.no_grad():  # mirrored sliding window, then the postprocessing chosen on validation
        pred = model.eval().predict_logits(image[None]).argmax(1)
        labels = model.postprocessed(pred, image[None])[0].numpy().astype(np.uint8)
    offline = np.asarray(
        nib.Nifti1Image.from_bytes(
            gzip.decompress(segmentation_nifti(labels, decoded, hyper["io_contract"]))
        ).dataobj
    )
    assert served.shape == offline.shape and (served == offline).mean() > 0.999


@pytest.mark.slow
def test_ensemble_with_a_missing_modality(servers, served_root):
    from PIL import Image  # noqa: F401

    pred = xray_images(served_root)
    _, files = mri_files(served_root)
    ct_data, (x, y, z) = ct_scan(served_root)
    xray = pred["path"].iloc[0].read_bytes()
    full, ctype = multipart({"xray": xray, "ct": ct_data, **files}, {"x": str(x), "y": str(y), "z": str(z)})
    status, all3 = servers["ensemble"].post(full, ctype)
    assert status == 200, all3
    assert all3["label_names"] == ["malignancy", "progression"] and all3["modalities_present"] == [
        "xray",
        "ct",
        "mri",
    ]
    body, ctype = multipart({"xray": xray})
    status, one = servers["ensemble"].post(body, ctype)
    assert status == 200 and one["modalities_present"] == ["xray"]
    assert one["probabilities"] != all3["probabilities"]
    # the served answer is the traced ensemble on the documented inputs (zeros + present=0 when missing)
    from medens.serving.preprocess import xray_tensor

    manifest = json.loads((served_root / "saved_models/exports/manifest.json").read_text())["exports"][
        "ensemble_traced"
    ]
    ens = torch.jit.load(str(served_root / "saved_models/exports/ensemble_traced.pt"))
    shapes = {i["name"]: i["shape"][1:] for i in manifest["inputs"]}
    xt = xray_tensor(xray, manifest["base_models"]["xray"]["io_contract"])
    with torch.no_grad():
        ref = ens(
            xt[None],
            torch.zeros(1, *shapes["ct"]),
            torch.zeros(1, *shapes["mri"]),
            torch.tensor([[1.0, 0.0, 0.0]]),
        )
    np.testing.assert_allclose(one["probabilities"], ref[0].numpy(), atol=1e-5)


@pytest.mark.slow
def test_bad_inputs_are_4xx_naming_the_problem_and_the_server_keeps_serving(servers, served_root):
    xr, ct, mri = servers["xray"], servers["ct"], servers["mri"]
    png = xray_images(served_root)["path"].iloc[0].read_bytes()
    cases = [
        (xr, b"this is not an image", "image/png", "", 400, "not a decodable image"),
        (xr, b"", "image/png", "", 400, "empty request body"),
        (xr, png, "text/plain", "", 415, "Content-Type 'text/plain' is not accepted"),
        (xr, png, None, "", 415, "Content-Type"),
        (xr, b"x" * (3 << 20), "image/png", "", 413, "over the limit"),
        (xr, png, "image/png", "?version=9.9.9", 404, "version 9.9.9 is not served here"),
        (ct, b"\x00" * 1000, "application/octet-stream", "", 400, "not a NIfTI file"),
        (ct, gzip.compress(b"\x00" * 1000), "application/gzip", "", 400, "not a NIfTI file"),
        (ct, _nifti(np.zeros((8, 8), np.float32)), "application/octet-stream", "", 400, "expected a 3-D"),
        (ct, _nifti(np.zeros((20, 20, 20), np.float32)), "application/octet-stream", "?x=1&y=2", 400, "give all of x, y, z"),
        (ct, _nifti(np.zeros((20, 20, 20), np.float32)), "application/octet-stream", "?x=900&y=0&z=0", 400, "outside the scan"),
    ]  # fmt: skip
    _, files = mri_files(served_root)
    no_flair, ctype = multipart({k: v for k, v in files.items() if k != "flair"})
    cases.append((mri, no_flair, ctype, "", 400, "missing modality flair"))
    bad_shape, ctype = multipart({**files, "flair": _nifti(np.ones((9, 9, 9), np.float32))})
    cases.append((mri, bad_shape, ctype, "", 400, "has shape (9, 9, 9)"))
    cases.append((mri, png, "image/png", "", 415, "multipart/form-data"))
    for server, body, ctype, query, status, message in cases:
        got, answer = server.post(body, ctype, query)
        assert got == status and message in answer["error"], (message, got, answer)
        assert server.get("/ping")[0] == 200  # still serving
    assert xr.post(png, "image/png")[0] == 200


def _nifti(arr: np.ndarray) -> bytes:
    import nibabel as nib

    return nib.Nifti1Image(arr, np.eye(4)).to_bytes()


@pytest.mark.slow
def test_startup_refuses_unknown_version_and_a_tampered_export(served_root, tmp_path):
    from medens.serving.models import ServeError, resolve_bundle

    sm = served_root / "saved_models"
    with pytest.raises(ServeError, match="version 9.9.9 of the xray model does not exist locally"):
        resolve_bundle("xray", "9.9.9", sm, sm / "exports")
    # a pulled version whose export no longer matches its manifest's SHA-256
    exports = served_root / "saved_models/exports"
    folder = served_root / "saved_models/xray/resnet18_v1.0.0_exports"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_bytes((exports / "manifest.json").read_bytes())
    (folder / "xray_torchscript.pt").write_bytes((exports / "xray_torchscript.pt").read_bytes() + b"tampered")
    proc = run_cli("serve.py", "model=xray", "version=1.0.0", "port=1", root=served_root, timeout=120)
    assert proc.returncode != 0 and "SHA-256 mismatch" in proc.stderr and "xray_torchscript.pt" in proc.stderr


@pytest.mark.slow
def test_version_pulled_from_the_store_and_a_tampered_store_object_refused(
    served_root, tmp_path, monkeypatch
):
    """serve.py version=X store.enabled=true pulls the published version (exports included) from a real S3
    server; an object whose bytes no longer match the commit marker's SHA-256 refuses start-up."""
    pytest.importorskip("moto")
    from medens.registry import promote_checkpoint
    from medens.registry.object_store import MARKER_NAME, ModelStore, StoreSettings
    from tests.servers import make_bucket, moto_server, s3_client

    root = tmp_path / "root"
    (root / "saved_models").mkdir(parents=True)
    for sub in ("xray", "exports"):
        src = served_root / "saved_models" / sub
        (root / "saved_models" / sub).mkdir()
        for f in src.iterdir():
            if f.is_file():
                (root / "saved_models" / sub / f.name).write_bytes(f.read_bytes())
    res = promote_checkpoint(root / "saved_models/xray/resnet18_best.pth", version="1.2.0")
    with moto_server(tmp_path) as s3:
        for key, value in AWS_TEST_ENV.items():
            monkeypatch.setenv(key, value)
        make_bucket(s3["url"], "models")
        store = ModelStore(StoreSettings(bucket="models", endpoint_url=s3["url"], addressing_style="path"))
        sv = store.push(res.path, root / "saved_models/exports")
        assert sv.marker["exports"] == ["xray_torchscript"]
        env = {**AWS_TEST_ENV, "AWS_ENDPOINT_URL": s3["url"]}
        store_args = ["store.enabled=true", "store.bucket=models", "store.addressing_style=path"]
        server = ServeProcess(root, "model=xray", "version=1.2.0", *store_args, env=env).wait()
        try:
            _, ping = server.get("/ping")
            assert (
                ping["version"] == "1.2.0" and ping["source"] == "store" and ping["model_name"] == "resnet18"
            )
            png = xray_images(served_root)["path"].iloc[0].read_bytes()
            assert server.post(png, "image/png")[0] == 200
        finally:
            server.stop()
        assert (root / "saved_models/xray/resnet18_v1.2.0_exports/xray_torchscript.pt").is_file()
        # tamper: the published export's recorded digest no longer matches; a fresh host must refuse it
        client = s3_client(s3["url"])
        key = sv.prefix + MARKER_NAME
        marker = json.loads(client.get_object(Bucket="models", Key=key)["Body"].read())
        for o in marker["objects"]:
            if o["name"] == "exports/xray_torchscript.pt":
                o["sha256"] = "0" * 64
        client.put_object(Bucket="models", Key=key, Body=json.dumps(marker).encode())
        fresh = tmp_path / "fresh"
        (fresh / "saved_models").mkdir(parents=True)
        proc = run_cli(
            "serve.py", "model=xray", "version=1.2.0", "port=1", *store_args, root=fresh, env=env, timeout=120
        )
        assert (
            proc.returncode != 0
            and "SHA-256 mismatch" in proc.stderr
            and "xray_torchscript.pt" in proc.stderr
        )
        assert not (fresh / "saved_models/xray/resnet18_v1.2.0_exports").exists()
        from medens.serving.models import ServeError, resolve_bundle

        with pytest.raises(ServeError, match="version 3.0.0 of the xray model does not exist in the store"):
            resolve_bundle("xray", "3.0.0", fresh / "saved_models", fresh / "exports", store)


def test_dynamic_batcher_groups_concurrent_requests_by_shape():
    import asyncio

    from medens.serving.batching import DynamicBatcher

    seen: list[tuple] = []

    def run(key, items):
        seen.append((key, len(items)))
        if key == "boom":
            raise ValueError("bad batch")
        return [x * 10 for x in items]

    batcher = DynamicBatcher(run, max_batch_size=4, max_wait_ms=300)

    async def main():
        jobs = [batcher.submit("a", i) for i in range(6)] + [batcher.submit("b", 100)]
        return await asyncio.gather(*jobs)

    try:
        assert asyncio.run(main()) == [0, 10, 20, 30, 40, 50, 1000]
        assert sorted(n for k, n in seen if k == "a") == [2, 4] and ("b", 1) in seen  # shapes never mixed

        async def failing():
            return await batcher.submit("boom", 1)

        with pytest.raises(ValueError, match="bad batch"):
            asyncio.run(failing())
        assert batcher.stats()["requests"] == 8
    finally:
        batcher.close()


@pytest.mark.slow
def test_concurrent_requests_are_batched_and_answered_like_single_ones(servers, served_root):
    from concurrent.futures import ThreadPoolExecutor

    paths = list(xray_images(served_root)["path"].head(6))
    single = [servers["xray"].post(p.read_bytes(), "image/png")[1]["probabilities"] for p in paths]
    before = servers["xray"].get("/stats")[1]
    with ThreadPoolExecutor(len(paths)) as pool:
        answers = list(pool.map(lambda p: servers["xray"].post(p.read_bytes(), "image/png"), paths))
    assert all(status == 200 for status, _ in answers)
    for (_, body), ref in zip(answers, single, strict=True):
        np.testing.assert_allclose(body["probabilities"], ref, atol=1e-5)
    after = servers["xray"].get("/stats")[1]
    assert after["requests"] - before["requests"] == len(paths)
    assert after["batches"] - before["batches"] < len(paths)  # some requests shared a forward pass


def test_load_benchmark_times_the_served_forward_pass_per_batch_size(served_root):
    """serve-load's ceiling: the served export's own `run_batch`, per image, at each batch size."""
    from medens.serving.loadtest import forward_ms_per_image

    forward = forward_ms_per_image(served_root, [1, 4, 4, 1], threads=1)
    assert sorted(forward) == [1, 4]
    assert all(np.isfinite(v) and v > 0 for v in forward.values()), forward


def test_served_probabilities_apply_the_manifest_calibration():
    """The calibration evaluation fitted (recorded in the export manifest) is applied by serving too."""
    import numpy as np

    from medens.evaluation.calibration import apply_calibration
    from medens.serving.models import ServedModel

    served = ServedModel.__new__(ServedModel)  # the loaded export is not needed for this step
    served.label_names = ["Mass", "Nodule"]
    probs = np.array([[0.2, 0.7], [0.9, 0.1]])
    served.entry = {"calibration": None}
    assert np.array_equal(served._calibrated(probs), probs)
    cal = {"method": "platt", "outputs": {"Mass": {"scale": 0.5, "bias": -0.3}}}
    served.entry = {"calibration": cal}
    out = served._calibrated(probs)
    z = np.log(0.2 / 0.8) * 0.5 - 0.3
    assert np.isclose(out[0, 0], 1 / (1 + np.exp(-z))) and np.array_equal(out[:, 1], probs[:, 1])
    assert np.array_equal(out, apply_calibration(probs, cal, ["Mass", "Nodule"]))


def test_served_mri_probabilities_apply_the_manifest_temperature_and_keep_the_label_map():
    """The MRI softmax temperature evaluation fitted (export manifest) scales the served probabilities;
    the label map (argmax) is the uncalibrated one."""
    from medens.serving.app import _mri_response
    from medens.serving.models import ServedModel

    served = ServedModel.__new__(ServedModel)
    served.label_names = ["background", "necrotic_core", "edema", "enhancing"]
    served.io_contract = {"regions": {"wt": [1, 2, 3]}}
    served.inference = {}  # no postprocessing recorded: the label map is the argmax
    logits = np.random.default_rng(0).normal(scale=3.0, size=(4, 5, 5, 4)).astype(np.float32)
    decoded = {"spacing": [1.0, 1.0, 1.0]}
    answers = {}
    for t in (None, 2.0):
        served.entry = {"calibration": None if t is None else
                        {"method": "temperature", "kind": "softmax_temperature", "temperature": t}}  # fmt: skip
        answers[t] = _mri_response(served, logits, decoded, {}, 0.0, lambda r, s: r)
    expected = torch.softmax(torch.from_numpy(logits) / 2.0, 0).mean(dim=(1, 2, 3)).numpy()
    np.testing.assert_allclose(list(answers[2.0]["mean_probability"].values()), expected, rtol=1e-5)
    assert answers[2.0]["voxels"] == answers[None]["voxels"]  # same label map
    assert answers[2.0]["mean_probability"] != answers[None]["mean_probability"]


@pytest.mark.slow
def test_sagemaker_serve_entrypoint_starts_the_server_from_the_model_dir(served_root, tmp_path):
    """`docker run <image> serve`: docker/serve reads SM_MODEL_DIR (the export folder), infers the model
    from its manifest, binds SAGEMAKER_BIND_TO_PORT and answers /ping and /invocations."""
    import shutil

    model_dir = tmp_path / "opt_ml_model"  # an archive with the X-ray export only, as SageMaker unpacks it
    model_dir.mkdir()
    manifest = json.loads((served_root / "saved_models" / "exports" / "manifest.json").read_text())
    manifest["exports"] = {"xray_torchscript": manifest["exports"]["xray_torchscript"]}
    (model_dir / "manifest.json").write_text(json.dumps(manifest))
    shutil.copy(served_root / "saved_models" / "exports" / manifest["exports"]["xray_torchscript"]["file"], model_dir)
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "SM_MODEL_DIR": str(model_dir), "SAGEMAKER_BIND_TO_PORT": str(port),
           "MEDENS_SERVE_THREADS": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}  # fmt: skip
    env.pop("MEDENS_MODEL", None)
    with open(log, "w") as fh:
        proc = subprocess.Popen([PYTHON, str(ROOT / "docker" / "serve"), "serve"], cwd=tmp_path, stdout=fh,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)  # fmt: skip
    server = ServeProcess.__new__(ServeProcess)
    server.port, server.url, server.log, server.proc = port, f"http://127.0.0.1:{port}", log, proc
    try:
        server.wait()
        status, body = server.get("/ping")
        assert status == 200 and body["model"] == "xray" and body["export"] == "xray_torchscript"
        image = xray_images(served_root)["path"].iloc[0].read_bytes()
        status, body = server.post(image, "image/png")
        assert status == 200 and len(body["probabilities"]) == len(body["label_names"]) == 14
    finally:
        stop(proc)
    empty = tmp_path / "empty"
    empty.mkdir()
    res = subprocess.run([PYTHON, str(ROOT / "docker" / "serve")], env={**env, "SM_MODEL_DIR": str(empty)},
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode != 0 and f"{empty}/manifest.json not found" in res.stderr
