"""The models both sides use: the policy (loading, the token layout of a chain context), the SR diffusion
pipeline and its SDE step with log-probs, the embedded default's tiny random builders."""
