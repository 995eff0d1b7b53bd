"""Finite MDPs as arrays, and the small ones used to teach.

Shapes: S states, A actions. States and actions are integers `0..S-1`, `0..A-1`.

    P[s, a, s']  probability of landing in s' after taking a in s   (S, A, S)
    R[s, a, s']  reward received on that transition                 (S, A, S)
    gamma        discount, 0 <= gamma <= 1
    initial[s]   start distribution                                 (S,)
    terminal[s]  True for terminal states: absorbing, value 0       (S,)

This is Sutton & Barto's p(s', r | s, a) with the reward made a function of the
transition (eq. 3.2 and 3.6); `expected_reward[s, a] = sum_s' P R` is r(s, a) (eq. 3.5).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_ATOL = 1e-8


def _check_distribution(x: np.ndarray, name: str) -> None:
    """Raise ValueError unless `x` holds probabilities summing to 1 along its last axis."""
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must hold finite probabilities; found NaN or inf")
    if np.any(x < -_ATOL):
        bad = tuple(int(i) for i in np.argwhere(x < -_ATOL)[0])
        raise ValueError(f"{name} must be non-negative; {name}{list(bad)} = {x[bad]:.6g}")
    sums = x.sum(axis=-1)
    wrong = np.argwhere(np.abs(sums - 1.0) > 1e-6)
    if len(wrong):
        idx = tuple(int(i) for i in wrong[0])
        where = "".join(f"{i}, " for i in idx) + ":"
        raise ValueError(f"{name}[{where}] must sum to 1 (a probability distribution); "
                         f"it sums to {sums[idx]:.6g}")


def _terminal_mask(terminal, n_states: int) -> np.ndarray:
    """Accept None, a list of state indices, or a boolean mask of length S."""
    mask = np.zeros(n_states, dtype=bool)
    if terminal is None:
        return mask
    arr = np.asarray(terminal)
    if arr.dtype == bool:
        if arr.shape != (n_states,):
            raise ValueError(f"terminal as a boolean mask must have shape ({n_states},); "
                             f"got {arr.shape}")
        return arr.copy()
    arr = arr.astype(int).ravel()
    if np.any((arr < 0) | (arr >= n_states)):
        raise ValueError(f"terminal must list state indices in [0, {n_states - 1}]; "
                         f"got {arr.tolist()}")
    mask[arr] = True
    return mask


def _as_kernel(P) -> np.ndarray:
    """P as a validated (S, A, S) float copy."""
    P = np.array(P, dtype=float)
    if P.ndim != 3 or P.shape[0] != P.shape[2]:
        raise ValueError(f"P must have shape (S, A, S); got {P.shape}")
    if 0 in P.shape:
        raise ValueError(f"P must have at least one state and one action; got {P.shape}")
    _check_distribution(P, "P")
    return P


def _as_reward(R, S: int, A: int) -> np.ndarray:
    """R as a validated (S, A, S) float copy; an (S, A) reward is repeated over s'."""
    R = np.array(R, dtype=float)
    if R.shape == (S, A):
        R = np.repeat(R[:, :, None], S, axis=2)  # (S, A) -> (S, A, S)
    if R.shape != (S, A, S):
        raise ValueError(f"R must have shape (S, A, S) = {(S, A, S)} or (S, A) = {(S, A)}; "
                         f"got {R.shape}")
    if not np.all(np.isfinite(R)):
        raise ValueError("R must be finite; found NaN or inf")
    return R


def _as_initial(initial, terminal: np.ndarray) -> np.ndarray:
    """Validated (S,) start distribution; None = uniform over non-terminal states."""
    S = len(terminal)
    if initial is None:
        initial = (~terminal) / (~terminal).sum()
    initial = np.array(initial, dtype=float)
    if initial.shape != (S,):
        raise ValueError(f"initial must have shape (S,) = ({S},); got {initial.shape}")
    _check_distribution(initial, "initial")
    if initial[terminal].sum() > _ATOL:
        raise ValueError("initial must put no probability on terminal states")
    return initial


