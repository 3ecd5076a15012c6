"""The drivers: launch, the GRPO and SFT trainers, the rollout pipeline, weight sync, run state and checkpoints,
the held-out evaluation during training, the TensorBoard monitor and quiet console, and one_process (the same
runs without Ray). The user tools built on them are in ``tools``, the research probes in ``lab``."""
