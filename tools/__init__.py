"""The user tools, one floor above the drivers (rl): ``python -m tools.eval`` (a checkpoint's held-out report),
``tools.infer`` (super-resolve a folder), ``tools.compare`` (did training help, against the noise),
``tools.plot`` (learning curves), ``tools.resources`` (does a run fit a cluster manifest), ``tools.bootstrap``
(the tiny random models), and ``tools.inference``, the library they share (checkpoint resolution, the sampler,
LR sizing, the CLI wrapper)."""
