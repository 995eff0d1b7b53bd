"""Tabular MDPs: the textbook objects behind RLHF, small enough to print and solve exactly.

- tabular.py: `TabularMDP` (P, R, gamma, initial, terminal) and the builders
  `chain_mdp`, `gridworld`, `cliff_walking`.
- solve.py: exact and iterative policy evaluation, `q_from_v`, value iteration,
  policy iteration.
- learn.py: sampling (`Trajectory` with `states`, `actions`, `rewards`, `dones`),
  `discounted_returns` (the one in `rlhf_toy.core`), epsilon-greedy / Boltzmann
  action selection, SARSA, Q-learning.
- policy_gradient.py: tabular softmax policy, REINFORCE estimate, exact gradient.
- pomdp.py: `TabularPOMDP`, belief updates, the tiger problem, memoryless vs belief.
- token.py: `TokenMDP` (state = prompt + prefix, action = next token), the exact
  KL-regularized optimum by a soft Bellman backup, `enumerable_task_mdp`.

Shapes: S states, A actions; a policy is an (S, A) array of probabilities.
"""

from rlhf_toy.mdp.learn import (
    TDResult,
    Trajectory,
    boltzmann,
    boltzmann_probs,
    discounted_returns,
    epsilon_greedy,
    epsilon_greedy_probs,
    greedy_rollout,
    q_learning,
    sample_trajectories,
    sample_trajectory,
    sarsa,
)
from rlhf_toy.mdp.policy_gradient import (
    GradientEstimate,
    discounted_visitation,
    exact_policy_gradient,
    objective,
    reinforce_gradient_estimate,
    softmax_policy,
)
from rlhf_toy.mdp.pomdp import (
    MemoryDemo,
    TabularPOMDP,
    best_memoryless_policy,
    controller_value,
    memoryless_value,
    memoryless_vs_belief,
    tiger_belief_controller,
    tiger_pomdp,
)
from rlhf_toy.mdp.solve import (
    Evaluation,
    Solution,
    check_policy,
    greedy_policy,
    iterative_policy_evaluation,
    policy_dynamics,
    policy_evaluation,
    policy_iteration,
    q_from_v,
    value_iteration,
)
from rlhf_toy.mdp.tabular import GRID_ACTIONS, TabularMDP, chain_mdp, cliff_walking, gridworld
from rlhf_toy.mdp.token import (
    BigramReference,
    SoftSolution,
    TokenMDP,
    enumerable_task_mdp,
    enumerate_responses,
    kl_divergence,
    kl_regularized_optimum,
    kl_regularized_value,
    sequence_probs,
    soft_bellman,
    soft_policy,
    target_fraction,
)
from rlhf_toy.mdp.token import objective as kl_regularized_objective

__all__ = [
    "GRID_ACTIONS", "Evaluation", "GradientEstimate", "MemoryDemo", "Solution", "TDResult",
    "TabularMDP", "TabularPOMDP", "Trajectory", "best_memoryless_policy", "boltzmann",
    "boltzmann_probs", "chain_mdp", "check_policy", "cliff_walking", "controller_value",
    "discounted_returns", "discounted_visitation", "epsilon_greedy", "epsilon_greedy_probs",
    "exact_policy_gradient", "greedy_policy", "greedy_rollout", "gridworld",
    "iterative_policy_evaluation", "memoryless_value", "memoryless_vs_belief", "objective",
    "policy_dynamics", "policy_evaluation", "policy_iteration", "q_from_v", "q_learning",
    "reinforce_gradient_estimate", "sample_trajectories", "sample_trajectory", "sarsa",
    "softmax_policy", "tiger_belief_controller", "tiger_pomdp", "value_iteration",
    # token MDP (rlhf_toy.mdp.token; its `objective` is exported as kl_regularized_objective)
    "BigramReference", "SoftSolution", "TokenMDP", "enumerable_task_mdp",
    "enumerate_responses", "kl_divergence", "kl_regularized_objective",
    "kl_regularized_optimum", "kl_regularized_value", "sequence_probs", "soft_bellman",
    "soft_policy", "target_fraction",
]
