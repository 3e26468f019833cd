"""Cairn's user-facing API, compatible with Ray Core (``import sdk as ray``); built from
issue 3 on."""
