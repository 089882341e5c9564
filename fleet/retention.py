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
from typing import Any

from fleet.paths import under
from schemas.messages import NAME, GcDone

_SHA = re.compile(r"^[0-9a-f]{64}$")
_MISSION = re.compile(f"^{NAME}$")


def usage(path: Path) -> int:
    """Apparent bytes under `path`, folders' own entries included, as `du -sb` counts them (links not
    followed; 0 when it does not exist)."""
    if not path.exists() and not path.is_symlink():
        return 0
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = path.lstat().st_size
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                total += (Path(root) / name).lstat().st_size
            except FileNotFoundError:  # a task's temporary file, gone since the walk listed it
                continue
    return total


def _writable(path: str) -> None:
    """Owner write and search on a real folder; a link is never chmod-ed (that would change its target)."""
    if not os.path.islink(path) and os.path.isdir(path):
        os.chmod(path, os.stat(path).st_mode | stat.S_IWUSR | stat.S_IXUSR | stat.S_IRUSR)


def remove(path: Path) -> None:
    """Remove a file, a link or a folder, read-only folders too (fetched artifact copies are made
    read-only). Links are removed, never followed."""

    def again(fn: Any, failed: str, _: object) -> None:
        _writable(os.path.dirname(failed))  # unlinking needs a writable parent
        if fn in (os.open, os.scandir, os.listdir):  # the folder itself could not be listed
            _writable(failed)
            shutil.rmtree(failed, onerror=again)
        else:
            fn(failed)

    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, onerror=again)


def collect_home(home: Path, cache: Path, missions: list[str], artifacts: list[str], dry_run: bool) -> GcDone:
    """Measure, and unless `dry_run` remove, `home/runs/<mission>` for each mission and the cached
        copies `cache/<sha256>*` of each artifact. Anything but a mission id or a SHA-256, or a folder that
    leads out of the home, is left alone and named in `error`; the others are still done."""
    runs: dict[str, int] = {}
    errors: list[str] = []
    for mission_id in missions:
        try:  # one bad folder (a link out of the home, a permission) does not stop the others
            if not _MISSION.match(mission_id):
                raise ValueError(f"{mission_id!r} is not a mission id")
            folder = under(home / "runs", mission_id)
            size = usage(folder)
            if size or folder.exists():
                runs[mission_id] = size
                if not dry_run:
                    remove(folder)
        except (OSError, ValueError) as e:
            errors.append(f"runs/{mission_id}: {e}")
    cached = 0
    for sha in artifacts:
        if not _SHA.match(sha):
            errors.append(f"{sha!r} is not an artifact's SHA-256")
            continue
        for suffix in ("", ".partial", ".staging", ".lock"):
            item = cache / f"{sha}{suffix}"
            try:
                cached += usage(item)
                if not dry_run:
                    remove(item)
            except OSError as e:
                errors.append(f"{item.name}: {e}")
    return GcDone(
        where=f"{socket.gethostname()}:{home.resolve()}", runs=runs, cache=cached, error="; ".join(errors)
    )