def _names(names, n: int, what: str) -> list[str]:
    if names is None:
        return [str(i) for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{what} must have {n} entries; got {len(names)}")
    return [str(x) for x in names]


class TabularMDP:
    """A finite MDP (S, A, P, R, gamma, initial, terminal), validated on construction.

    Args:
        P: (S, A, S) transition kernel, P[s, a, s'] = Pr(s' | s, a).
        R: (S, A, S) reward of the transition s -a-> s', or (S, A) reward of taking a in s.
        gamma: discount in [0, 1]; gamma == 1 needs at least one terminal state.
        initial: (S,) start distribution; default uniform over non-terminal states.
        terminal: state indices or an (S,) boolean mask. Terminal states end the episode:
            their P and R rows are replaced by a zero-reward self-loop and their value is 0.
        state_names, action_names: optional labels used by `describe()`.

    Raises:
        ValueError naming the argument and what is allowed.
    """

    def __init__(self, P, R, gamma: float, initial=None, terminal=None,
                 state_names: Sequence[str] | None = None,
                 action_names: Sequence[str] | None = None):
        P = _as_kernel(P)
        S, A, _ = P.shape
        R = _as_reward(R, S, A)
        gamma = float(gamma)
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1]; got {gamma}")
        terminal = _terminal_mask(terminal, S)
        if gamma == 1.0 and not terminal.any():
            raise ValueError("gamma == 1 is only allowed with terminal states (else returns "
                             "can be infinite); pass terminal=[...] or gamma < 1")
        if terminal.all():
            raise ValueError("terminal must leave at least one non-terminal state")
        initial = _as_initial(initial, terminal)
        # Terminal states are absorbing with zero reward, so their value is 0 by construction.
        P[terminal] = 0.0
        for s in np.flatnonzero(terminal):
            P[s, :, s] = 1.0
        R[terminal] = 0.0
        self.P, self.R, self.gamma = P, R, gamma
        self.initial, self.terminal = initial, terminal
        self.state_names = _names(state_names, S, "state_names")
        self.action_names = _names(action_names, A, "action_names")
        self._cdf = np.cumsum(P, axis=-1)  # (S, A, S), for inverse-CDF sampling

    @property
    def n_states(self) -> int:
        return self.P.shape[0]

    @property
    def n_actions(self) -> int:
        return self.P.shape[1]

    @property
    def expected_reward(self) -> np.ndarray:
        """r(s, a) = sum_s' P[s, a, s'] R[s, a, s'] (S & B eq. 3.5). Shape (S, A)."""
        return np.einsum("sat,sat->sa", self.P, self.R)

    def step(self, state: int, action: int, rng: np.random.Generator) -> tuple[int, float]:
        """Sample s' ~ P[state, action] and return (s', R[state, action, s'])."""
        nxt = int(np.searchsorted(self._cdf[state, action], rng.random(), side="right"))
        nxt = min(nxt, self.n_states - 1)  # guards u >= cdf[-1] = 1 - rounding
        return nxt, float(self.R[state, action, nxt])

    def __repr__(self) -> str:
        term = np.flatnonzero(self.terminal).tolist()
        return (f"TabularMDP(S={self.n_states}, A={self.n_actions}, gamma={self.gamma:g}, "
                f"terminal={term})")

    def describe(self, max_states: int = 12, precision: int = 3) -> str:
        """Every object of the MDP as text: states, actions, gamma, initial, P and R.

        P and R are printed in full, one S x S matrix per action, when S <= max_states;
        larger MDPs get their shapes and the list of terminal states only.
        """
        S, A = self.n_states, self.n_actions
        lines = [repr(self)]
        lines.append("states:  " + ", ".join(
            f"{s}:{n}" + ("*" if self.terminal[s] else "") for s, n in enumerate(self.state_names))
            + "   (* terminal: absorbing, value 0)")
        lines.append("actions: " + ", ".join(f"{a}:{n}" for a, n in enumerate(self.action_names)))
        lines.append(f"gamma:   {self.gamma:g}")
        if S > max_states:
            lines.append(f"initial: support {np.flatnonzero(self.initial).tolist()}")
            lines.append(f"P: array {self.P.shape}, R: array {self.R.shape} "
                         f"(S = {S} > max_states = {max_states}; index mdp.P, mdp.R)")
            return "\n".join(lines)
        with np.printoptions(precision=precision, suppress=True, linewidth=120):
            lines.append(f"initial: {self.initial}")
            for name, arr in (("P", self.P), ("R", self.R)):
                for a in range(A):
                    lines.append(f"{name}[s, a={a} ({self.action_names[a]}), s']  rows s, columns s':")
                    lines.extend("  " + row for row in str(arr[:, a, :]).splitlines())
            lines.append("r(s, a) = sum_s' P R  rows s, columns a:")
            lines.extend("  " + row for row in str(self.expected_reward).splitlines())
        return "\n".join(lines)

    __str__ = describe


