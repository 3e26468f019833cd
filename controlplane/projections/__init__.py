"""Current-state projections of the log (jobs, tasks, objects, actors, nodes): what each
event does to them (spec) and the follower that keeps them (projector)."""

from controlplane.projections.projector import Projector
from controlplane.projections.spec import TABLES, TRANSITIONS, fold

__all__ = ["TABLES", "TRANSITIONS", "Projector", "fold"]
