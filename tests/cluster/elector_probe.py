"""One controller replica's leadership, alone in a process so that a test can kill -9 or SIGSTOP it: runs
the real `Elector` against the etcd cluster and prints every change of `acts()` as sampled every 5 ms,
"<CLOCK_MONOTONIC seconds> <0|1>", flushed at once (the clock is the machine's, shared by every process)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from controller.cluster.elector import Elector
from controller.cluster.etcd import EtcdDcs, EtcdTls


async def main(args: argparse.Namespace) -> None:
    dcs = EtcdDcs(args.endpoint, EtcdTls(args.ca, args.cert, args.key), timeout=args.timeout)
    elector = Elector(dcs, args.name, ttl_seconds=args.ttl, key=args.leader_key)
    task = asyncio.create_task(elector.run())
    last = None
    while not task.done():
        acting = elector.acts()
        if acting != last:
            print(f"{time.monotonic():.6f} {int(acting)}", flush=True)
            last = acting
        await asyncio.sleep(0.005)
    task.result()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--endpoint", action="append", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--ttl", type=int, default=2)
    p.add_argument("--leader-key", default="/test/leader")
    p.add_argument("--timeout", type=float, default=0.5)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    asyncio.run(main(p.parse_args()))