def chain_mdp(n: int = 5, gamma: float = 0.9, slip: float = 0.0) -> TabularMDP:
    """The teaching chain: n states in a line, walk right to reach the goal.

        0 - 1 - 2 - ... - (n-2) - [n-1]      start at 0, state n-1 terminal

    Actions: 0 = left, 1 = right. With probability 1 - slip the move happens
    (left from state 0 stays at 0); with probability `slip` the agent stays put.
    Reward +1 on the transition that enters the goal n-1, 0 otherwise.

    Values by hand (Bellman expectation, S & B eq. 4.4). For "always right",
    with c = (1 - slip) / (1 - slip * gamma):
        V(n-2) = c,   V(s) = c * gamma * V(s+1)   =>   V(s) = c**(n-1-s) * gamma**(n-2-s).
    This policy is optimal, so V* is the same and Q*(s, right) = V*(s),
    Q*(s, left) = gamma * (slip * V*(s) + (1 - slip) * V*(max(s-1, 0))) for slip = 0.
    For n = 3, slip = 0 and the uniform random policy: V(1) = 0.5 + 0.5 gamma V(0),
    V(0) = 0.5 gamma (V(0) + V(1)); with gamma = 0.9, V(1) = 110/139, V(0) = 90/139.

    Args:
        n: number of states, >= 2.
        gamma: discount in [0, 1].
        slip: probability in [0, 1) that an action has no effect.
    Returns:
        TabularMDP with S = n, A = 2.
    """
    if n < 2:
        raise ValueError(f"n must be >= 2 (at least one state before the goal); got {n}")
    if not 0.0 <= slip < 1.0:
        raise ValueError(f"slip must be in [0, 1); got {slip}")
    P = np.zeros((n, 2, n))
    R = np.zeros((n, 2, n))
    for s in range(n - 1):
        for a, target in ((0, max(s - 1, 0)), (1, s + 1)):
            P[s, a, target] += 1.0 - slip
            P[s, a, s] += slip
    R[n - 2, 1, n - 1] = 1.0  # the only transition into the goal: right from n-2
    P[n - 1, :, n - 1] = 1.0
    initial = np.eye(n)[0]
    return TabularMDP(P, R, gamma, initial=initial, terminal=[n - 1],
                      state_names=[f"s{s}" for s in range(n - 1)] + ["goal"],
                      action_names=["left", "right"])


GRID_ACTIONS = ("up", "right", "down", "left")
_MOVES = ((-1, 0), (0, 1), (1, 0), (0, -1))  # (d_row, d_col) per action


