"""The fleet store: SQLAlchemy Core over SQLite (default, zero set-up) or PostgreSQL (by URL).

:class:`Store` owns the engine and the schema: :meth:`Store.open` connects, runs the Alembic
migrations to the newest revision (under a lock, so several fleet workers may start at once) and
checks that the store belongs to the fleet being served. Every fleet module reads and writes
through it:

- :meth:`Store.read` - a connection for queries;
- :meth:`Store.write` - a transaction that commits on success (``BEGIN IMMEDIATE`` on SQLite, so
  two writers queue up instead of failing half-way);
- :meth:`Store.insert_ignore` - batch insert that skips rows whose key exists (``ON CONFLICT DO
  NOTHING`` on both databases), optionally returning the keys it did insert;
- :meth:`Store.greatest` - ``GREATEST(a, b)`` in either dialect.

SQLite runs in WAL mode with ``synchronous=FULL`` by default: the fleet acks a window to its device
only after the commit, so a commit must survive a power cut, not just a crash.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError

from edgeserve.errors import ConfigError, StoreError

from .tables import fleet_meta

__all__ = ["Store", "default_url", "normalize_url", "redact_url"]

SqliteSync = Literal["off", "normal", "full"]
_MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# Any constant works: it only has to be the same for every fleet worker migrating this database.
_PG_MIGRATION_LOCK = 0x6564_6765_7376
_SQLITE_BUSY_MS = 30_000


def default_url() -> str:
    """``sqlite:///`` in the user's data directory (``edgeserve/fleet.db``)."""
    from platformdirs import user_data_dir

    path = Path(user_data_dir("edgeserve", appauthor=False)) / "fleet.db"
    return f"sqlite:///{path}"


def normalize_url(url: str) -> str:
    """Pick the driver: ``postgresql://`` and ``postgres://`` use psycopg 3; a bare path is SQLite."""
    text = url.strip()
    if not text:
        raise ConfigError("empty database URL; expected sqlite:///PATH or postgresql://USER@HOST/DB")
    if "://" not in text:
        return f"sqlite:///{Path(text).expanduser()}"
    scheme, rest = text.split("://", 1)
    if scheme in ("postgres", "postgresql", "postgresql+psycopg"):
        return f"postgresql+psycopg://{rest}"
    if scheme in ("sqlite", "sqlite+pysqlite"):
        return text
    raise ConfigError(f"database URL scheme {scheme!r} is not supported; expected sqlite:///PATH "
                      "or postgresql://USER@HOST[:PORT]/DB")


def redact_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (for messages and logs)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


