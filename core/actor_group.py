"""One actor-group base for the three roles (rollout, reward, learner): a placement group of one bundle per actor,
the actors started in their bundles, and their shutdown (OpenRLHF's RayActorGroup, verl's resource pool). A role
may bring its own ``core.placement.RoleLayout`` instead (the rollout's, when its vLLM runs tensor-parallel on
GPUs: each actor's bundle is followed by its vLLM workers' GPU bundles, and the actor starts with the environment
that places them there).

The roles' groups (``actors.group.RolloutGroup``, ``rewards.pool.RewardPool``, ``learner.group.LearnerGroup``)
subclass it and add their named, typed calls; a role's worker stays a plain class that Ray wraps here. The
bundles are ``core.placement``'s (``uniform_layout`` / ``rollout_layout``), the same ones
``python -m tools.resources`` checks against a cluster.

    group = ActorGroup("rollout", num_actors=2, num_cpus=1, num_gpus=0, strategy="PACK", name="run-rollout")
    group.start(RolloutWorker, lambda i: ((cfg, i), {}), max_restarts=3)
    refs = [a.ping.remote() for a in group.actors]
    group.shutdown()
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from core.faults import ActorLost
from core.placement import Bundle, RoleLayout, format_bundles, uniform_layout

# How long a role waits for the cluster (or KubeRay's autoscaler) to place its bundles before it gives up,
# naming itself and what it asked for: a cluster too small for the run fails, it never hangs.
READY_TIMEOUT_S = 600.0
ActorArgs = Callable[[int], tuple[tuple, dict]]  # actor index -> (args, kwargs) of the worker's __init__


class ProgressClock:
    """A hung actor is one that holds work and has returned none of it for ``timeout_s``: per actor, the time
    it last made progress while busy (it took work when idle, or returned a call). ``timeout_s`` 0: never hung.
    Thread-safe enough for one writer per actor (plain ints and floats)."""

    def __init__(self, num_actors: int, timeout_s: float):
        self.timeout_s = timeout_s
        self.busy = [0] * num_actors
        self.since = [0.0] * num_actors

    def started(self, k: int) -> None:
        if self.busy[k] == 0:
            self.since[k] = time.monotonic()
        self.busy[k] += 1

    def returned(self, k: int) -> None:
        self.busy[k] = max(self.busy[k] - 1, 0)
        self.since[k] = time.monotonic()

    def hold(self, k: int) -> None:
        """Actor ``k`` is not alive (Ray is restarting it: a vLLM engine takes minutes to load on a cluster). It
        makes no progress of its own meanwhile, so its clock waits: the call Ray re-runs gets the whole timeout."""
        self.since[k] = time.monotonic()

    def overdue(self) -> list[int]:
        """Busy actors without progress for ``timeout_s``; each is reported once per timeout (the clock restarts,
        which gives a killed actor ``timeout_s`` to restart and finish the call Ray re-runs)."""
        if not self.timeout_s:
            return []
        now = time.monotonic()
        late = [k for k, n in enumerate(self.busy) if n and now - self.since[k] > self.timeout_s]
        for k in late:
            self.since[k] = now
        return late


def reserve(role: str, bundles: list[Bundle], strategy: str, name: str,
            timeout_s: float = READY_TIMEOUT_S) -> PlacementGroup:
    """A placement group of ``bundles``, placed (or an error naming the role and what it asked for)."""
    pg = placement_group([dict(b) for b in bundles], strategy=strategy, name=name)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise RuntimeError(
            f"{role} placement group ({format_bundles(bundles)}, strategy {strategy}) not placed after "
            f"{timeout_s:.0f} s; "
            f"cluster resources: {ray.cluster_resources()} (check with python -m tools.resources)"
        ) from None
    return pg


def actor_states(actors: list[Any]) -> list[str]:
    """The GCS's state of each actor (ALIVE, RESTARTING, DEAD, ...; UNKNOWN where it cannot say). Read from the GCS
    actor table, which needs no dashboard (Ray's state API does) and never waits on the actor's own queue, so a busy
    or hung actor still answers."""
    from ray._private import state as gcs

    out = []
    for a in actors:
        try:
            out.append(str(gcs.actors(actor_id=a._actor_id.hex())["State"]))
        except Exception:  # noqa: BLE001 - an actor the table does not know counts as not alive
            out.append("UNKNOWN")
    return out


class ActorGroup:
    """``num_actors`` actors of one role, actor i in bundle i of the role's placement group; or, given a ``layout``,
    actor i in its ``layout.actors[i]`` (own bundle, resources, environment)."""

    def __init__(self, role: str, num_actors: int, num_cpus: float, num_gpus: float, strategy: str, name: str,
                 ready_timeout_s: float = READY_TIMEOUT_S, layout: Optional[RoleLayout] = None):
        if num_actors < 1:
            raise ValueError(f"{role}: num_actors = {num_actors} must be >= 1")
        self.layout = layout or uniform_layout(num_actors, num_cpus, num_gpus)
        if len(self.layout.actors) != num_actors:
            raise ValueError(f"{role}: the layout places {len(self.layout.actors)} actors, not {num_actors}")
        self.role, self.num_actors = role, num_actors
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.actors: list[Any] = []
        self.placement_group: Optional[PlacementGroup] = reserve(role, self.layout.bundles, strategy, name,
                                                                 ready_timeout_s)

    def bundle(self, index: int) -> PlacementGroupSchedulingStrategy:
        """Schedule a task or actor in bundle ``index`` of this role (e.g. a probe on rank 0's node)."""
        return PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=index)

    def start(self, worker_cls: type, args: ActorArgs, **options: Any) -> list[Any]:
        """Start one ``ray.remote(worker_cls)`` actor per actor of the layout, in its own bundle with its resources;
        ``options`` are Ray actor options (max_restarts, runtime_env, concurrency_groups, ...); the layout's
        environment variables of an actor are added to ``runtime_env`` (Ray merges them with the job's). On any
        failure the group is shut down and the error raised."""
        groups = options.pop("concurrency_groups", None)  # a class option in Ray, not a per-actor one
        remote = ray.remote(concurrency_groups=groups)(worker_cls) if groups else ray.remote(worker_cls)
        try:
            for i, place in enumerate(self.layout.actors):
                a, kw = args(i)
                opts = dict(options)
                if place.env_vars:
                    env = dict(opts.get("runtime_env") or {})
                    env["env_vars"] = {**(env.get("env_vars") or {}), **place.env_vars}
                    opts["runtime_env"] = env
                self.actors.append(remote.options(num_cpus=place.num_cpus, num_gpus=place.num_gpus,
                                                  scheduling_strategy=self.bundle(place.bundle), **opts
                                                  ).remote(*a, **kw))
        except BaseException:
            self.shutdown()
            raise
        return self.actors

    def wait(self, refs: list[Any], timeout_s: float, what: str) -> list[Any]:
        """``ray.get(refs)`` (ref i: actor i's call) within ``timeout_s`` (0: no deadline). An actor whose call is not
        back by then while none failed is hung: it is killed (no restart) and ``ActorLost`` names it, so the driver
        heals it like a dead one. A call that failed is raised as it is (the others may wait on it in a
        collective), without killing anybody."""
        if not timeout_s:
            return ray.get(refs)
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if not pending:
            return ray.get(refs)
        ray.get(ready)  # a call that failed: its error, not the ones stuck behind it
        late = {ref.hex() for ref in pending}
        hung = [i for i, ref in enumerate(refs) if ref.hex() in late]
        for i in hung:
            ray.kill(self.actors[i], no_restart=True)
        raise ActorLost(f"{self.role} actor(s) {hung} did not finish {what} within {timeout_s:g} s "
                        f"({self.role}.call_timeout_s): killed as hung")

    def lost_actors(self) -> list[int]:
        """Indices of the actors the cluster does not report alive (dead, restarting, unknown)."""
        return [i for i, state in enumerate(actor_states(self.actors)) if state != "ALIVE"]

    def shutdown(self) -> None:
        """Kill the actors (no restart) and release the bundles; idempotent."""
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None

    def __enter__(self) -> "ActorGroup":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
