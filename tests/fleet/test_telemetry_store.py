"""The fleet store: migrations, idempotent windows, contiguous acks, the device registry."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from edgeserve.contract import Status, TelemetryBatch, Window, encode
from edgeserve.errors import ConfigError, StoreError
from edgeserve.fleet.ingest import Ingestor
from edgeserve.fleet.registry import apply_status, get_device, list_devices
from edgeserve.fleet.store import Store, normalize_url, redact_url
from edgeserve.fleet.tables import metadata, windows
from edgeserve.fleet.telemetry import _quantiles, advance_acks, query_windows
from edgeserve.telemetry import LatencyHistogram

FLEET = "acme"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """A migrated store on SQLite or on PostgreSQL (a fresh schema)."""
    url = (f"sqlite:///{tmp_path}/fleet.db" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    s = Store.open(url, fleet=FLEET)
    request.addfinalizer(s.close)
    return s


def batch(device: str, seqs: list[int], floor: int | None = None, dropped: int = 0) -> bytes:
    hist = LatencyHistogram()
    for value in (1.0, 2.0, 4.0):
        hist.add(value)
    ws = [Window(seq=s, start=1000.0 + s, end=1060.0 + s, model="m", version="1.0.0",
                 requests=5, errors=1, latency=hist.to_data(), dropped=dropped) for s in seqs]
    return encode(TelemetryBatch(device_id=device, windows=ws, floor=floor))


def topic(device: str, kind: str = "telemetry") -> str:
    return f"edgeserve/v1/{FLEET}/devices/{device}/{kind}"


def ingest(ing: Ingestor, *payloads: tuple[str, bytes]) -> dict[str, int]:
    parsed = [ing.parse(t, p) for t, p in payloads]
    return ing.commit([p for p in parsed if p is not None])


def count(store: Store) -> int:
    with store.read() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(windows)).scalar_one())


def test_migrations_build_the_schema_the_tables_describe(store: Store) -> None:
    """After migrating, the database has exactly the tables and columns of tables.py."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    head = _head_revision()
    assert store.schema_revision() == head
    with store.read() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diffs == []
    store.migrate()  # a second run is a no-op
    assert store.schema_revision() == head


def _head_revision() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from edgeserve.fleet import migrations

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def test_store_belongs_to_one_fleet(tmp_path: Path) -> None:
    """A store claimed by one fleet refuses to serve another."""
    url = f"sqlite:///{tmp_path}/f.db"
    Store.open(url, fleet="one").close()
    with pytest.raises(StoreError, match="belongs to fleet 'one'"):
        Store.open(url, fleet="two")


def test_reading_a_missing_sqlite_store_says_how_to_create_it(tmp_path: Path) -> None:
    """Opening a store that does not exist for reading names the path and the command."""
    with pytest.raises(StoreError, match="fleet serve"):
        Store.open(f"sqlite:///{tmp_path}/nope.db", create=False)


def test_database_urls_are_normalized_and_redacted() -> None:
    """postgres URLs use psycopg 3, bare paths are SQLite, passwords never show."""
    assert normalize_url("postgresql://u:p@h/db").startswith("postgresql+psycopg://")
    assert normalize_url("postgres://u@h/db").startswith("postgresql+psycopg://")
    assert normalize_url("/tmp/x.db") == "sqlite:////tmp/x.db"
    assert "secret" not in redact_url("postgresql+psycopg://u:secret@h/db")
    with pytest.raises(ConfigError, match="not supported"):
        normalize_url("mysql://h/db")


def test_windows_are_stored_once_whatever_the_redelivery(store: Store) -> None:
    """Delivering the same windows again stores nothing new and counts duplicates."""
    ing = Ingestor(store, FLEET)
    ingest(ing, (topic("d1"), batch("d1", [1, 2, 3])))
    ingest(ing, (topic("d1"), batch("d1", [2, 3, 4])), (topic("d1"), batch("d1", [1])))
    assert count(store) == 4
    assert ing.stats.windows_stored == 4
    assert ing.stats.duplicates == 3
    device = get_device(store, "d1")
    assert device is not None and device.windows_stored == 4


def test_ack_is_the_highest_contiguous_sequence(store: Store) -> None:
    """A gap holds the ack back until it is filled; then it jumps over everything stored."""
    ing = Ingestor(store, FLEET)
    assert ingest(ing, (topic("d1"), batch("d1", [1, 2, 3, 6, 7]))) == {"d1": 3}
    assert ingest(ing, (topic("d1"), batch("d1", [5]))) == {"d1": 3}
    assert ingest(ing, (topic("d1"), batch("d1", [4]))) == {"d1": 7}
    assert get_device(store, "d1").acked_seq == 7  # type: ignore[union-attr]


def test_ack_steps_over_windows_the_device_dropped(store: Store) -> None:
    """With the device's floor, seqs it dropped no longer hold the ack back; drops are summed."""
    ing = Ingestor(store, FLEET)
    assert ingest(ing, (topic("d1"), batch("d1", [1, 2]))) == {"d1": 2}
    # 3..10 were dropped by the outbox; 11 says so and the batch says the device holds 11+
    assert ingest(ing, (topic("d1"), batch("d1", [11, 12], floor=11, dropped=4))) == {"d1": 12}
    device = get_device(store, "d1")
    assert device is not None and device.dropped_total == 8
    # a floor above the batch's lowest seq is capped there: the ack never passes unsent windows
    assert ingest(ing, (topic("d1"), batch("d1", [14], floor=20))) == {"d1": 14}


