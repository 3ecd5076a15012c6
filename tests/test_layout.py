"""Architecture guard: pure modules (math, rewards, chain, data, records, SDE) import without Ray."""

import subprocess
import sys

PURE_MODULES = [
    "rl.config", "rl.records", "rl.chain", "rl.grpo", "rl.checkpoint", "rl.data.degradations",
    "rl.data.dataset", "rewards.format", "rewards.degradation", "rewards.understanding", "actors.sde", "rewards.quality", "rewards.total", "rewards.pool", "rl.monitor", "rl.resources",
    "learner.weight_sync",
]


def test_pure_modules_do_not_import_ray():
    code = (
        "import importlib, sys\n"
        f"for m in {PURE_MODULES!r}: importlib.import_module(m)\n"
        "print('ray' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
