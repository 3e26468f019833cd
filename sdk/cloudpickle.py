"""``ray.cloudpickle``: the cloudpickle Cairn serializes with, by Ray's module path."""

from cloudpickle import *  # noqa: F403
from cloudpickle import CloudPickler, Pickler, dump, dumps, load, loads

__all__ = ["CloudPickler", "Pickler", "dump", "dumps", "load", "loads"]
