"""Alembic migrations of the fleet store (run by :meth:`edgeserve.fleet.store.Store.migrate`).

Add a revision with ``alembic -c <ini with script_location = fleet/migrations> revision -m ...``
or by copying the newest file in ``versions/``: set ``down_revision`` to the current head.
"""
