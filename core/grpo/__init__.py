"""GRPO math, pure torch (no Ray, no config objects): advantages, token credit, the train batch, the losses.

``core.grpo.advantages``  group-relative advantages, zero-variance filter, reward columns, advantage transforms
``core.grpo.estimators``  StepRewards, the registered advantage estimators (ADV_ESTIMATORS), the column plan and
                          estimate_advantages (one step's scores -> ChainAdvantages)
``core.grpo.credit``      token-credit rules (chain, section), image-credit rules (final, stage), tag ids
``core.grpo.batch``       TrainBatch, build_train_batch, the trained denoising steps
``core.grpo.losses``      clipped surrogate (text and image), token_mean, k3 KL, log-probs, TIS weights
``core.grpo.objectives``  the image objectives: trajectory (the surrogate) or nft (DiffusionNFT's forward process)

Everything public is re-exported here: ``from core import grpo; grpo.group_advantages(...)``.
"""

from core.grpo.advantages import (
    ADVANTAGE_TRANSFORMS,
    ChainAdvantages,
    GroupFilter,
    advantage_transform,
    branch_advantages,
    column_advantages,
    component_rewards,
    decoupled_rewards,
    group_advantages,
    group_order,
    placebo_shuffle,
    registry_entry,
    zero_variance_groups,
)
from core.grpo.estimators import (
    ADV_ESTIMATORS,
    AdvantageColumn,
    AdvantagePlan,
    Estimate,
    StepRewards,
    decoupled_column,
    estimate_advantages,
    joint_rewards,
    register_adv_est,
)
from core.grpo.batch import TrainBatch, build_train_batch, trained_steps
from core.grpo.objectives import IMAGE_OBJECTIVES, NFTOutput, image_objective, nft_loss, reward_probability
from core.grpo.credit import (
    IMAGE_CREDIT,
    TOKEN_CREDIT,
    ChainTags,
    TokenCredit,
    chain_credit,
    degradation_item_positions,
    final_credit,
    image_credit,
    section_credit,
    stage_credit,
    token_credit,
    token_sections,
)
from core.grpo.losses import (
    LOG_RATIO_CLAMP,
    ImportanceWeights,
    SurrogateOutput,
    clipped_surrogate,
    gather_token_log_probs,
    image_surrogate,
    k3_kl,
    needs_reference,
    token_mean,
    truncated_importance_weights,
)

__all__ = [
    "ADVANTAGE_TRANSFORMS", "ChainAdvantages", "GroupFilter", "advantage_transform", "branch_advantages",
    "column_advantages", "component_rewards", "decoupled_rewards", "group_advantages",
    "group_order", "placebo_shuffle", "registry_entry", "zero_variance_groups", "TrainBatch", "build_train_batch",
    "trained_steps", "TOKEN_CREDIT", "ChainTags", "TokenCredit", "chain_credit", "section_credit",
    "degradation_item_positions",
    "IMAGE_CREDIT", "final_credit", "stage_credit", "image_credit", "token_credit", "token_sections",
    "LOG_RATIO_CLAMP", "SurrogateOutput", "clipped_surrogate",
    "gather_token_log_probs", "image_surrogate", "k3_kl", "needs_reference", "token_mean", "ImportanceWeights",
    "truncated_importance_weights", "IMAGE_OBJECTIVES", "NFTOutput", "image_objective", "nft_loss",
    "reward_probability", "ADV_ESTIMATORS", "AdvantageColumn", "AdvantagePlan", "Estimate", "StepRewards",
    "decoupled_column", "estimate_advantages", "joint_rewards", "register_adv_est",
]
