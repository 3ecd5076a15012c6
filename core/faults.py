"""The error a driver heals by rebuilding its roles, importable without Ray (the drivers' pure parts raise it)."""

from __future__ import annotations


class ActorLost(RuntimeError):
    """An actor is gone past its restarts (every reward actor, or the rollout actor that made a chain), seen
    where Ray reports no actor death of its own: the driver heals it by rebuilding the roles
    (``rl.run_state.run_steps``), as it does a dead learner rank."""
