"""Entry point: ``python -m rl.launch CONFIG [key=value ...]``.

Joins the Ray cluster in ``ray.address`` / ``$RAY_ADDRESS`` (e.g. under ``ray job submit``) or starts a local
one bound to 127.0.0.1, builds missing embedded models, then runs the trainer the config's ``mode`` names. A
config with a ``cold_start`` whose export is not there yet runs that SFT config first, the same way. The
terminal shows the progress bar and the run's own messages; everything else goes to ``<output_dir>/run.log``
(``rl.console``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from core.config import ConfigError, ExperimentConfig, cold_start_config, cold_start_pending, load_config
from core.env import configure_process, worker_env
from core.rendezvous import loopback_interface
from core.run_folder import FolderError, claim
from rl.console import run_console

RUN_LOG = "run.log"

log = logging.getLogger("rl.launch")
# Ray replaces a loopback node address by the machine's reachable one unless multi-node support is off; with it
# off (as Ray does on macOS), GCS, raylet, workers and agents of the local cluster listen on 127.0.0.1 only.
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_ray(cfg: ExperimentConfig) -> None:
    """Connect to an existing cluster when one is named, else start a private local one."""
    import ray

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env={"env_vars": worker_env(code_path=False)}, log_to_driver=True)
    else:
        from ray._private import ray_constants

        if ray_constants.ENABLE_RAY_CLUSTER:
            log.warning("Ray was imported before %s=0 was set: its processes may listen beyond %s",
                        LOOPBACK_ONLY_ENV, cfg.ray.host)
        log.info("starting a local Ray cluster on %s", cfg.ray.host)
        ray.init(
            address="local",  # always a new private cluster: never attach to someone else's `ray start`
            num_cpus=cfg.ray.num_cpus,
            include_dashboard=cfg.ray.include_dashboard,
            dashboard_host=cfg.ray.host,
            _node_ip_address=cfg.ray.host,
            runtime_env={"env_vars": worker_env()},
            log_to_driver=True,
        )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rl.launch", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config, e.g. configs/grpo_local.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.total_steps=5")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    configure_process()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")) and cfg.ray.host in ("127.0.0.1", "localhost"):
        os.environ.setdefault(LOOPBACK_ONLY_ENV, "0")  # before Ray is imported: it reads this at import
        interface = loopback_interface(cfg.ray.host)  # gloo's sockets (learner, weight sync, vLLM's TP) too
        if interface:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # actors' lines reach run.log without colour codes

    runs = [cfg]
    if cold_start_pending(cfg):  # made once, on first use, like the tiny models
        runs.insert(0, cold_start_config(cfg))
        log.info("cold start: %s is not there yet: running %s first (once)", cfg.policy.init_from or
                 cfg.diffusion.init_from, cfg.cold_start)
    for run in runs:
        out = Path(run.output_dir)
        try:
            with claim(run), run_console(out / RUN_LOG):  # the folder locked and checked before any actor
                code = _run(run, out)
        except FolderError as exc:
            print(f"run folder error: {exc}", file=sys.stderr)
            return 2
        if code:
            return code
    return 0


def _run(cfg: ExperimentConfig, out: Path) -> int:
    from models.bootstrap import ensure_models

    try:
        ensure_models(cfg)
    except (FileNotFoundError, ValueError) as exc:
        log.error("model error: %s", exc)
        return 2
    log.info("run %s: outputs in %s, third-party output in %s", cfg.name, out, out / RUN_LOG)

    import ray

    from rl.run_state import RunFailed
    from rl.transport import RayTransport, trainer_for

    init_ray(cfg)
    try:
        trainer_for(cfg, RayTransport()).fit()
    except RunFailed as exc:
        log.error("run failed: %s", exc)
        return 1
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
