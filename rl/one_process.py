"""The cold start and the GRPO loop in one process, without Ray: ``rl.launch``'s own drivers (``rl.sft``,
``rl.trainer``) over the ``local`` transport (``rl.local_roles``: the plain classes the actors wrap, called in turn,
the learner one DeepSpeed rank).

    python -m rl.one_process configs/grpo_1gpu.yaml [key=value ...]

For a machine that has a GPU but no Ray or vLLM (the device check, ``scripts/gpu_check.sh``) and for the sequential
baseline of ``benchmarks/bench_loop.py``. The same configs, steps, TensorBoard scalars, checkpoints (DeepSpeed state
and ``checkpoints/step_N/export``, which a GRPO config's ``init_from`` names) and resume as ``rl.launch``; what needs
several processes is ``rl.launch``'s alone (the asynchronous pipeline, several learner ranks: errors here, naming
the key; fault healing, the collective weight sync).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from core.checkpoint import step_dir_name
from core.config import ConfigError, ExperimentConfig, cold_start_config, cold_start_pending, load_config
from core.env import configure_process
from core.run_folder import FolderError, claim
from rl.local_roles import LocalTransport
from rl.run_state import RunFailed
from rl.transport import trainer_for

log = logging.getLogger("rl.one_process")


def fit(cfg: ExperimentConfig, dist_env: Optional[dict[str, str]] = None) -> Path:
    """Run ``cfg`` (sft or grpo) to ``trainer.total_steps`` in this process; returns the last step's export (the
    last checkpoint's, when ``trainer.checkpoint_every`` is set)."""
    from models.bootstrap import ensure_models

    transport = LocalTransport(dist_env)
    transport.check(cfg)
    ensure_models(cfg)
    with claim(cfg):  # the folder locked and checked before anything is built (core.run_folder)
        trainer_for(cfg, transport).fit()
    return Path(cfg.trainer.checkpoint_dir) / step_dir_name(cfg.trainer.total_steps) / "export"


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    configure_process()
    parser = argparse.ArgumentParser(prog="python -m rl.one_process", description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
        runs = [cold_start_config(cfg), cfg] if cold_start_pending(cfg) else [cfg]
        for run in runs:
            LocalTransport().check(run)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    for run in runs:
        log.info("%s run %s: outputs in %s", run.mode, run.name, run.output_dir)
        try:
            fit(run)
        except FolderError as exc:
            print(f"run folder error: {exc}", file=sys.stderr)
            return 2
        except RunFailed as exc:
            log.error("run failed: %s", exc)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
