"""Promoted versions in S3-compatible object storage (AWS S3, MinIO, Ceph RGW), through boto3.

Layout of one version (`<prefix>/<modality>/<name>_v<semver>/`):

    resnet50_v1.1.0_best.pth      the versioned checkpoint (byte-identical to the local copy)
    resnet50_v1.1.0_best.json     its metadata (`medens.registry.versioning`)
    exports/<file>, exports/manifest.json
                                  the exports made from that checkpoint (same SHA-256) and their manifest
    medens-store.json             the commit marker, written LAST

A version exists in the store only when its marker does. The marker lists every object with its
SHA-256, size and the S3 VersionId that the upload created; `pull` and `verify` fetch exactly those
object versions (bucket versioning is required, so an object overwritten later never replaces what
was published) and refuse bytes whose SHA-256 differs. The marker is written with `If-None-Match: *`,
so two publishers of one version cannot both win, and a publish that dies half-way (client or server)
leaves payload objects without a marker: invisible to `list`/`pull`, replaced by the next push.

Why boto3 rather than fsspec/s3fs: the versioning calls (`get_bucket_versioning`, `VersionId` on every
read, conditional writes) are first-class in boto3 and thin wrappers over the S3 API; `TransferConfig`
gives configurable multipart uploads and ranged parallel downloads; and it is one layer (botocore)
instead of three (s3fs -> aiobotocore -> botocore), with the standard AWS credential chain
(environment, `~/.aws/credentials`, `~/.aws/config` incl. `endpoint_url`, instance roles).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medens.errors import RegistryError
from medens.registry.semver import SemVer
from medens.registry.versioning import read_metadata, split_checkpoint_name, verify_versioned
from medens.utils.hashing import sha256_file
from medens.utils.jsonio import read_json_object

log = logging.getLogger(__name__)

MARKER_NAME = "medens-store.json"
MARKER_FORMAT = "medens-store/1"
EXPORTS_DIR = "exports"
_MB = 1 << 20


class StoreError(RegistryError):
    """The object store is unreachable or misconfigured, or a stored version is missing, taken or tampered."""


@dataclass
class StoreSettings:
    """Where the store is and how to talk to it; nothing secret (credentials come from the AWS chain)."""

    bucket: str
    prefix: str = "medens"
    endpoint_url: str | None = None  # None: AWS_ENDPOINT_URL(_S3) or `endpoint_url` in ~/.aws/config
    region: str | None = None
    profile: str | None = None
    addressing_style: str = "auto"  # auto | path | virtual (MinIO/Ceph usually want path)
    versioning: str = "require"  # require | enable (turn it on when it is off)
    multipart_threshold_mb: float = 64.0
    multipart_chunksize_mb: float = 16.0
    max_concurrency: int = 8
    max_attempts: int = 3
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    conditional_marker: bool = True  # If-None-Match on the marker (S3 since 2024, MinIO, moto)

    @classmethod
    def from_config(cls, cfg: Any) -> StoreSettings:
        """From a config mapping (the `store` section of conf/store.yaml); unknown keys are ignored."""
        if cfg is None or not cfg.get("bucket"):
            raise StoreError(
                "store.bucket is not set: give the bucket to publish to, e.g. store.bucket=models"
            )
        kwargs = {k: cfg.get(k) for k in cls.__dataclass_fields__ if cfg.get(k) is not None}
        settings = cls(**kwargs)
        if settings.versioning not in ("require", "enable"):
            raise StoreError(f"store.versioning must be 'require' or 'enable', got {settings.versioning!r}")
        return settings


@dataclass
class StoredObject:
    """One object of a published version, as the marker records it."""

    name: str  # relative to the version folder
    key: str
    sha256: str
    size: int
    version_id: str
    etag: str = ""

    @property
    def multipart(self) -> bool:
        return "-" in self.etag.strip('"')


@dataclass
class StoredVersion:
    """A published version: its marker's content and where it is."""

    modality: str
    model_name: str
    version: SemVer
    prefix: str  # the version folder (key prefix ending in /)
    marker: dict[str, Any]
    objects: list[StoredObject] = field(default_factory=list)

    @property
    def checkpoint(self) -> StoredObject:
        return next(o for o in self.objects if o.name == self.marker["checkpoint"])

    @property
    def performance(self) -> dict[str, Any]:
        return dict(self.marker.get("performance") or {})


