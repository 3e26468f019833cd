"""The state API's error, with Ray's name (``ray.util.state.exception``)."""

from __future__ import annotations


class RayStateApiException(Exception):
    """The state API could not answer: the GCS was unreachable, the query outlasted its
    timeout, or a log was asked for (not yet served here)."""
