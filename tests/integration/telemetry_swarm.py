"""Many device links in one process, each with its own real outbox and paho client.

Run by the storm tests as a child process (so it can be killed with SIGKILL mid-flush)::

    python -m tests.integration.telemetry_swarm --dir DIR --port P --fleet F --devices d1,d2,…

It starts one :class:`Link` per device over ``DIR/<device>.db`` and exits 0 once every outbox is
empty (the fleet acked everything), or 1 when ``--deadline`` seconds passed first. It prints one
JSON line with what it did.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from edgeserve.device_agent.telemetry.link import Link, LinkSettings
from edgeserve.device_agent.telemetry.outbox import Outbox
from edgeserve.mqtt import BrokerSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fleet", required=True)
    parser.add_argument("--devices", required=True)
    parser.add_argument("--deadline", type=float, default=240.0)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--ack-timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    links = []
    for device in args.devices.split(","):
        outbox = Outbox(args.dir / f"{device}.db", synchronous="normal")
        settings = LinkSettings(BrokerSettings(port=args.port), args.fleet, device,
                                batch_windows=args.batch, rate_windows_per_s=2000,
                                max_unacked_windows=200, ack_timeout_s=args.ack_timeout,
                                backoff_min_s=0.3, backoff_max_s=3.0)
        links.append(Link(settings, outbox, status_info=lambda: {"profile": "generic-cpu"}))
    started = time.monotonic()
    for link in links:
        link.start()
    done = False
    while time.monotonic() - started < args.deadline:
        if all(link.outbox.floor() == link.outbox.next_seq() for link in links):
            done = True
            break
        time.sleep(0.25)
    for link in links:
        link.stop(timeout=5)
    summary = {
        "done": done, "seconds": round(time.monotonic() - started, 2),
        "windows_sent": sum(link.stats.windows_sent for link in links),
        "bytes_sent": sum(link.stats.bytes_sent for link in links),
        "batches_sent": sum(link.stats.batches_sent for link in links),
        "retransmits": sum(link.stats.retransmits for link in links),
        "connects": sum(link.stats.connects for link in links),
        "left": sum(link.outbox.next_seq() - link.outbox.floor() for link in links),
    }
    for link in links:
        link.outbox.close()
    print(json.dumps(summary), flush=True)
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
