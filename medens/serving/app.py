"""The HTTP server: FastAPI + uvicorn, SageMaker inference-container contract.

- `GET /ping`: 200 once the model is loaded (503 before), as SageMaker's health check expects.
- `POST /invocations`: one case per request.
    xray      `Content-Type: image/png | image/jpeg` (raw body), or multipart field `xray` / `image`
    ct        `application/octet-stream | application/gzip | application/x-nifti` (a .nii/.nii.gz volume:
              a pre-cropped nodule volume, or a scan with `?x=&y=&z=` world-mm centre, `&diameter_mm=`),
              or multipart field `ct` (+ fields `x`, `y`, `z`, `diameter_mm`)
    mri       multipart, one NIfTI field per modality the model needs (`t1`, `t1ce`, `t2`, `flair`; BraTS
              2023 names `t1n`, `t1c`, `t2w`, `t2f` too); `?segmentation=true` adds the label map as
              base64 .nii.gz, `?output=nifti` answers with the .nii.gz itself
    ensemble  multipart with whichever of `xray`, `ct` (+ `x`, `y`, `z`), the MRI modalities the patient has
  Answers JSON: model name, version, SHA-256 of the served export, label names in the model's order and
  probabilities (MRI: per-class volumes). Bad input is a 4xx JSON `{"error": ...}` naming the problem.
- `GET /info`: what is served; `GET /stats`: batching counters.
Why FastAPI + uvicorn rather than LitServe: both are installed with the `serve` extra and small; FastAPI
validates multipart and headers explicitly and gives full control over error statuses and messages,
while LitServe is not installed here and pulls in more of the Lightning stack than an inference path needs.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from medens.errors import DataError
from medens.serving.batching import DynamicBatcher
from medens.serving.models import ServedModel
from medens.serving.preprocess import (
    InputError,
    ct_tensor,
    mri_case,
    pad_to_multiple,
    parse_centre,
    segmentation_nifti,
    xray_tensor,
)

log = logging.getLogger(__name__)

IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg")
NIFTI_TYPES = ("application/octet-stream", "application/gzip", "application/x-gzip", "application/x-nifti",
               "application/nifti", "image/nifti")  # fmt: skip
MRI_ALIASES = ("t1", "t1ce", "t2", "flair", "t1n", "t1c", "t2w", "t2f")


def create_app(served: ServedModel, settings: Mapping[str, Any]) -> FastAPI:
    """The FastAPI application around one loaded model."""

    max_bytes = int(float(settings.get("max_body_mb", 64)) * (1 << 20))
    batcher = DynamicBatcher(
        served.run_batch, int(settings.get("max_batch_size", 8)), float(settings.get("max_wait_ms", 5))
    )
    app = FastAPI(title="medens inference", version=served.bundle.version)
    app.state.served = served
    app.state.batcher = batcher

    @app.exception_handler(InputError)
    async def _bad_input(request: Request, exc: InputError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(DataError)
    async def _bad_data(request: Request, exc: DataError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.get("/ping")
    async def ping() -> Response:
        return JSONResponse({"status": "ok", **served.describe()})

    @app.get("/info")
    async def info() -> Response:
        return JSONResponse({**served.describe(), "io_contract": served.io_contract,
                             "inference": served.inference, "batching": dict(settings)})  # fmt: skip

    @app.get("/stats")
    async def stats() -> Response:
        return JSONResponse(batcher.stats())

    @app.on_event("shutdown")
    async def _close() -> None:
        batcher.close()

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            if int(length) <= 4 * max_bytes:
                # read (and drop) a moderately oversized body first: answering before the client has sent
                # it makes the client fail on a broken pipe instead of reading the 413
                async for _ in request.stream():
                    pass
            raise InputError(f"request body of {int(length)} bytes is over the limit of {max_bytes} bytes "
                             "(max_body_mb)", 413)  # fmt: skip
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise InputError(f"request body is over the limit of {max_bytes} bytes (max_body_mb)", 413)
            chunks.append(chunk)
        body = b"".join(chunks)
        if not body:
            raise InputError("empty request body")
        return body

    async def parts(request: Request, body: bytes, ctype: str) -> tuple[dict[str, bytes], dict[str, str]]:
        """Files and plain fields of a multipart body (parsed from the bytes already read and size-checked)."""
        from starlette.datastructures import UploadFile
        from starlette.requests import Request as StarletteRequest

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        inner = StarletteRequest(request.scope, receive)
        try:
            form = await inner.form(max_files=32, max_fields=64)
        except Exception as exc:
            raise InputError(f"malformed multipart body: {exc}") from exc
        files, fields = {}, {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                files[key.lower()] = await value.read()
            else:
                fields[key.lower()] = str(value)
        return files, fields

    def respond(result: dict[str, Any], started: float) -> JSONResponse:
        result.update(served.describe())
        result["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
        return JSONResponse(result)

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        started = time.perf_counter()
        want = request.query_params.get("version")
        if want and want != served.bundle.version:
            raise InputError(
                f"version {want} is not served here: this endpoint serves {served.name} {served.bundle.version}",
                404,
            )
        ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if not ctype:
            raise InputError("no Content-Type header: " + accepted(served.model), 415)
        body = await read_body(request)
        query = dict(request.query_params)
        if served.model == "xray":
            if ctype in IMAGE_TYPES:
                data = body
            elif ctype == "multipart/form-data":
                files, _ = await parts(request, body, ctype)
                data = files.get("xray") or files.get("image")
                if data is None:
                    raise InputError(f"multipart body has no 'xray' (or 'image') file (got {sorted(files)})")
            else:
                raise InputError(f"Content-Type {ctype!r} is not accepted: {accepted('xray')}", 415)
            x = await run_in_threadpool(xray_tensor, data, served.io_contract, "image")
            probs = await batcher.submit(("xray", tuple(x.shape)), x)
            return respond(_labelled(served.label_names, probs), started)
        if served.model == "ct":
            if ctype in NIFTI_TYPES:
                data, fields = body, query
            elif ctype == "multipart/form-data":
                files, fields = await parts(request, body, ctype)
                fields = {**query, **fields}
                data = files.get("ct") or files.get("volume")
                if data is None:
                    raise InputError(f"multipart body has no 'ct' (or 'volume') file (got {sorted(files)})")
            else:
                raise InputError(f"Content-Type {ctype!r} is not accepted: {accepted('ct')}", 415)
            centre = parse_centre(fields)
            diameter = _float(fields.get("diameter_mm"), "diameter_mm")
            x = await run_in_threadpool(ct_tensor, data, served.io_contract, centre, diameter, "ct")
            probs = await batcher.submit(("ct", tuple(x.shape)), x)
            return respond(_labelled(served.label_names or ["malignant"], probs), started)
        if ctype != "multipart/form-data":
            raise InputError(f"Content-Type {ctype!r} is not accepted: {accepted(served.model)}", 415)
        files, fields = await parts(request, body, ctype)
        fields = {**query, **fields}
        if served.model == "mri":
            image, decoded = await run_in_threadpool(mri_case, _mri_files(files), served.io_contract)
            logits = await batcher.submit(("mri", tuple(image.shape)), image)
            return await run_in_threadpool(_mri_response, served, logits, decoded, fields, started, respond)
        inputs = await run_in_threadpool(_ensemble_inputs, served, files, fields)
        key = ("ensemble", *(tuple(t.shape) for t in inputs))
        probs = await batcher.submit(key, inputs)
        result = _labelled(served.label_names, probs)
        result["modalities_present"] = [
            m for m, p in zip(("xray", "ct", "mri"), inputs[3].tolist(), strict=True) if p
        ]
        return respond(result, started)

    return app


def accepted(model: str) -> str:
    return {
        "xray": "send an image/png or image/jpeg body, or multipart/form-data with an 'xray' file",
        "ct": "send a NIfTI volume as application/octet-stream (or application/gzip), or multipart/form-data "
        "with a 'ct' file",
        "mri": "send multipart/form-data with one NIfTI file per modality",
        "ensemble": "send multipart/form-data with any of 'xray', 'ct' and the MRI modality files",
    }[model]


def _float(value: Any, name: str) -> float | None:
    if value in (None, ""):
        return None
    try:
        return float(value)
    except ValueError as exc:
        raise InputError(f"{name}={value!r} is not a number") from exc


def _labelled(names: list[str], probs: Any) -> dict[str, Any]:
    p = [float(v) for v in np.ravel(probs)]
    names = names if len(names) == len(p) else [f"output_{i}" for i in range(len(p))]
    return {"label_names": names, "probabilities": p, "predictions": dict(zip(names, p, strict=True))}


def _mri_files(files: Mapping[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k in MRI_ALIASES or k not in ("xray", "image", "ct", "volume")}


def _mri_response(
    served: ServedModel, logits: np.ndarray, decoded: Mapping[str, Any], fields: Mapping[str, str],
    started: float, respond: Any,
) -> Any:  # fmt: skip
    from medens.evaluation.voxel_calibration import temperature_of

    # the softmax temperature evaluation fitted (export manifest); argmax, so the label map, is unchanged
    temperature = temperature_of(served.entry.get("calibration"))
    probs = torch.softmax(torch.from_numpy(logits).float() / temperature, 0)
    labels = probs.argmax(0).numpy().astype(np.uint8)
    post = served.inference.get("postprocess")
    if post:  # the label-map postprocessing the checkpoint chose on validation (evaluation applies the same)
        from medens.models.mri_postprocess import brain_of, postprocess

        labels = postprocess(labels, brain_of(decoded["image"]), post).astype(np.uint8)
    spacing = np.asarray(decoded.get("spacing", [1.0, 1.0, 1.0]), dtype=np.float64)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    names = served.label_names or [f"class_{i}" for i in range(probs.shape[0])]
    counts = {n: int((labels == i).sum()) for i, n in enumerate(names)}
    regions = {
        r: int(np.isin(labels, list(c)).sum()) for r, c in (served.io_contract.get("regions") or {}).items()
    }
    result: dict[str, Any] = {
        "label_names": names,
        "voxels": counts,
        "volume_ml": {n: round(c * voxel_ml, 4) for n, c in counts.items()},
        "region_volume_ml": {r: round(c * voxel_ml, 4) for r, c in regions.items()},
        "mean_probability": {n: float(probs[i].mean()) for i, n in enumerate(names)},
        "shape": list(labels.shape),
    }
    if str(fields.get("output", "")).lower() == "nifti":
        data = segmentation_nifti(labels, decoded, served.io_contract)
        headers = {"X-Medens-Model": served.name, "X-Medens-Version": served.bundle.version,
                   "X-Medens-SHA256": served.sha256, "Content-Disposition": 'attachment; filename="segmentation.nii.gz"'}  # fmt: skip
        return Response(data, media_type="application/gzip", headers=headers)
    if str(fields.get("segmentation", "")).lower() in ("1", "true", "yes"):
        data = segmentation_nifti(labels, decoded, served.io_contract)
        result["segmentation_nifti_gz_base64"] = base64.b64encode(data).decode()
    return respond(result, started)


def _ensemble_inputs(
    served: ServedModel, files: Mapping[str, bytes], fields: Mapping[str, str]
) -> tuple[torch.Tensor, ...]:
    """(xray, ct, mri, present) for the traced ensemble: each present modality preprocessed by its base
    model's io_contract, each missing one as zeros of its input shape with 0 in `present`."""
    entry = served.entry
    bases = entry.get("base_models") or {}
    shapes = {i["name"]: [int(v) for v in i["shape"][1:]] for i in entry.get("inputs") or []}
    modalities = list(entry.get("modalities") or ["xray", "ct", "mri"])
    tensors: dict[str, torch.Tensor] = {}
    if "xray" in files or "image" in files:
        if "xray" not in bases:
            raise InputError("this ensemble has no X-ray base model; leave the 'xray' file out")
        tensors["xray"] = xray_tensor(
            files.get("xray") or files["image"], bases["xray"]["io_contract"], "xray"
        )
    if "ct" in files:
        if "ct" not in bases:
            raise InputError("this ensemble has no CT base model; leave the 'ct' file out")
        centre = parse_centre(fields) or parse_centre(fields, "ct_")
        diameter = _float(fields.get("diameter_mm") or fields.get("ct_diameter_mm"), "diameter_mm")
        tensors["ct"] = ct_tensor(files["ct"], bases["ct"]["io_contract"], centre, diameter, "ct")
    mri_files = {k: v for k, v in files.items() if k in MRI_ALIASES}
    if mri_files:
        if "mri" not in bases:
            raise InputError("this ensemble has no MRI base model; leave the MRI files out")
        image, _ = mri_case(mri_files, bases["mri"]["io_contract"])
        multiple = int((bases["mri"].get("inference") or {}).get("size_multiple") or 8)
        tensors["mri"] = pad_to_multiple(image, multiple)
    if not tensors:
        raise InputError(
            f"no modality in the request: send any of 'xray', 'ct', and MRI files ({', '.join(MRI_ALIASES[:4])}); "
            f"got {sorted(files) or 'no files'}"
        )
    present = torch.tensor([1.0 if m in tensors else 0.0 for m in modalities])
    out = []
    for m in ("xray", "ct", "mri"):
        out.append(tensors[m] if m in tensors else torch.zeros(shapes.get(m, [1])))
    return (*out, present)
