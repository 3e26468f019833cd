"""Cairn's data plane: per-node shared-memory object store, serialization, object
transfer and worker processes (built from issue 3 on)."""