def gridworld(rows: int = 4, cols: int = 4, goals=((0, 0), (3, 3)), start=None,
              walls=(), cliffs=(), step_reward: float = -1.0, cliff_reward: float = -100.0,
              gamma: float = 1.0, slip: float = 0.0) -> TabularMDP:
    """A grid of cells, state = row * cols + col; actions up, right, down, left.

    A move into the border or a wall leaves the agent in place. Every step costs
    `step_reward`; stepping into a cliff cell gives `cliff_reward` instead and sends
    the agent back to `start`. Goals are terminal. With probability `slip` the action
    is replaced by a uniformly random one. The defaults are S & B Example 4.1 (4x4,
    two terminal corners, -1 per step, gamma = 1), whose random-policy values are
    0, -14, -20, -22 along the first row (Figure 4.1).

    Args:
        rows, cols: grid size.
        goals: (row, col) cells that are terminal.
        start: (row, col) start cell; None = uniform over non-terminal, non-wall,
            non-cliff cells. Required when there are cliffs.
        walls, cliffs: (row, col) cells. Wall and cliff cells stay in the state
            space (unreachable) so that the indexing is row * cols + col.
        step_reward, cliff_reward: rewards per step.
        gamma: discount.
        slip: probability in [0, 1] of a uniformly random action.
    Returns:
        TabularMDP with S = rows * cols, A = 4.
    """
    S = rows * cols
    walls = {_cell(w, rows, cols, "walls") for w in walls}
    cliffs = {_cell(c, rows, cols, "cliffs") for c in cliffs}
    if cliffs and start is None:
        raise ValueError("start must be given when there are cliffs (the cliff sends back to start)")
    if not 0.0 <= slip <= 1.0:
        raise ValueError(f"slip must be in [0, 1]; got {slip}")
    start_state = None if start is None else _cell(start, rows, cols, "start")
    P = np.zeros((S, 4, S))
    reward_mass = np.zeros((S, 4, S))  # sum of prob * reward over the ways to reach s'
    for s, intended in np.ndindex(S, 4):
        for a, prob in enumerate(_action_mix(intended, slip)):
            target, reward = _grid_move(s, a, rows, cols, walls), step_reward
            if target in cliffs:
                target, reward = start_state, cliff_reward
            P[s, intended, target] += prob
            reward_mass[s, intended, target] += prob * reward
    # R[s, a, s'] is the mean reward of the ways to reach s' (they differ only with slip
    # into a cliff), which keeps r(s, a) and every value exact.
    R = np.divide(reward_mass, P, out=np.zeros_like(P), where=P > 0)
    terminal = [_cell(g, rows, cols, "goals") for g in goals]
    if start_state is not None:
        initial = np.eye(S)[start_state]
    else:
        ok = np.ones(S, dtype=bool)
        ok[list(walls | cliffs) + terminal] = False
        initial = ok / ok.sum()
    names = [f"({s // cols},{s % cols})" for s in range(S)]
    return TabularMDP(P, R, gamma, initial=initial, terminal=terminal,
                      state_names=names, action_names=list(GRID_ACTIONS))


def _cell(rc, rows: int, cols: int, what: str) -> int:
    """(row, col) -> state index row * cols + col, checked to lie in the grid."""
    r, c = (int(x) for x in rc)
    if not (0 <= r < rows and 0 <= c < cols):
        raise ValueError(f"{what} must be (row, col) cells inside the {rows}x{cols} grid; "
                         f"got {tuple(rc)}")
    return r * cols + c


def _grid_move(s: int, a: int, rows: int, cols: int, walls: set[int]) -> int:
    """Cell reached by action a from cell s; the border and walls leave the agent in place."""
    r, c = divmod(s, cols)
    nr, nc = r + _MOVES[a][0], c + _MOVES[a][1]
    if not (0 <= nr < rows and 0 <= nc < cols) or nr * cols + nc in walls:
        return s
    return nr * cols + nc


def _action_mix(intended: int, slip: float) -> np.ndarray:
    """(4,) probabilities of the executed action given the intended one."""
    mix = np.full(4, slip / 4)
    mix[intended] += 1.0 - slip
    return mix


def cliff_walking(gamma: float = 1.0) -> TabularMDP:
    """S & B Example 6.6: a 4x12 grid, start bottom-left (3, 0), goal bottom-right (3, 11).

    -1 per step; the cells (3, 1) .. (3, 10) are the cliff: stepping in gives -100 and
    sends the agent back to the start. The goal is terminal; gamma = 1. The optimal path
    walks along the cliff edge: up, 11 x right, down = 13 steps, return -13.

    Returns:
        TabularMDP with S = 48 (state = row * 12 + col), A = 4 (up, right, down, left).
    """
    return gridworld(rows=4, cols=12, goals=[(3, 11)], start=(3, 0),
                     cliffs=[(3, c) for c in range(1, 11)], gamma=gamma)
