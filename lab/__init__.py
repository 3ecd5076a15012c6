"""Research probes, the top floor: ``python -m lab.reward_probe`` (what a residual's gain is worth to the reward)
and ``python -m lab.gain_probe`` (a model's detail split into a gain along a reference and the rest). They use
the tools' public library functions (``tools.inference``, ``tools.eval``); nothing of the product imports lab."""