def _version_of(text: str) -> SemVer:
    try:
        return SemVer.parse(text)
    except Exception as exc:
        raise StoreError(f"{text!r} is not a semantic version ({exc})") from exc


class _HashingSink:
    """A write-only file object that hashes what boto3 downloads into it and passes it on to `fh` (a pull,
    checked in one pass) or nowhere (verify without a disk copy)."""

    def __init__(self, fh: Any = None) -> None:
        self.fh = fh
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return len(data) if self.fh is None else self.fh.write(data)


class ModelStore:
    """Publish, list, pull and verify promoted versions in one bucket (see the module docstring)."""

    def __init__(self, settings: StoreSettings, client: Any = None) -> None:
        self.settings = settings
        self.prefix = settings.prefix.strip("/")
        self._client = client
        self._checked = False

    # ------------------------------------------------------------------------------------------ client
    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self._make_client()
        return self._client

    def _make_client(self) -> Any:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:
            raise StoreError(f"the object store needs boto3: pip install 'medens[serve]' ({exc})") from exc
        s = self.settings
        session = boto3.session.Session(profile_name=s.profile) if s.profile else boto3.session.Session()
        if session.get_credentials() is None:
            raise StoreError(
                "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile in "
                "~/.aws/credentials (store.profile=...); medens configs never hold secrets"
            )
        config = Config(
            retries={"max_attempts": int(s.max_attempts), "mode": "standard"},
            connect_timeout=float(s.connect_timeout_s),
            read_timeout=float(s.read_timeout_s),
            s3={"addressing_style": s.addressing_style},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        return session.client("s3", endpoint_url=s.endpoint_url or None, region_name=s.region, config=config)

    @property
    def endpoint(self) -> str:
        try:
            return str(self.client.meta.endpoint_url)
        except StoreError:
            raise
        except Exception:
            return str(self.settings.endpoint_url or "AWS S3")

    def transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        s = self.settings
        return TransferConfig(
            multipart_threshold=max(int(s.multipart_threshold_mb * _MB), 5 * _MB),
            multipart_chunksize=max(int(s.multipart_chunksize_mb * _MB), 5 * _MB),
            max_concurrency=int(s.max_concurrency),
            use_threads=int(s.max_concurrency) > 1,
        )

    def _fail(self, what: str, exc: BaseException) -> StoreError:
        code = ""
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = str((response.get("Error") or {}).get("Code") or "")
        detail = f"{code}: {exc}" if code and code not in str(exc) else str(exc)
        return StoreError(f"s3://{self.settings.bucket} at {self.endpoint}: {what} failed ({detail})")

    @staticmethod
    def _code(exc: BaseException) -> str:
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            return str((response.get("Error") or {}).get("Code") or "")
        return ""

    # ------------------------------------------------------------------------------------------ bucket
    def check_bucket(self) -> None:
        """The bucket exists, is reachable and has versioning on (turned on when `versioning: enable`)."""
        if self._checked:
            return
        from botocore.exceptions import BotoCoreError, ClientError

        bucket = self.settings.bucket
        try:
            status = self.client.get_bucket_versioning(Bucket=bucket).get("Status")
        except ClientError as exc:
            if self._code(exc) in ("NoSuchBucket", "404"):
                raise StoreError(
                    f"bucket {bucket!r} does not exist at {self.endpoint}; create it with versioning enabled"
                ) from exc
            raise self._fail("reading the bucket's versioning state", exc) from exc
        except BotoCoreError as exc:
            raise self._fail("reaching the store", exc) from exc
        if status != "Enabled":
            if self.settings.versioning != "enable":
                raise StoreError(
                    f"bucket {bucket!r} at {self.endpoint} has object versioning {status or 'never enabled'}; "
                    "medens relies on it (published objects are read by VersionId). Enable it "
                    "(aws s3api put-bucket-versioning --versioning-configuration Status=Enabled) or set "
                    "store.versioning=enable"
                )
            try:
                self.client.put_bucket_versioning(
                    Bucket=bucket, VersioningConfiguration={"Status": "Enabled"}
                )
            except (ClientError, BotoCoreError) as exc:
                raise self._fail("enabling versioning", exc) from exc
            log.warning("enabled object versioning on bucket %s", bucket)
        self._checked = True

    # ------------------------------------------------------------------------------------------ keys
    def version_prefix(self, modality: str, model_name: str, version: SemVer | str) -> str:
        parts = [p for p in (self.prefix, modality, f"{model_name}_v{SemVer.parse(str(version))}") if p]
        return "/".join(parts) + "/"

    def uri(self, key: str) -> str:
        return f"s3://{self.settings.bucket}/{key}"

    def _marker_keys(self, modality: str | None = None) -> Iterator[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        root = "/".join(p for p in (self.prefix, modality) if p)
        root = root + "/" if root else ""
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.settings.bucket, Prefix=root
            )
            for page in pages:
                for obj in page.get("Contents") or []:
                    if obj["Key"].endswith("/" + MARKER_NAME):
                        yield obj["Key"]
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(f"listing {self.uri(root)}", exc) from exc

    def _read_marker(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body = self.client.get_object(Bucket=self.settings.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if self._code(exc) in ("NoSuchKey", "404"):
                return None
            raise self._fail(f"reading {self.uri(key)}", exc) from exc
        except BotoCoreError as exc:
            raise self._fail(f"reading {self.uri(key)}", exc) from exc
        try:
            marker = json.loads(body)
        except ValueError as exc:
            raise StoreError(f"{self.uri(key)}: unreadable commit marker ({exc})") from exc
        if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
            raise StoreError(f"{self.uri(key)}: not a medens commit marker (format {MARKER_FORMAT})")
        return marker

    def _stored(self, key: str, marker: dict[str, Any]) -> StoredVersion:
        objects = [StoredObject(**o) for o in marker.get("objects") or []]
        return StoredVersion(
            modality=str(marker["modality"]),
            model_name=str(marker["model_name"]),
            version=_version_of(str(marker["version"])),
            prefix=key[: -len(MARKER_NAME)],
            marker=marker,
            objects=objects,
        )

    # ------------------------------------------------------------------------------------------ list
    def list_versions(
        self, modality: str | None = None, model_name: str | None = None
    ) -> list[StoredVersion]:
        """Published versions (a commit marker exists), oldest first per model by semver precedence."""
        self.check_bucket()
        out = []
        for key in self._marker_keys(modality):
            marker = self._read_marker(key)
            if marker is None:
                continue
            sv = self._stored(key, marker)
            if model_name is None or sv.model_name == model_name:
                out.append(sv)
        return sorted(out, key=lambda v: (v.modality, v.model_name, v.version, str(v.version)))

    def get_version(self, modality: str, model_name: str, version: str | SemVer) -> StoredVersion:
        """One published version; a version without a marker (never published, or half-written) is an error."""
        self.check_bucket()
        key = self.version_prefix(modality, model_name, version) + MARKER_NAME
        marker = self._read_marker(key)
        if marker is None:
            have = [str(v.version) for v in self.list_versions(modality, model_name)]
            raise StoreError(
                f"version {version} of {modality}/{model_name} does not exist in {self.uri(key[: -len(MARKER_NAME)])} "
                f"(published versions: {', '.join(have) or 'none'})"
            )
        return self._stored(key, marker)

    # ------------------------------------------------------------------------------------------ push
    def _upload(self, path: Path, key: str, sha: str) -> StoredObject:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        bucket = self.settings.bucket
        size = path.stat().st_size
        try:
            self.client.upload_file(
                str(path), bucket, key,
                ExtraArgs={"Metadata": {"sha256": sha}, "ContentType": "application/octet-stream"},
                Config=self.transfer_config(),
            )  # fmt: skip
            head = self.client.head_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError, S3UploadFailedError) as exc:
            raise self._fail(f"uploading {path} to {self.uri(key)}", exc) from exc
        version_id = head.get("VersionId")
        if not version_id or version_id == "null":
            raise StoreError(f"{self.uri(key)}: the store returned no VersionId; is versioning really on?")
        if (head.get("Metadata") or {}).get("sha256") != sha or int(head["ContentLength"]) != size:
            raise StoreError(
                f"{self.uri(key)}: after uploading {path}, the object's newest version is not ours "
                "(another writer is publishing the same version?)"
            )
        return StoredObject(path.name, key, sha, size, str(version_id), str(head.get("ETag", "")))

    def push(
        self, ckpt_path: str | os.PathLike, exports_dir: str | os.PathLike | None = None
    ) -> StoredVersion:
        """Publish a promoted (versioned) checkpoint, its metadata and the exports made from it.

        Refused before anything is uploaded when the local file fails its own SHA-256 check or the version
        (or one of equal precedence) is already published. Objects go up first, the marker last.
        """
        path = Path(ckpt_path)
        meta = verify_versioned(path)  # the local copy is what its metadata says
        name, _, version = split_checkpoint_name(path)
        if version is None:
            raise StoreError(
                f"{path}: not a versioned checkpoint; promote it first (scripts/promote.py) and push the "
                "<name>_v<semver>... copy"
            )
        modality = str(meta.get("modality") or path.parent.name)
        self.check_bucket()
        for sv in self.list_versions(modality, name):
            if sv.version == version:
                raise StoreError(
                    f"{modality}/{name} version {sv.version} is already published at {self.uri(sv.prefix)}; "
                    "published versions are never overwritten (promote a new version)"
                )
        exports = self._matching_exports(Path(exports_dir) if exports_dir else None, str(meta["sha256"]))
        vprefix = self.version_prefix(modality, name, version)
        started = time.perf_counter()
        objects: list[StoredObject] = []
        with tempfile.TemporaryDirectory(prefix="medens-store-") as tmp:
            files: list[tuple[Path, str]] = [
                (path, path.name),
                (path.with_suffix(".json"), path.with_suffix(".json").name),
            ]
            if exports:
                sub = Path(tmp) / "manifest.json"
                sub.write_text(json.dumps(exports["manifest"], indent=2) + "\n")
                for f in exports["files"]:
                    files.append((f, f"{EXPORTS_DIR}/{f.name}"))
                files.append((sub, f"{EXPORTS_DIR}/manifest.json"))
            for local, rel in files:
                obj = self._upload(local, vprefix + rel, sha256_file(local))
                obj.name = rel
                objects.append(obj)
                log.info("uploaded %s -> %s (%d bytes%s)", local, self.uri(obj.key), obj.size,
                         ", multipart" if obj.multipart else "")  # fmt: skip
        # the checkpoint hashed at upload time must still be the promoted one (its metadata's SHA-256)
        if objects[0].sha256 != read_metadata(path)["sha256"]:
            raise StoreError(f"{path}: changed while it was being published; nothing was committed")
        marker = {
            "format": MARKER_FORMAT,
            "modality": modality,
            "model_name": name,
            "version": str(version),
            "checkpoint": path.name,
            "metadata": path.with_suffix(".json").name,
            "exports": sorted((exports or {}).get("manifest", {}).get("exports", {})),
            "sha256": meta["sha256"],
            "performance": meta.get("performance") or {},
            "notes": meta.get("notes"),
            "training_date": meta.get("training_date"),
            "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "bucket": self.settings.bucket,
            "objects": [o.__dict__ for o in objects],
        }
        self._put_marker(vprefix + MARKER_NAME, marker)
        log.info("published %s/%s %s to %s in %.1f s", modality, name, version, self.uri(vprefix),
                 time.perf_counter() - started)  # fmt: skip
        return self._stored(vprefix + MARKER_NAME, marker)

    def _put_marker(self, key: str, marker: dict[str, Any]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        extra = {"IfNoneMatch": "*"} if self.settings.conditional_marker else {}
        try:
            self.client.put_object(
                Bucket=self.settings.bucket, Key=key, Body=json.dumps(marker, indent=2).encode(),
                ContentType="application/json", **extra,
            )  # fmt: skip
        except ClientError as exc:
            if self._code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise StoreError(
                    f"{self.uri(key)}: another publisher committed this version first; nothing of ours is listed"
                ) from exc
            raise self._fail(f"committing {self.uri(key)}", exc) from exc
        except BotoCoreError as exc:
            raise self._fail(f"committing {self.uri(key)}", exc) from exc

    @staticmethod
    def _matching_exports(exports_dir: Path | None, sha: str) -> dict[str, Any] | None:
        """The exports in `exports_dir/manifest.json` whose source checkpoint has SHA-256 `sha`."""
        if exports_dir is None or not (exports_dir / "manifest.json").is_file():
            return None
        manifest = read_json_object(exports_dir / "manifest.json", "export manifest", StoreError)
        entries, files = {}, []
        for target, entry in (manifest.get("exports") or {}).items():
            if (entry.get("source_checkpoint") or {}).get("sha256") != sha:
                continue
            f = exports_dir / str(entry["file"])
            if not f.is_file() or sha256_file(f) != entry.get("sha256"):
                raise StoreError(f"{f}: export listed in the manifest is missing or fails its SHA-256")
            entries[target] = entry
            files.append(f)
        if not entries:
            return None
        return {"manifest": {**manifest, "exports": entries}, "files": files}

    # ------------------------------------------------------------------------------------------ pull / verify
    def _download(self, obj: StoredObject, sink: Any) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.download_fileobj(
                self.settings.bucket, obj.key, sink, ExtraArgs={"VersionId": obj.version_id},
                Config=self.transfer_config(),
            )  # fmt: skip
        except ClientError as exc:
            if self._code(exc) in ("NoSuchVersion", "NoSuchKey", "404", "400"):
                raise StoreError(
                    f"{self.uri(obj.key)}: the published object version {obj.version_id} is gone from the store "
                    "(deleted?); this version cannot be trusted"
                ) from exc
            raise self._fail(f"downloading {self.uri(obj.key)}", exc) from exc
        except BotoCoreError as exc:
            raise self._fail(f"downloading {self.uri(obj.key)}", exc) from exc

    @staticmethod
    def _mismatch(obj: StoredObject, uri: str, actual: str) -> StoreError:
        return StoreError(
            f"{uri} (version {obj.version_id}): SHA-256 mismatch: the commit marker records {obj.sha256}, "
            f"the object has {actual}. Tampered or corrupt; refused"
        )

    def pull(
        self, modality: str, model_name: str, version: str | SemVer, dest: str | os.PathLike
    ) -> dict[str, Path]:
        """Download a published version into `dest` (checkpoint + metadata) and `dest/<name>_v<ver>_exports/`.

        Every object is fetched at its recorded VersionId and hashed while it downloads; nothing lands in
        `dest` unless every SHA-256 matches (files already there with the same bytes are kept).
        """
        sv = self.get_version(modality, model_name, version)
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        exports_dest = dest / f"{sv.model_name}_v{sv.version}_exports"
        staging = Path(tempfile.mkdtemp(prefix=".medens-pull-", dir=dest))
        try:
            for obj in sv.objects:
                local = staging / obj.name
                local.parent.mkdir(parents=True, exist_ok=True)
                with open(local, "wb") as fh:
                    sink = _HashingSink(fh)
                    self._download(obj, sink)
                    fh.flush()
                    os.fsync(fh.fileno())
                actual = sink.digest.hexdigest()
                if actual != obj.sha256:
                    raise self._mismatch(obj, self.uri(obj.key), actual)
            ckpt_meta = read_json_object(staging / sv.marker["metadata"], "checkpoint metadata", StoreError)
            if ckpt_meta.get("sha256") != sv.checkpoint.sha256:
                raise StoreError(
                    f"{self.uri(sv.prefix)}: metadata {sv.marker['metadata']} records SHA-256 "
                    f"{ckpt_meta.get('sha256')}, the checkpoint has {sv.checkpoint.sha256}; refused"
                )
            out: dict[str, Path] = {}
            for obj in sv.objects:
                src = staging / obj.name
                if obj.name.startswith(EXPORTS_DIR + "/"):
                    target = exports_dest / obj.name[len(EXPORTS_DIR) + 1 :]
                else:
                    target = dest / obj.name
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.exists():
                    if sha256_file(target) != obj.sha256:
                        raise StoreError(
                            f"{target} exists with other bytes than {self.uri(obj.key)}; versioned files are "
                            "never overwritten (move it away first)"
                        )
                else:
                    shutil.move(str(src), target)
                out[obj.name] = target
            return out
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def verify(self, modality: str, model_name: str, version: str | SemVer) -> dict[str, Any]:
        """Check every object of a version: its recorded version still hashes to the recorded SHA-256,
        and no newer version of the key hides it (an overwrite after publishing is reported)."""
        from botocore.exceptions import BotoCoreError, ClientError

        sv = self.get_version(modality, model_name, version)
        rows, ok = [], True
        for obj in sv.objects:
            row: dict[str, Any] = {"name": obj.name, "key": obj.key, "version_id": obj.version_id,
                                   "sha256": obj.sha256, "size": obj.size, "ok": True}  # fmt: skip
            sink = _HashingSink()
            try:
                self._download(obj, sink)
                actual = sink.digest.hexdigest()
                if actual != obj.sha256:
                    row.update(ok=False, problem=str(self._mismatch(obj, self.uri(obj.key), actual)))
            except StoreError as exc:
                row.update(ok=False, problem=str(exc))
            try:
                head = self.client.head_object(Bucket=self.settings.bucket, Key=obj.key)
                current = str(head.get("VersionId"))
                if current != obj.version_id:
                    row.update(
                        ok=False,
                        overwritten_by=current,
                        problem=row.get("problem")
                        or (
                            f"{self.uri(obj.key)} was overwritten after publishing (newest version {current}, "
                            f"published {obj.version_id}); pull still uses the published version"
                        ),
                    )
            except ClientError as exc:
                row.update(ok=False, problem=row.get("problem") or f"{self.uri(obj.key)}: {exc}")
            except BotoCoreError as exc:
                raise self._fail(f"checking {self.uri(obj.key)}", exc) from exc
            ok = ok and row["ok"]
            rows.append(row)
        return {"modality": sv.modality, "model_name": sv.model_name, "version": str(sv.version),
                "prefix": self.uri(sv.prefix), "ok": ok, "objects": rows}  # fmt: skip


def store_from_config(cfg: Any) -> ModelStore:
    """A `ModelStore` from the `store` config section."""
    return ModelStore(StoreSettings.from_config(cfg))


def parse_model_ref(ref: str) -> tuple[str, str]:
    """`xray/resnet50` -> ("xray", "resnet50")."""
    modality, sep, name = str(ref).partition("/")
    if not sep or not modality or not name or "/" in name:
        raise StoreError(f"model={ref!r}: give <modality>/<model name>, e.g. model=xray/resnet50")
    return modality, name
