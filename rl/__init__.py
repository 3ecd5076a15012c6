"""The drivers: launch, the GRPO and SFT trainers over a transport (``rl.transport``: Ray actor groups, or the same
classes in one process, ``rl.one_process``), the rollout pipeline, weight sync, run state and checkpoints, the
held-out evaluation during training, the TensorBoard monitor and quiet console. The user tools built on them are in
``tools``, the research probes in ``lab``."""
