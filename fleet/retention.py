"""A home's share of `fleetctl gc`: the run folders of collected missions and the fetched copies of
artifacts nothing kept needs, measured and removed. The coordinator runs it on its own home and each
worker on its own (a `GcOrder` on its command subject), so a worker on another box frees its disk too.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
from pathlib import Path

from fleet.paths import under
from schemas.messages import NAME, GcDone

_SHA = re.compile(r"^[0-9a-f]{64}$")
_MISSION = re.compile(f"^{NAME}$")


def usage(path: Path) -> int:
    """Bytes of the files under `path` (links not followed; 0 when it does not exist)."""
    if not path.exists() and not path.is_symlink():
        return 0
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).lstat().st_size
            except FileNotFoundError:  # a task's temporary file, gone since the walk listed it
                continue
    return total


def remove(path: Path) -> None:
    """Remove a file or a folder, read-only ones too (fetched artifact copies are made read-only)."""

    def writable_and_again(fn: object, failed: str, _: object) -> None:
        parent = Path(failed).parent
        parent.chmod(parent.stat().st_mode | stat.S_IWUSR)
        Path(failed).chmod(Path(failed).lstat().st_mode | stat.S_IWUSR)
        if Path(failed).is_dir() and not Path(failed).is_symlink():
            shutil.rmtree(failed, onerror=writable_and_again)
        else:
            Path(failed).unlink(missing_ok=True)

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, onerror=writable_and_again)
    elif path.exists() or path.is_symlink():
        path.unlink()


def collect_home(home: Path, cache: Path, missions: list[str], artifacts: list[str], dry_run: bool) -> GcDone:
    """Measure, and unless `dry_run` remove, `home/runs/<mission>` for each mission and the cached
    copies `cache/<sha256>*` of each artifact. Anything but a mission id or a SHA-256 is refused."""
    runs: dict[str, int] = {}
    for mission_id in missions:
        if not _MISSION.match(mission_id):
            raise ValueError(f"{mission_id!r} is not a mission id")
        folder = under(home / "runs", mission_id)
        size = usage(folder)
        if size or folder.exists():
            runs[mission_id] = size
            if not dry_run:
                remove(folder)
    cached = 0
    for sha in artifacts:
        if not _SHA.match(sha):
            raise ValueError(f"{sha!r} is not an artifact's SHA-256")
        for suffix in ("", ".partial", ".staging", ".lock"):
            item = cache / f"{sha}{suffix}"
            cached += usage(item)
            if not dry_run:
                remove(item)
    return GcDone(where=f"{socket.gethostname()}:{home.resolve()}", runs=runs, cache=cached)
