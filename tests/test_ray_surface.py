"""The rest of Ray Core's public surface (issue 18): names a Ray program imports exist
in ``sdk`` with Ray's shape (Ray 2.60's names: tests/ray_names.py)."""

from __future__ import annotations

import pytest
from ray_names import RAY_EXCEPTIONS

import sdk
import sdk.exceptions


def test_every_exception_of_ray_is_in_sdk_exceptions_with_its_bases() -> None:
    for name, bases in RAY_EXCEPTIONS.items():
        ours = getattr(sdk.exceptions, name, None)
        assert ours is not None, f"sdk.exceptions has no {name}"
        assert tuple(base.__name__ for base in ours.__bases__) == bases, name
        assert name in sdk.exceptions.__all__


def test_errors_are_caught_as_ray_programs_catch_them() -> None:
    from sdk.exceptions import (
        ActorUnavailableError,
        GetTimeoutError,
        ObjectFreedError,
        RayActorError,
        RayChannelTimeoutError,
        RayError,
        ReferenceCountingAssertionError,
    )

    assert issubclass(ActorUnavailableError, RayActorError)
    assert issubclass(GetTimeoutError, TimeoutError) and issubclass(GetTimeoutError, RayError)
    assert issubclass(ObjectFreedError, sdk.exceptions.ObjectLostError)
    assert issubclass(ReferenceCountingAssertionError, AssertionError)
    assert issubclass(RayChannelTimeoutError, TimeoutError)


def test_a_ray_client_address_is_refused_naming_the_address_cairn_takes() -> None:
    with pytest.raises(ValueError, match="HOST:PORT of a cluster's head") as refused:
        sdk.init(address="ray://10.0.0.5:10001")
    assert "ray://" in str(refused.value)
    assert not sdk.is_initialized()


def test_id_classes_wrap_hex_ids_as_rays_do() -> None:
    actor = sdk.ActorID.from_hex("ab" * 16)
    assert actor.hex() == "ab" * 16 and actor.binary() == bytes.fromhex("ab" * 16)
    assert actor == sdk.ActorID(bytes.fromhex("ab" * 16)) and actor != sdk.TaskID("ab" * 16)
    assert len({actor, sdk.ActorID("AB" * 16)}) == 1
    assert sdk.NodeID.nil().is_nil() and not actor.is_nil()
    with pytest.raises(ValueError, match="not a hex id"):
        sdk.JobID("not hex")
    assert sdk.cloudpickle.loads(sdk.cloudpickle.dumps(actor)) == actor


def test_init_arguments_without_effect_are_named_in_a_warning() -> None:
    with (
        pytest.warns(UserWarning, match="include_dashboard, logging_level have no effect"),
        pytest.raises(ValueError, match="ray://"),  # (refused after the warning)
    ):
        sdk.init(address="ray://x:1", include_dashboard=False, logging_level="INFO")
