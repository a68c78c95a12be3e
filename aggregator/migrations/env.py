"""Alembic environment for the aggregator's store. Migrations run only through the aggregator
(`secagg aggregator migrate`, or on an empty store at start), which passes its connection."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the store's migrations with `secagg aggregator migrate --store URL`")
context.configure(connection=connection, target_metadata=None, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
