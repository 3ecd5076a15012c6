"""How the one GRPO driver and the one SFT driver reach their roles, chosen by name (``TRANSPORTS``):

- ``ray`` (``rl.launch``): Ray actor groups: the rollout group, the reward pool, the DeepSpeed learner group and the
  weight sync of ``learner.sync_backend``; chains travel as ObjectRefs, and a lost actor is healed (its errors are
  ``lost_actor_errors``).
- ``local`` (``rl.one_process``): the same plain classes the actors wrap (``RolloutWorker``, ``RewardWorker``,
  ``LearnerWorker`` at world size 1) in this process (``rl.local_roles``), for a GPU machine without Ray or vLLM.

One contract: ``check(cfg)`` before anything is built, then ``rollout_group``, ``reward_pool``, ``learner_group``,
``weight_sync``; ``fetch`` turns what ``submit_generate`` returned into Rollouts. Nothing here imports Ray until the
``ray`` transport builds something, so the drivers import on a machine without it.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Protocol, Sequence

from core.config import ExperimentConfig


class Transport(Protocol):
    name: str

    def check(self, cfg: ExperimentConfig) -> None:
        """A ConfigError naming the key this transport cannot honour."""

    def rollout_group(self, cfg: ExperimentConfig) -> Any: ...

    def reward_pool(self, cfg: ExperimentConfig) -> Any: ...

    def learner_group(self, cfg: ExperimentConfig, **worker_kwargs: Any) -> Any: ...

    def weight_sync(self, cfg: ExperimentConfig, learner: Any, rollouts: Any) -> Any: ...

    def fetch(self, chains: Any) -> Any:
        """A chain handle (or a list of them) -> the Rollout(s)."""

    def lost_actor_errors(self) -> tuple[type[BaseException], ...]:
        """The errors that may mean a lost actor (``rl.run_state.run_steps`` asks ``is_lost`` before healing)."""

    def is_lost(self, exc: BaseException, roles: Sequence[Any]) -> bool:
        """Whether ``exc`` is a lost actor (healed by rebuilding the roles) rather than an error of the code an
        actor ran (a bug, a bad input, a full disk: the run ends at once). ``roles``: the driver's live groups."""


class RayTransport:
    name = "ray"
    death_grace_s = 5.0  # how long is_lost waits for the cluster to report a death before it blames the code

    def check(self, cfg: ExperimentConfig) -> None:
        pass  # core.validation checked everything Ray can run

    def rollout_group(self, cfg: ExperimentConfig) -> Any:
        from actors.group import RolloutGroup

        return RolloutGroup(cfg)

    def reward_pool(self, cfg: ExperimentConfig) -> Any:
        from rewards.pool import RewardPool

        return RewardPool(cfg.reward, strategy=cfg.ray.placement_strategy, name=f"{cfg.name}-reward")

    def learner_group(self, cfg: ExperimentConfig, **worker_kwargs: Any) -> Any:
        from learner.group import LearnerGroup

        return LearnerGroup(cfg, **worker_kwargs)

    def weight_sync(self, cfg: ExperimentConfig, learner: Any, rollouts: Any) -> Any:
        from rl.weight_sync import build_weight_sync

        return build_weight_sync(cfg, learner, rollouts)

    def fetch(self, chains: Any) -> Any:
        import ray

        return ray.get(chains)

    def lost_actor_errors(self) -> tuple[type[BaseException], ...]:
        from ray.exceptions import RayError

        from core.faults import ActorLost
        from core.weight_broadcast import SyncGroupError

        return RayError, SyncGroupError, ActorLost

    def is_lost(self, exc: BaseException, roles: Sequence[Any]) -> bool:
        """A lost actor: Ray's report of a dead or unreachable actor, a failed sync group, ``ActorLost``; or an
        exception an actor's code raised (``RayTaskError``) while an actor of ``roles`` is gone: a learner rank sees
        its peer's death as a collective error. An exception raised while every actor is alive (checked for
        ``death_grace_s``, the time the cluster takes to report a death) is the code's: not lost."""
        from ray.exceptions import RayTaskError

        if not isinstance(exc, self.lost_actor_errors()):
            return False
        if not isinstance(exc, RayTaskError):
            return True
        cause = getattr(exc, "cause", None)
        if isinstance(cause, self.lost_actor_errors()):
            return self.is_lost(cause, roles)
        deadline = time.monotonic() + self.death_grace_s
        while True:
            if any(role.lost_actors() for role in roles if hasattr(role, "lost_actors")):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)


def local_transport(dist_env: Optional[dict[str, str]] = None) -> Transport:
    from rl.local_roles import LocalTransport

    return LocalTransport(dist_env)


TRANSPORTS = {"ray": RayTransport, "local": local_transport}


def trainer_for(cfg: ExperimentConfig, transport: Transport) -> Any:
    """The driver of ``cfg.mode`` (``sft``: the cold start, ``grpo``) over ``transport``."""
    if cfg.mode == "sft":
        from rl.sft import SFTTrainer

        return SFTTrainer(cfg, transport)
    from rl.trainer import GRPOTrainer

    return GRPOTrainer(cfg, transport)
