"""`fleet-worker --gpu UUID | --cpu`: one worker process (systemd runs one per GPU)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fleet-worker", description="run tasks for a fleet on one GPU or the CPU"
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--gpu", metavar="UUID", help="the GPU this worker owns, by NVML UUID (GPU-...)")
    which.add_argument("--cpu", action="store_true", help="a CPU worker")
    parser.add_argument("--id", help="worker id (default: host and GPU UUID prefix, or host-cpuN)")
    parser.add_argument("--index", type=int, default=0, help="CPU worker number, for the default id")
    parser.add_argument(
        "--nats",
        default=os.environ.get("FLEET_NATS_URL", ""),
        help="NATS URL, or a cluster's URLs comma-separated (default $FLEET_NATS_URL)",
    )
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("FLEET_HOME", ".fleet")))
    parser.add_argument(
        "--creds",
        help="the worker's NKEY seed file (default nats.credentials_file, else <home>/creds/worker.nk)",
    )
    parser.add_argument(
        "--tls-ca",
        help="the CA for tls:// servers (default nats.tls_ca_file, else <home>/tls/ca.pem)",
    )
    parser.add_argument("--config", type=Path, help="fleetd.toml (default <home>/fleetd.toml if present)")
    parser.add_argument("--threads", type=int, help="CPU threads per task (OMP_NUM_THREADS)")
    parser.add_argument("--log-file", type=Path)
    args = parser.parse_args(argv)
    if args.gpu:
        # Before anything imports torch: CUDA's own order differs from NVML's on mixed boxes.
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu

    import anyio

    from fleet import config, creds, logs, tls
    from schemas.messages import NAME
    from workers import gpus
    from workers.worker import Worker, default_id

    logs.configure(path=args.log_file)
    try:
        cfg = config.load(args.config, home=str(args.home))  # the TOML, then FLEET_WORKER_*
        creds_file = creds.find(args.home, "worker", args.creds or cfg.nats.credentials_file)
        ca_file = tls.find_ca(args.home, args.tls_ca or cfg.nats.tls_ca_file)
    except (config.ConfigError, creds.CredsError, FileNotFoundError) as e:
        parser.error(str(e))
    settings = cfg.worker
    if not args.nats:
        home_file = args.home / "fleetd.json"
        if not home_file.is_file():
            parser.error(f"no --nats and no running fleet under {args.home} ({home_file} missing)")
        import json

        args.nats = json.loads(home_file.read_text())["nats_url"]
    gpu = None
    if args.gpu:
        found = {g.uuid: g for g in gpus.discover()}
        if args.gpu not in found:
            parser.error(f"GPU {args.gpu} not found; this machine has: {', '.join(found) or 'none'}")
        gpu = found[args.gpu]
    worker_id = args.id or default_id(gpu, args.index)
    if not re.fullmatch(NAME, worker_id):  # it names a subject and a log file
        parser.error(
            f"worker id {worker_id!r}: letters, digits, '_' and '-' (a letter or digit first), at most 64"
        )
    worker = Worker(
        worker_id,
        args.nats,
        args.home,
        gpu,
        heartbeat_s=settings.heartbeat_s,
        cancel_grace_s=settings.cancel_grace_s,
        preload=settings.preload,
        threads=args.threads,
        creds_file=creds_file,
        ca_file=ca_file,
        artifacts=cfg.artifacts,
    )
    anyio.run(_run_until_signal, worker)
    return 0


async def _run_until_signal(worker) -> None:  # type: ignore[no-untyped-def]
    import signal

    import anyio

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                tg.cancel_scope.cancel()
                return


if __name__ == "__main__":
    sys.exit(main())
