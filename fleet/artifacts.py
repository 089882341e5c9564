"""Artifacts that another task needs (a base model, a checkpoint), carried by the JetStream object store.

A task names what it leaves for later tasks in its result's `outputs` ({name: local path}). Its worker
packs each (a folder becomes a tar with fixed order and times, so equal content gives equal bytes),
names it by its SHA-256, and uploads it in parts to the object store bucket `fleet_artifacts`; the
store itself sends each part in chunks, never as one bus message. A later task's assignment carries
those names and hashes as `inputs`; its worker fetches each once per host into a local cache, part by
part, so a dropped connection resumes at the first part it lacks, and checks every part and the whole
against its hash before anything reads it. With `[artifacts] store = "shared"` (a filesystem every
worker mounts at the same path) nothing is uploaded and the path itself travels.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import io
import shutil
import tarfile
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import msgspec
from nats.js import JetStreamContext
from nats.js.api import ObjectStoreConfig, StorageType
from nats.js.errors import BadRequestError, NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from fleet import bus
from schemas.messages import ArtifactRef

BUCKET = "fleet_artifacts"
PART_BYTES = 16 * 1024 * 1024  # what a fetch holds in memory, and how far a resume may have to go back


class ArtifactError(RuntimeError):
    """An output or input that cannot travel, with the reason."""


class StoreError(ArtifactError):
    """The store's state, not the task's output, is in the way (a part left by another upload)."""


class Manifest(msgspec.Struct, frozen=True):
    sha256: str
    bytes: int
    folder: bool  # a tar of a folder, unpacked on fetch; else the file itself
    parts: list[str]  # each part's SHA-256, in order


async def ensure_bucket(js: JetStreamContext, *, replicas: int, max_bytes: int) -> ObjectStore:
    """The bucket (the coordinator creates it; a worker's credential may only use it)."""
    cfg = ObjectStoreConfig(bucket=BUCKET, storage=StorageType.FILE, replicas=replicas, max_bytes=max_bytes)
    try:
        return await js.create_object_store(BUCKET, config=cfg)
    except BadRequestError:  # made with other settings: keep it, at the replicas asked for
        await bus.rescale(js, f"OBJ_{BUCKET}", replicas, max_bytes=max_bytes)
        return await js.object_store(BUCKET)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pack(path: Path, into: Path) -> tuple[Path, bool]:
    """The bytes to upload for `path`: the file itself, or a reproducible tar of the folder in `into`."""
    if path.is_file():
        return path, False
    if not path.is_dir():
        raise ArtifactError(f"output {path} is neither a file nor a folder")
    tar_path = into / "artifact.tar"

    def fixed(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        return info

    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for item in sorted(path.rglob("*")):
            if item.is_symlink() or not (item.is_file() or item.is_dir()):
                raise ArtifactError(f"output {path}: {item} is not a plain file or folder")
            tar.add(item, arcname=str(item.relative_to(path)), recursive=False, filter=fixed)
    return tar_path, True


def _prepare(path: Path, into: Path, max_bytes: int) -> tuple[Path, bool, int, str]:
    """Pack and hash (disk and CPU: run in a thread, so the worker's heartbeats go on)."""
    data, folder = pack(path, into)
    size = data.stat().st_size
    if size > max_bytes:
        raise ArtifactError(
            f"output {path} is {size} bytes, over [artifacts] max_artifact_bytes = {max_bytes}"
        )
    return data, folder, size, _sha256_file(data)


async def publish(obs: ObjectStore, path: Path, *, max_bytes: int) -> ArtifactRef:
    """Upload `path` (unless the store already has its content) and return its reference."""
    with tempfile.TemporaryDirectory() as tmp:
        data, folder, size, sha = await anyio.to_thread.run_sync(_prepare, path, Path(tmp), max_bytes)
        ref = ArtifactRef(sha256=sha, bytes=size, path=str(path))
        with contextlib.suppress(ObjectNotFoundError, NotFoundError):
            await obs.get_info(sha)
            return ref  # content-addressed: already there, from this task's earlier attempt or another's
        parts: list[str] = []
        with data.open("rb") as f:
            while chunk := await anyio.to_thread.run_sync(f.read, PART_BYTES):
                parts.append(hashlib.sha256(chunk).hexdigest())
                await _put_part(obs, f"{sha}.{len(parts) - 1:05d}", chunk)
        manifest = Manifest(sha256=sha, bytes=size, folder=folder, parts=parts)
        await obs.put(sha, msgspec.json.encode(manifest))  # last: a manifest means every part is there
        return ref


async def _put_part(obs: ObjectStore, name: str, chunk: bytes) -> None:
    """A part, unless an earlier upload that died before its manifest left it already. Entries are
    never replaced: replacing one purges its chunks, which a worker's credential may not do."""
    digest = "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(chunk).digest()).decode()
    try:
        found = await obs.get_info(name)
    except (ObjectNotFoundError, NotFoundError):
        await obs.put(name, io.BytesIO(chunk))
        return
    if found.digest != digest:
        raise StoreError(f"the store holds a different part {name}: a coordinator must remove it")


@contextlib.asynccontextmanager
async def _locked(path: Path) -> AsyncIterator[None]:
    """One fetch per artifact per host: workers sharing a cache wait for the first one's download,
    polling, so a worker waiting here still beats and can be cancelled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await anyio.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _have(part: Path, digest: str) -> bool:
    return part.exists() and _sha256_file(part) == digest


def _keep(part: Path, data: bytes) -> None:
    tmp = part.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(part)


def _assemble(ref: ArtifactRef, manifest: Manifest, partial: Path, done: Path) -> None:
    """The parts joined, checked against the whole's hash, unpacked, and moved into place at once."""
    whole = partial / "whole"
    with whole.open("wb") as out:
        for i in range(len(manifest.parts)):
            with (partial / f"{i:05d}").open("rb") as f:
                shutil.copyfileobj(f, out)
    if _sha256_file(whole) != ref.sha256:
        raise ArtifactError(f"artifact {ref.sha256}: the assembled content does not match its hash")
    staging = done.with_name(f"{ref.sha256}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        if manifest.folder:
            with tarfile.open(whole) as tar:
                tar.extractall(staging / "content", filter="data")  # no links out, no absolute paths
        else:
            whole.replace(staging / "content")
    except tarfile.TarError as e:
        raise ArtifactError(f"artifact {ref.sha256}: {e}") from None
    # Served to every later task on this host unchecked: read-only, so no task changes it for the next.
    for item in [staging / "content", *(staging / "content").rglob("*")]:
        if item.is_file():
            item.chmod(0o444)
    staging.replace(done)
    shutil.rmtree(partial, ignore_errors=True)


async def fetch(obs: ObjectStore, ref: ArtifactRef, cache: Path) -> Path:
    """The artifact's local copy under `cache`, downloaded on first use; `cache/<sha256>/content` is
    the unpacked folder, or the file."""
    done = cache / ref.sha256
    if done.exists():
        return _content(done)
    async with _locked(cache / f"{ref.sha256}.lock"):
        if done.exists():  # another worker on this host fetched it while we waited
            return _content(done)
        try:
            manifest = msgspec.json.decode((await obs.get(ref.sha256)).data or b"", type=Manifest)
        except (ObjectNotFoundError, NotFoundError):
            raise ArtifactError(f"artifact {ref.sha256} ({ref.path}) is not in the object store") from None
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise ArtifactError(f"artifact {ref.sha256}: its manifest does not decode ({e})") from None
        partial = cache / f"{ref.sha256}.partial"
        partial.mkdir(parents=True, exist_ok=True)
        for i, digest in enumerate(manifest.parts):
            part = partial / f"{i:05d}"
            if await anyio.to_thread.run_sync(_have, part, digest):
                continue  # fetched before the connection dropped: resume after it
            data = (await obs.get(f"{ref.sha256}.{i:05d}")).data or b""
            if hashlib.sha256(data).hexdigest() != digest:
                raise ArtifactError(f"artifact {ref.sha256}: part {i} does not match its hash")
            await anyio.to_thread.run_sync(_keep, part, data)
        await anyio.to_thread.run_sync(_assemble, ref, manifest, partial, done)
    return _content(done)


def _content(done: Path) -> Path:
    return done / "content"


def cache_dir(home: Path, configured: str = "") -> Path:
    return Path(configured) if configured else Path(home) / "cache" / "artifacts"


class Artifacts:
    """A worker's door to the artifacts: `store = "object"` uploads and fetches through the bucket,
    `"shared"` passes paths on a filesystem every worker mounts at the same place."""

    def __init__(self, js: JetStreamContext, cache: Path, *, store: str, max_artifact_bytes: int) -> None:
        if store not in ("object", "shared"):
            raise ValueError(f"[artifacts] store = {store!r}: 'object' or 'shared'")
        self.js, self.cache, self.store, self.max_bytes = js, cache, store, max_artifact_bytes
        self._obs: ObjectStore | None = None

    async def bucket(self) -> ObjectStore:
        if self._obs is None:
            self._obs = await self.js.object_store(BUCKET)
        return self._obs

    async def fetch(self, ref: ArtifactRef) -> Path:
        if ref.sha256:
            return await fetch(await self.bucket(), ref, self.cache)
        path = Path(ref.path)
        if not path.exists():
            raise ArtifactError(f"input {path} is not on this host (store = 'shared' needs one filesystem)")
        return path

    async def publish(self, outputs: object) -> dict[str, ArtifactRef]:
        if not isinstance(outputs, dict):
            raise ArtifactError(
                f"a task's outputs must be a table of name = path, not {type(outputs).__name__}"
            )
        out = {}
        for name, path in outputs.items():
            if not isinstance(path, str) or not Path(path).is_absolute():
                raise ArtifactError(f"outputs.{name} must be an absolute path, not {path!r}")
            if self.store == "shared":
                out[str(name)] = ArtifactRef(path=path)
            else:
                out[str(name)] = await publish(await self.bucket(), Path(path), max_bytes=self.max_bytes)
        return out
