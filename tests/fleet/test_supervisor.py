"""The task supervisor with real processes: forks of a preloaded template, every way a task ends, and
nothing left behind when the template or the worker dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from schemas.messages import Assignment
from workers import protocol as p
from workers.supervisor import Supervisor, child_env

REPO = Path(__file__).resolve().parents[2]


def _run(tmp: Path, kind: str, params: dict[str, Any] | None = None, attempt: int = 1, timeout_s: float = 30):
    a = Assignment(
        task_id=f"m/{kind.replace('.', '-')}",  # a task id is two names: no dots
        mission_id="m",
        kind=kind,
        params=params or {},
        attempt=attempt,
        timeout_s=timeout_s,
    )
    return p.Run(
        assignment=a, out_dir=str(tmp / "out"), cache_dir=str(tmp / "cache"), device="cpu", worker="w"
    )


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_children_are_forks_of_a_template_with_the_preload_imported(tmp_path: Path) -> None:
    async def main() -> None:
        sup = Supervisor(child_env(1), preload=["torch"])
        try:
            await sup.warm()
            spare = sup._spare
            assert spare is not None and sup.forkserver._proc is not None
            assert _ppid(spare.pid) == sup.forkserver._proc.pid
            # The spare has run no task yet, but torch's library is already mapped: it came with the fork.
            assert "libtorch" in Path(f"/proc/{spare.pid}/maps").read_text()
            out = await sup.run(_run(tmp_path, "noop"), _ignore, anyio.Event())
            assert out == p.Result({})
            assert sup._spare is not None and sup._spare.pid != spare.pid  # refilled while the task ran
        finally:
            await sup.close()

    anyio.run(main)


async def _ignore(msg: object) -> None:
    pass


def test_every_way_a_task_ends(tmp_path: Path) -> None:
    async def main() -> dict[str, Any]:
        sup = Supervisor(child_env(1), cancel_grace_s=1.0)
        got: dict[str, Any] = {}
        try:
            msgs: list[object] = []

            async def keep(msg: object) -> None:
                msgs.append(msg)

            got["sleep"] = await sup.run(
                _run(tmp_path, "selftest.sleep", {"seconds": 0.3}), keep, anyio.Event()
            )
            got["sleep_msgs"] = list(msgs)
            got["flaky"] = await sup.run(
                _run(tmp_path, "selftest.flaky", {"seconds": 0}), _ignore, anyio.Event()
            )
            msgs.clear()
            got["crash"] = await sup.run(
                _run(tmp_path, "selftest.crash", {"seconds": 0}), keep, anyio.Event()
            )
            got["crash_msgs"] = list(msgs)
            cancel = anyio.Event()
            async with anyio.create_task_group() as tg:

                async def cancel_soon() -> None:
                    await anyio.sleep(0.5)
                    cancel.set()

                tg.start_soon(cancel_soon)
                got["cancel"] = await sup.run(
                    _run(tmp_path, "selftest.sleep", {"seconds": 30}), _ignore, cancel
                )
            got["timeout"] = await sup.run(
                _run(tmp_path, "selftest.sleep", {"seconds": 30}, timeout_s=0.5), _ignore, anyio.Event()
            )
            got["unknown"] = await sup.run(_run(tmp_path, "no.such.kind"), _ignore, anyio.Event())
        finally:
            await sup.close()
        return got

    got = anyio.run(main)
    assert got["sleep"] == p.Result({"slept_s": 0.3})
    assert any(isinstance(m, p.ProgressMsg) for m in got["sleep_msgs"])
    assert any(isinstance(m, p.MetricBatch) for m in got["sleep_msgs"])
    assert got["flaky"].reason == "error" and "planned failure on attempt 1" in got["flaky"].error
    assert got["crash"].reason == "crash" and "SIGKILL" in got["crash"].error
    assert "crashing on attempt 1" in got["crash"].error  # the last log lines come with a crash
    assert got["cancel"].reason == "cancelled"
    assert got["timeout"].reason == "timeout"
    assert got["unknown"].reason == "error" and "no.such.kind" in got["unknown"].error


def test_a_dead_template_and_a_dead_spare_are_replaced(tmp_path: Path) -> None:
    async def main() -> tuple[p.Result | p.Error, p.Result | p.Error]:
        sup = Supervisor(child_env(1))
        try:
            await sup.warm()
            assert sup.forkserver._proc is not None and sup._spare is not None
            spare_pid = sup._spare.pid
            sup.forkserver._proc.kill()  # the spare dies with it (PDEATHSIG)
            await sup.forkserver._proc.wait()
            with anyio.fail_after(5):
                while not _gone(spare_pid):
                    await anyio.sleep(0.05)
            first = await sup.run(_run(tmp_path, "noop"), _ignore, anyio.Event())
            second = await sup.run(_run(tmp_path, "noop"), _ignore, anyio.Event())
            return first, second
        finally:
            await sup.close()

    assert anyio.run(main) == (p.Result({}), p.Result({}))


DRIVER = textwrap.dedent(
    """
    import anyio, sys
    from pathlib import Path
    from schemas.messages import Assignment
    from workers import protocol as p
    from workers.supervisor import Supervisor, child_env

    async def main():
        sup = Supervisor(child_env(1))
        await sup.warm()
        print(sup.forkserver._proc.pid, sup._spare.pid, flush=True)
        a = Assignment(task_id="m/t", mission_id="m", kind="selftest.sleep", params={"seconds": 60},
                       attempt=1, timeout_s=120)
        run = p.Run(assignment=a, out_dir=sys.argv[1], cache_dir=sys.argv[1], device="cpu", worker="w")
        async def emit(msg):
            pass
        await sup.run(run, emit, anyio.Event())

    anyio.run(main)
    """
)


def test_kill9_of_the_worker_takes_its_template_and_task_with_it(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        template, task = map(int, proc.stdout.readline().split())
        time.sleep(0.5)  # the task is sleeping in its child now
        assert not _gone(task) and not _gone(template)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 5
        while not (_gone(template) and _gone(task)):
            if time.monotonic() > deadline:
                pytest.fail(f"template {template} or task {task} outlived its worker")
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