def test_acks_of_many_devices_at_once_match_one_device_at_a_time(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Acks are read for many devices per query: with gaps, floors, devices with nothing new and
    runs longer than one scan (scan and group sizes shrunk to force every path), each device's
    ack is the highest contiguous seq above its floor, as computed here one device at a time."""
    from edgeserve.fleet import telemetry

    monkeypatch.setattr(telemetry, "_ACK_SCAN", 7)
    monkeypatch.setattr(telemetry, "_ACK_GROUP", 3)
    rng = random.Random(5)
    ing = Ingestor(store, FLEET)
    stored: dict[str, set[int]] = {}
    messages = []
    for d in range(11):
        device = f"m{d:02d}"
        seqs = sorted(rng.sample(range(1, 40), rng.randint(0, 30))) if d != 3 else \
            list(range(1, 36))  # one long run: several scans
        if not seqs:
            continue
        stored[device] = set(seqs)
        messages.append((topic(device), batch(device, seqs)))
    acks = ingest(ing, *messages)
    for device, seqs in stored.items():
        top = 0
        while top + 1 in seqs:
            top += 1
        assert acks[device] == top, (device, sorted(seqs))
        assert get_device(store, device).acked_seq == top  # type: ignore[union-attr]
    floors = {device: 1 for device in stored} | {"m-unknown": 1}
    assert telemetry.advance_acks(store, floors) == {**acks, "m-unknown": 0}


def test_concurrent_workers_ack_the_whole_run(store: Store) -> None:
    """Two workers storing interleaved parts of one backlog end at the top of the run."""
    a, b = Ingestor(store, FLEET), Ingestor(store, FLEET)
    parts = [list(range(i * 20 + 1, i * 20 + 21)) for i in range(20)]
    random.Random(3).shuffle(parts)
    errors: list[BaseException] = []

    def run(ing: Ingestor, mine: list[list[int]]) -> None:
        try:
            for seqs in mine:
                ingest(ing, (topic("d1"), batch("d1", seqs)))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(a, parts[::2])),
               threading.Thread(target=run, args=(b, parts[1::2]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert count(store) == 400
    assert get_device(store, "d1").acked_seq == 400  # type: ignore[union-attr]
    assert advance_acks(store, {"d1": 1}) == {"d1": 400}


def test_two_workers_writing_the_same_devices_in_crossed_orders_do_not_deadlock(
        store: Store) -> None:
    """Two workers at once, each group mixing status messages of some devices with telemetry of
    others, crossed (one worker's statuses are the other's telemetry; newest statuses first):
    the device rows are locked in key order up front, so PostgreSQL never reports a deadlock
    (a StoreError here) and every window is stored and acked."""
    devices_ = [f"x{i:02d}" for i in range(12)]
    first, second = devices_[:6], devices_[6:]
    errors: list[BaseException] = []

    def run(statuses: list[str], telemetry: list[str]) -> None:
        ing = Ingestor(store, FLEET)
        try:
            for round_ in range(15):
                payloads = [(topic(d, "status"), encode(Status(device_id=d, state="online",
                                                               ts=1000 - round_)))
                            for d in reversed(statuses)]
                payloads += [(topic(d), batch(d, [round_ + 1])) for d in telemetry]
                ingest(ing, *payloads)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(first, second)),
               threading.Thread(target=run, args=(second, first))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert count(store) == 12 * 15
    assert advance_acks(store, {d: 1 for d in devices_}) == {d: 15 for d in devices_}


def test_status_newest_wins_and_last_will_wins_a_tie(store: Store) -> None:
    """Birth then Last Will of one connection (same ts) leaves the device offline; older
    statuses are ignored; a newer birth brings it back with profile and versions."""
    with store.write() as conn:
        assert apply_status(store, conn, Status(device_id="d1", state="online", ts=100,
                                                profile="rpi5", models={"m": "1.0.0"},
                                                labels={"site": "a"}), 100.0)
        assert apply_status(store, conn, Status(device_id="d1", state="offline", ts=100,
                                                reason="connection lost"), 101.0)
        assert not apply_status(store, conn, Status(device_id="d1", state="online", ts=99),
                                102.0)
    device = get_device(store, "d1")
    assert device is not None
    assert (device.state, device.reason, device.profile) == ("offline", "connection lost", "rpi5")
    with store.write() as conn:
        apply_status(store, conn, Status(device_id="d1", state="online", ts=200, profile="rpi5",
                                         models={"m": "1.1.0"}), 200.0)
    device = get_device(store, "d1")
    assert device is not None and (device.state, device.models) == ("online", {"m": "1.1.0"})
    assert device.labels == {}
    assert [d.device_id for d in list_devices(store, state="online")] == ["d1"]


def test_query_windows_filters_and_orders(store: Store) -> None:
    """Listings filter by device, model and time, in window order; JSON keeps the payload."""
    ing = Ingestor(store, FLEET)
    ingest(ing, (topic("d1"), batch("d1", [1, 2, 3])), (topic("d2"), batch("d2", [1])))
    got = query_windows(store, device="d1", since=1061.5)
    assert [w.seq for w in got] == [2, 3]
    assert got[0].to_dict(with_data=True)["window"]["seq"] == 2
    assert got[0].latency_p95_ms == pytest.approx(2.0, rel=0.02)  # rank floor(0.95·2) = 1
    assert len(query_windows(store, model="m")) == 4
    assert query_windows(store, health=True) == []


def test_quantiles_read_off_the_wire_form_match_the_histogram() -> None:
    """The store's quantiles equal LatencyHistogram.quantile for random histograms."""
    rng = random.Random(5)
    for _ in range(100):
        hist = LatencyHistogram()
        for _ in range(rng.randint(1, 200)):
            hist.add(rng.choice([0.0, rng.lognormvariate(0, 2)]))
        qs = (0.0, 0.5, 0.95, 1.0)
        assert _quantiles(hist.to_data(), qs) == pytest.approx([hist.quantile(q) for q in qs])
