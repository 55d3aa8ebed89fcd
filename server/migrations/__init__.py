"""Alembic migrations for SQLite and Postgres, run through :mod:`muster.server.storage.migrate`.

Kept inside the ``server`` package (not beside an ``alembic.ini``) so an installed
Muster can migrate its database with ``muster db upgrade`` and nothing else.
"""
