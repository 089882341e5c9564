"""fleet.artifacts against a real nats-server with the fleet's credentials: content-addressed uploads in
parts, a fetch that resumes where a dropped connection left it, hashes checked, sizes limited, and a
worker credential that may use the bucket but not remove it."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import nats.errors
import pytest
from nats.js.object_store import ObjectStore

from fleet import artifacts, bus, creds
from fleet.artifacts import ArtifactError, Artifacts
from schemas.messages import ArtifactRef
from tests.fleet.conftest import Fleet

pytestmark = pytest.mark.slow
PART = 64 * 1024


@pytest.fixture(autouse=True)
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(artifacts, "PART_BYTES", PART)


def with_bucket(fleet: Fleet, fn: Callable[[ObjectStore], Awaitable[Any]], role: str = "coordinator") -> Any:
    """Run `fn` on the bucket (created by the coordinator's credential), as `role`."""

    async def go() -> Any:
        boss = await bus.connect(fleet.url, "test-coordinator", creds.seed_path(fleet.home, "coordinator"))
        await artifacts.ensure_bucket(boss.jetstream(), replicas=1, max_bytes=256 * 1024**2)
        nc = (
            boss
            if role == "coordinator"
            else await bus.connect(fleet.url, "t", creds.seed_path(fleet.home, role))
        )
        try:
            return await fn(await nc.jetstream().object_store(artifacts.BUCKET))
        finally:
            if nc is not boss:
                await nc.close()
            await boss.close()

    return anyio.run(go)


def model_folder(root: Path, seed: int = 1) -> Path:
    folder = root / f"model-{seed}"
    (folder / "tok").mkdir(parents=True)
    (folder / "weights.bin").write_bytes(bytes(range(256)) * (3 * PART // 256 + 7) * seed)  # 4+ parts
    (folder / "config.json").write_text('{"d": 128}\n')
    (folder / "tok" / "vocab.txt").write_text("a\nb\n")
    return folder


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_travels_by_its_hash_and_comes_back_the_same(fleet: Fleet, tmp_path: Path) -> None:
    folder = model_folder(tmp_path)

    async def go(obs: ObjectStore) -> tuple[ArtifactRef, ArtifactRef, Path]:
        first = await artifacts.publish(obs, folder, max_bytes=10**9)
        os.utime(folder / "weights.bin", (1, 1))  # another time stamp, the same content
        again = await artifacts.publish(obs, folder, max_bytes=10**9)
        return first, again, await artifacts.fetch(obs, first, tmp_path / "cache")

    first, again, local = with_bucket(fleet, go, role="worker")
    assert first.sha256 == again.sha256 and len(first.sha256) == 64
    assert local == tmp_path / "cache" / first.sha256 / "content"
    assert tree(local) == tree(folder)
    other = model_folder(tmp_path / "b", seed=2)
    assert (
        with_bucket(fleet, lambda obs: artifacts.publish(obs, other, max_bytes=10**9)).sha256 != first.sha256
    )


class Dropping:
    """The real bucket, whose connection 'drops' (an error, as nats-py raises) after `ok` part reads."""

    def __init__(self, obs: ObjectStore, ok: int) -> None:
        self.obs, self.ok, self.parts_read = obs, ok, 0

    async def get(self, name: str) -> Any:
        if "." in name:  # a part, not the manifest
            if self.parts_read >= self.ok:
                raise nats.errors.ConnectionClosedError
            self.parts_read += 1
        return await self.obs.get(name)


def test_a_fetch_resumes_at_the_first_part_it_lacks(fleet: Fleet, tmp_path: Path) -> None:
    folder = model_folder(tmp_path)
    cache = tmp_path / "cache"

    async def go(obs: ObjectStore) -> tuple[int, int, Path]:
        ref = await artifacts.publish(obs, folder, max_bytes=10**9)
        dropping = Dropping(obs, ok=2)
        with pytest.raises(nats.errors.ConnectionClosedError):
            await artifacts.fetch(dropping, ref, cache)  # type: ignore[arg-type]
        assert not (cache / ref.sha256).exists()  # nothing half-fetched is ever served
        resumed = Dropping(obs, ok=10**6)
        local = await artifacts.fetch(resumed, ref, cache)  # type: ignore[arg-type]
        parts = len(list(await obs.list()))  # manifest + parts
        return resumed.parts_read, parts - 1, local

    read_again, parts, local = with_bucket(fleet, go)
    assert parts >= 4 and read_again == parts - 2  # the two parts that arrived are not read again
    assert tree(local) == tree(folder)


def test_a_tampered_part_or_an_oversized_output_is_refused_with_the_reason(
    fleet: Fleet, tmp_path: Path
) -> None:
    folder = model_folder(tmp_path)

    async def go(obs: ObjectStore) -> None:
        with pytest.raises(ArtifactError, match=r"over \[artifacts\] max_artifact_bytes = 1000"):
            await artifacts.publish(obs, folder, max_bytes=1000)
        ref = await artifacts.publish(obs, folder, max_bytes=10**9)
        await obs.put(f"{ref.sha256}.00001", b"not the part")
        with pytest.raises(ArtifactError, match="part 1 does not match its hash"):
            await artifacts.fetch(obs, ref, tmp_path / "cache")
        missing = ArtifactRef(sha256="0" * 64, bytes=1, path="/elsewhere/model")
        with pytest.raises(ArtifactError, match="is not in the object store"):
            await artifacts.fetch(obs, missing, tmp_path / "cache")

    with_bucket(fleet, go)


def test_a_worker_may_use_the_bucket_but_not_remove_it(fleet: Fleet) -> None:
    async def remove(obs: ObjectStore) -> None:
        with pytest.raises((nats.errors.Error, TimeoutError)):
            await obs._js.delete_object_store(artifacts.BUCKET)

    with_bucket(fleet, remove, role="worker")

    async def status(obs: ObjectStore) -> str:
        return (await obs.status()).bucket

    assert with_bucket(fleet, status) == artifacts.BUCKET


def test_a_shared_store_passes_paths_and_refuses_what_it_cannot_pass(tmp_path: Path) -> None:
    """`[artifacts] store = "shared"`: nothing uploaded, the path travels; bad outputs are named."""
    store = Artifacts(None, tmp_path / "cache", store="shared", max_artifact_bytes=10)  # type: ignore[arg-type]
    folder = model_folder(tmp_path)
    refs = anyio.run(store.publish, {"base": str(folder)})
    assert refs == {"base": ArtifactRef(path=str(folder))}
    assert anyio.run(store.fetch, refs["base"]) == folder
    with pytest.raises(ArtifactError, match="is not on this host"):
        anyio.run(store.fetch, ArtifactRef(path=str(tmp_path / "elsewhere")))
    with pytest.raises(ArtifactError, match=r"outputs\.base must be an absolute path"):
        anyio.run(store.publish, {"base": "relative/model"})
    with pytest.raises(ArtifactError, match="a table of name = path, not list"):
        anyio.run(store.publish, [str(folder)])
    with pytest.raises(ValueError, match="'object' or 'shared'"):
        Artifacts(None, tmp_path, store="nfs", max_artifact_bytes=1)  # type: ignore[arg-type]


def test_a_kind_reads_the_base_an_earlier_task_left() -> None:
    """workers.kinds.demo.find_base takes the `base` input before pretraining anything."""
    from workers.kinds import TaskContext
    from workers.kinds.demo import find_base

    got = Path("/fetched/base/content")
    ctx = TaskContext("m/t", "m", 1, Path("/out"), Path("/cache"), "cpu", None, {"base": got})  # type: ignore[arg-type]
    assert find_base({"corpus": "validation"}, ctx) == got


def test_an_upload_that_died_before_its_manifest_is_finished_by_the_next_and_copies_are_read_only(
    fleet: Fleet, tmp_path: Path
) -> None:
    folder = model_folder(tmp_path)
    data, _, _, sha = artifacts._prepare(folder, tmp_path, 10**9)
    first_part = data.read_bytes()[:PART]

    async def go(obs: ObjectStore) -> Path:
        await obs.put(f"{sha}.00000", first_part)  # what a worker killed mid-upload left, no manifest
        ref = await artifacts.publish(obs, folder, max_bytes=10**9)  # as a worker: no purge allowed
        assert ref.sha256 == sha
        return await artifacts.fetch(obs, ref, tmp_path / "cache")

    local = with_bucket(fleet, go, role="worker")
    assert tree(local) == tree(folder)
    assert all(not p.stat().st_mode & 0o222 for p in local.rglob("*") if p.is_file())  # read-only copies

    async def conflicting(obs: ObjectStore) -> None:
        other = model_folder(tmp_path / "other", seed=3)
        _, _, _, sha = artifacts._prepare(other, tmp_path / "other", 10**9)
        await obs.put(f"{sha}.00001", b"something else")
        with pytest.raises(artifacts.StoreError, match="holds a different part"):
            await artifacts.publish(obs, other, max_bytes=10**9)

    with_bucket(fleet, conflicting, role="worker")
