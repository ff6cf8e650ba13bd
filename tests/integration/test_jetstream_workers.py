"""Fleet workers sharing telemetry on a NATS cluster through JetStream (issue 18).

NATS's MQTT listener has no ``$share/``; with ``fleet serve --nats`` the workers pull the
devices' telemetry and statuses from one durable JetStream consumer of a replicated work-queue
stream instead, so each message goes to one worker. Devices still speak MQTT 3.1.1 to the
cluster's MQTT listeners, and get their acks there.

Scenario: a fresh 3-node cluster, two ``fleet serve --nats`` processes on one PostgreSQL schema,
simulated devices with a backlog each (both workers store part of it), then a reconnect storm
during which the devices' node and worker 1 are killed -9. Every window the simulator numbered
is stored exactly once and acked.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from edgeserve.fleet.simulate import SimSettings, Simulator, raise_open_files_limit
from edgeserve.mqtt import BrokerSettings
from tests.integration.telemetry_support import (
    FleetProcess,
    store_counts,
    stored_by_workers,
)
from tests.natscluster import NatsCluster, nats_cluster  # noqa: F401 (a fixture)
from tests.services import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180)]

DEVICES = 300
BACKLOG = 5
STORM_BACKLOG = 5


def test_two_workers_share_a_jetstream_consumer_across_node_and_worker_kills(
        nats_cluster: NatsCluster, postgres_url: str, fleet_name: str,  # noqa: F811
        resources: contextlib.ExitStack) -> None:
    raise_open_files_limit(DEVICES + 512)
    mqtt_urls = nats_cluster.urls
    nats_urls = ",".join(f"nats://127.0.0.1:{n.client_port}" for n in nats_cluster.nodes)
    http_ports = [free_port(), free_port()]
    workers = [FleetProcess(fleet_name, postgres_url, f"{mqtt_urls[0]},{mqtt_urls[2]}",
                            extra=["--worker", str(i), "--nats", nats_urls,
                                   "--http-port", str(http_ports[i]), "--connect-timeout", "20"])
               for i in range(2)]
    for worker in workers:
        resources.callback(worker.kill)
        worker.start()
    assert any("jetstream:" in line for line in workers[0].lines), workers[0].lines[-5:]
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        # the devices on node 2 (node 3 when it is gone); the fleet's MQTT on nodes 1 and 3
        # subscriptions at QoS 0 (what docs/scale-out.md advises on NATS): no JetStream
        # consumer per device subscription
        settings = SimSettings(BrokerSettings.from_url(f"{mqtt_urls[1]},{mqtt_urls[2]}",
                                                       subscribe_qos=0),
                               fleet_name, DEVICES, batch_windows=10, ack_timeout_s=5.0, seed=7,
                               backoff_min_s=0.2, backoff_max_s=1.0)
        sim = Simulator(settings)
        sim.record(BACKLOG)
        consumers = _consumers(nats_cluster)
        await asyncio.to_thread(_poison, nats_cluster.nodes[0].mqtt_port, fleet_name)
        try:
            await sim.start()
            seen["new_consumers"] = _consumers(nats_cluster) - consumers
            seen["backlog_s"] = await sim.wait_acked(60)
            seen["before"] = await stored_by_workers(http_ports, DEVICES * BACKLOG)
            storm = asyncio.create_task(sim.storm(4.0, STORM_BACKLOG))
            await asyncio.sleep(1.5)
            nats_cluster.kill(nats_cluster.nodes[1])
            await asyncio.to_thread(workers[1].kill)
            seen["storm_s"] = await storm
            seen["acked_s"] = await sim.wait_acked(120)
            seen["counts"] = sim.counts()
            # everything taken from the stream was acknowledged, the poison too: nothing is
            # handed out again and again
            deadline = asyncio.get_running_loop().time() + 30
            while _feed_backlog(nats_cluster) and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.5)
            seen["feed_backlog"] = _feed_backlog(nats_cluster)
        finally:
            await sim.stop()

    asyncio.run(scenario())
    stats = workers[0].stop()
    counts = store_counts(postgres_url)
    mine = seen["counts"]
    total = DEVICES * (BACKLOG + STORM_BACKLOG)
    print(f"\nNATS JetStream, 2 workers: backlog acked in {seen['backlog_s']:.1f} s (workers "
          f"stored {seen['before']}); storm back in {seen['storm_s']:.1f} s, acked "
          f"{seen['acked_s']:.1f} s later; {mine['windows_sent']} windows sent for "
          f"{mine['windows']}, {mine['resends']} resends; worker 0: {stats}")
    assert seen["feed_backlog"] == 0, seen["feed_backlog"]
    # 3 QoS 1 subscriptions per device would have made 3 consumers each
    assert seen["new_consumers"] < DEVICES // 10, seen["new_consumers"]
    assert all(n > 0 for n in seen["before"]), f"one worker took everything: {seen['before']}"
    assert sum(seen["before"]) == DEVICES * BACKLOG
    assert mine["windows"] == total and mine["acked"] == total
    assert counts["total"] == total
    for device, per in mine["per_device"].items():
        assert counts["devices"][device] == (per["windows"], 1, per["windows"]), device
        assert counts["acked"][device] == per["windows"], device
    # what worker 0 rejected is poison only (either worker may have taken it)
    assert stats["rejected_total"] <= 2 * len(POISON), stats
    assert stats["rejected"]["error"] == 0 and stats["rejected"]["seq-jump"] == 0, stats


def _consumers(cluster: NatsCluster) -> int:
    """JetStream consumers in the cluster (the most any live node reports)."""
    return max(int(node.jsz().get("consumers", 0)) for node in cluster.nodes if node.alive)


POISON = [b"{", b"\xff\xfe\x00", b"[" * 5000 + b"]" * 5000, b'{"v":1,"device_id":"x","windows":7}',
          b'{"v":1,"device_id":"p-1","windows":[{"seq":"one"}]}', b"", b"null"]


def _poison(port: int, fleet: str) -> None:
    """Malformed telemetry and statuses into the stream (a device of a broken firmware, or an
    attacker on the broker): the workers reject them and acknowledge them all the same."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edgeserve.contract import device_topic

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        infos = [client.publish(device_topic(fleet, f"p-{i}", kind), payload, qos=1)
                 for i, payload in enumerate(POISON) for kind in ("telemetry", "status")]
        for info in infos:
            info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def _feed_backlog(cluster: NatsCluster) -> int:
    """Messages of the workers' JetStream consumer not yet acknowledged (pending or in flight)."""
    for node in cluster.nodes:
        if not node.alive:
            continue
        report = node.jsz("accounts=true&streams=true&consumers=true", timeout=5.0)
        for account in report.get("account_details", []):
            for stream in account.get("stream_detail", []):
                for consumer in stream.get("consumer_detail") or []:
                    if consumer.get("name") == "edgeserve-fleet":
                        return int(consumer["num_pending"]) + int(consumer["num_ack_pending"])
    raise AssertionError("no node reports the edgeserve-fleet consumer")
