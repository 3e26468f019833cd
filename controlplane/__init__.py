"""Cairn's control plane: the GCS (an event-sourced PostgreSQL log), its projections,
the embedded PostgreSQL server, and the ``cairn`` command line."""