class Store:
    """The fleet's database: engine, migrations, transactions and dialect helpers."""

    def __init__(self, url: str | None = None, *, sqlite_synchronous: SqliteSync = "full",
                 pool_size: int = 5, create: bool = True) -> None:
        self.url = normalize_url(url or default_url())
        try:
            parsed = make_url(self.url)
        except ArgumentError as exc:
            raise ConfigError(f"database URL {url!r} is not valid: {exc}") from None
        self.dialect = parsed.get_backend_name()
        self._sqlite_sync = sqlite_synchronous
        self._fleet_lock = threading.Lock()
        if self.dialect == "sqlite":
            self._prepare_sqlite_path(parsed.database, create)
            self.engine = sa.create_engine(self.url, pool_size=pool_size, max_overflow=4)
            self._configure_sqlite(self.engine)
        else:
            self.engine = sa.create_engine(self.url, pool_size=pool_size, max_overflow=4,
                                           pool_pre_ping=True)
        self._write_engine = self.engine.execution_options(es_write=True)

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str | None = None, *, fleet: str | None = None,
             migrate: bool = True, **options: Any) -> Store:
        """Connect, migrate to the newest schema and (given ``fleet``) claim the store for it."""
        store = cls(url, **options)
        try:
            store.check_connection()
            if migrate:
                store.migrate()
            if fleet is not None:
                store.claim_fleet(fleet)
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_connection(self) -> None:
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot open the fleet store at {redact_url(self.url)}: "
                             f"{_reason(exc)}; expected a writable sqlite:///PATH or a reachable "
                             "postgresql://USER@HOST/DB") from None

    def migrate(self, revision: str = "head") -> None:
        """Run Alembic to ``revision`` (serialized between processes by a database lock)."""
        from alembic import command
        from alembic.config import Config
        from alembic.util import CommandError

        config = Config()
        config.set_main_option("script_location", str(_MIGRATIONS))
        try:
            with self.write() as conn:
                if self.dialect == "postgresql":
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"),
                                 {"k": _PG_MIGRATION_LOCK})
                config.attributes["connection"] = conn
                command.upgrade(config, revision)
        except CommandError as exc:
            raise StoreError(f"cannot migrate the fleet store at {redact_url(self.url)}: {exc} "
                             "(was it created by a newer edgeserve?)") from None
        except SQLAlchemyError as exc:
            raise StoreError(f"migrating the fleet store at {redact_url(self.url)} failed: "
                             f"{_reason(exc)}") from None

    def schema_revision(self) -> str | None:
        """The Alembic revision the database is at (None before the first migration)."""
        from alembic.runtime.migration import MigrationContext

        with self.read() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def claim_fleet(self, fleet: str) -> None:
        """Record which fleet this store serves; refuse to mix two fleets in one store."""
        with self._fleet_lock, self.write() as conn:
            self.insert_ignore(conn, fleet_meta, [{"key": "fleet", "value": fleet}], ["key"])
            owner = conn.execute(sa.select(fleet_meta.c.value)
                                 .where(fleet_meta.c.key == "fleet")).scalar_one()
        if owner != fleet:
            raise StoreError(f"the store at {redact_url(self.url)} belongs to fleet {owner!r}, "
                             f"not {fleet!r}; use one database per fleet")

    def fleet(self) -> str | None:
        with self.read() as conn:
            value = conn.execute(sa.select(fleet_meta.c.value)
                                 .where(fleet_meta.c.key == "fleet")).scalar_one_or_none()
        return None if value is None else str(value)

    # -- transactions ----------------------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for queries (its implicit transaction is rolled back at the end)."""
        try:
            with self.engine.connect() as conn:
                yield conn
        except DBAPIError as exc:
            raise StoreError(f"fleet store query failed: {_reason(exc)}") from None

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A transaction that commits when the block ends without an exception."""
        try:
            with self._write_engine.begin() as conn:
                yield conn
        except DBAPIError as exc:
            raise StoreError(f"fleet store write failed: {_reason(exc)}") from None

    # -- dialect helpers -------------------------------------------------------------------------

    def insert_ignore(self, conn: Connection, table: sa.Table, rows: Sequence[Mapping[str, Any]],
                      keys: Sequence[str], returning: Sequence[str] = ()) -> list[sa.Row[Any]]:
        """Insert ``rows`` (one batch), skipping those whose ``keys`` exist already.

        With ``returning``, the given columns of the rows actually inserted come back.
        """
        if not rows:
            return []
        if self.dialect == "postgresql":
            return self._pg_insert_ignore(conn, table, rows, keys, returning)
        if self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            stmt = sqlite_insert(table).on_conflict_do_nothing(index_elements=list(keys))
        else:  # pragma: no cover - normalize_url admits only the two
            raise StoreError(f"database dialect {self.dialect!r} is not supported")
        if returning:
            result = conn.execute(stmt.returning(*(table.c[name] for name in returning)),
                                  list(rows))
            return list(result.all())
        conn.execute(stmt, list(rows))
        return []

    def _pg_insert_ignore(self, conn: Connection, table: sa.Table,
                          rows: Sequence[Mapping[str, Any]], keys: Sequence[str],
                          returning: Sequence[str]) -> list[sa.Row[Any]]:
        # One statement over column arrays (INSERT ... SELECT FROM unnest): psycopg converts
        # its text once, where a multi-row VALUES statement costs ~0.3 s per 1000 rows to build.
        columns = list(rows[0])
        dialect = conn.dialect
        # %(name)b: binary parameters, so long JSON strings are not escaped one quote at a time.
        arrays = ", ".join(
            f"CAST(%(p{i})b AS {table.c[name].type.compile(dialect=dialect)}[])"
            for i, name in enumerate(columns))
        quoted = ", ".join(dialect.identifier_preparer.quote(name) for name in columns)
        conflict = ", ".join(dialect.identifier_preparer.quote(name) for name in keys)
        sql = (f"INSERT INTO {dialect.identifier_preparer.format_table(table)} ({quoted}) "
               f"SELECT * FROM unnest({arrays}) ON CONFLICT ({conflict}) DO NOTHING")
        if returning:
            sql += " RETURNING " + ", ".join(dialect.identifier_preparer.quote(n)
                                             for n in returning)
        params = {f"p{i}": [row[name] for row in rows] for i, name in enumerate(columns)}
        result = conn.exec_driver_sql(sql, params)
        return list(result.all()) if returning else []

    def greatest(self, *values: Any) -> sa.ColumnElement[Any]:
        """SQL ``GREATEST`` (PostgreSQL) / multi-argument ``MAX`` (SQLite)."""
        func = sa.func.greatest if self.dialect == "postgresql" else sa.func.max
        return func(*values)

    # -- SQLite set-up ---------------------------------------------------------------------------

    @staticmethod
    def _prepare_sqlite_path(database: str | None, create: bool) -> None:
        if not database or database == ":memory:":
            raise ConfigError("an in-memory SQLite store cannot be shared between the fleet's "
                              "threads; give a file: sqlite:///PATH")
        path = Path(database).expanduser()
        if not create and not path.exists():
            raise StoreError(f"there is no fleet store at {path}; 'edgeserve fleet serve "
                             "--db ...' creates it (or pass the --db of an existing store)")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the directory for the fleet store {path}: "
                             f"{exc.strerror}") from None

    def _configure_sqlite(self, engine: Engine) -> None:
        sync = self._sqlite_sync

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Take transaction control away from pysqlite so BEGIN is ours (see write()).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={sync.upper()}")
            cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_MS}")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            immediate = conn.get_execution_options().get("es_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _reason(exc: SQLAlchemyError) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
