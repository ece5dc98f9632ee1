"""The selection of the budget step: the integer program (``_solve_milp``, with the product or the
big-M formulation of the bilinear costs), the greedy selection and the polish that undoes what the
limits do not need, ``_solve`` choosing between them, and the narrowest choice ``_min_choice``."""
from __future__ import annotations

import logging

import numpy as np

from ...cost import Budget, Target, feasible, violations
from ...cost.deployed import cost_report
from .problem import SET_COSTS, _apply_choice, _Problem, _tighten

log = logging.getLogger(__name__)

MILP_MAX_VARS = 60_000  # above this many binary variables the greedy selection is used
HULL_MAX_VARS = 150_000  # above this many product variables the big-M rows are used instead
MIP_GAP = 1e-2  # relative optimality gap of the integer program (the sensitivities are estimates)


# ----------------------------------------------------------------------------- solvers


def _solve_milp(p: _Problem, lim: dict, time_limit: float):
    """Optimal choice under the internal limits (``mip_rel_gap`` MIP_GAP), or None when none exists.

    The bilinear costs (BOPs, EBOPs, cycles) use the tight product formulation where it stays small:
    ``z[g, w, a] >= 0`` with ``sum_a z = x[g, w]`` and ``sum_w z = y[q, a]`` (so ``z = x y`` at
    integer points, and the LP relaxation is the convex hull of each group's choices); above
    ``HULL_MAX_VARS`` product variables, the big-M rows of the module docstring.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_array

    bilinear = [k for k in ("bops", "ebops", "cycles") if k in lim]
    n = 0
    x_off = {}
    for layer in p.layers:
        x_off[layer.name] = n
        n += layer.allowed.size
    y_off = {}
    for q, a in p.acts.items():
        y_off[q] = n
        n += len(a.widths)
    coupled = [layer for layer in p.layers if len(p.acts[layer.in_q].widths) > 1] if bilinear else []
    hull = sum(int(layer.allowed.sum()) * len(p.acts[layer.in_q].widths) for layer in coupled) <= HULL_MAX_VARS
    z_off, t_off = {}, {}
    for layer in coupled:
        if hull:
            z_off[layer.name] = n
            n += layer.allowed.size * len(p.acts[layer.in_q].widths)
        else:
            for key in bilinear:
                t_off[key, layer.name] = n
                n += 1
    c, lower, upper, integrality = np.zeros(n), np.zeros(n), np.ones(n), np.zeros(n)
    for layer in p.layers:
        o, size = x_off[layer.name], layer.allowed.size
        c[o:o + size], upper[o:o + size], integrality[o:o + size] = layer.sens.ravel(), layer.allowed.ravel(), 1
    for q, a in p.acts.items():
        c[y_off[q]:y_off[q] + len(a.widths)], integrality[y_off[q]:y_off[q] + len(a.widths)] = a.sens, 1
    for layer in coupled:
        if hull:
            o, size = z_off[layer.name], layer.allowed.size * len(p.acts[layer.in_q].widths)
            upper[o:o + size] = np.repeat(layer.allowed.ravel(), len(p.acts[layer.in_q].widths))
    for i in t_off.values():
        upper[i] = np.inf
    rows, cols, vals, lo, hi = [], [], [], [], []

    def row(idx, coef, low, high):
        rows.append(np.full(len(idx), len(lo)))
        cols.append(np.asarray(idx, dtype=np.int64))
        vals.append(np.asarray(coef, dtype=float))
        lo.append(low)
        hi.append(high)

    def x_index(layer):  # (G, K) variable indices
        return x_off[layer.name] + np.arange(layer.allowed.size).reshape(layer.allowed.shape)

    for layer in p.layers:
        xs = x_index(layer)
        for g in range(layer.groups):
            row(xs[g], np.ones(xs.shape[1]), 1.0, 1.0)
        if layer.prune_k is not None:
            row(xs[:, layer.prune_k], np.ones(layer.groups), -np.inf, layer.groups - 1.0)
    for q, a in p.acts.items():
        row(y_off[q] + np.arange(len(a.widths)), np.ones(len(a.widths)), 1.0, 1.0)
    if "flash" in lim:
        scale = max(abs(lim["flash"]), 1.0)
        row(np.concatenate([x_index(layer).ravel() for layer in p.layers]),
            np.concatenate([layer.flash.ravel() for layer in p.layers]) / scale, -np.inf, lim["flash"] / scale)
    if hull:
        for layer in coupled:
            A = len(p.acts[layer.in_q].widths)
            xs, ys = x_index(layer), y_off[layer.in_q] + np.arange(A)
            zs = z_off[layer.name] + np.arange(layer.allowed.size * A).reshape(layer.groups, -1, A)
            for g in range(layer.groups):
                for k in np.flatnonzero(layer.allowed[g]):
                    row(np.append(zs[g, k], xs[g, k]), np.append(np.ones(A), -1.0), 0.0, 0.0)
                ks = np.flatnonzero(layer.allowed[g])
                for i in range(A):
                    row(np.append(zs[g, ks, i], ys[i]), np.append(np.ones(len(ks)), -1.0), 0.0, 0.0)
    for key in bilinear:
        scale = max(abs(lim[key]), 1.0)
        idx, coef = [], []
        for layer in p.layers:
            cost = np.where(layer.allowed[:, :, None], getattr(layer, key), 0.0)  # (G, K, A)
            if layer not in coupled:
                idx.append(x_index(layer).ravel())
                coef.append(cost[:, :, 0].ravel())
            elif hull:
                idx.append(z_off[layer.name] + np.arange(cost.size))
                coef.append(cost.ravel())
            else:
                idx.append([t_off[key, layer.name]])
                coef.append([1.0])
                _big_m_rows(row, layer, cost, x_index(layer).ravel(), t_off[key, layer.name],
                            y_off[layer.in_q] + np.arange(cost.shape[2]))
        row(np.concatenate(idx), np.concatenate(coef) / scale, -np.inf, lim[key] / scale)
    for key in SET_COSTS:
        if key in lim:
            _buffer_set_rows(row, p, key, y_off, lim[key])
    A = coo_array((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(len(lo), n)).tocsr()
    res = milp(c, integrality=integrality, bounds=Bounds(lower, upper),
               constraints=LinearConstraint(A, np.array(lo), np.array(hi)),
               options={"time_limit": time_limit, "mip_rel_gap": MIP_GAP, "disp": False})
    if res.x is None:
        if res.status == 2:  # infeasible
            return None
        raise RuntimeError(f"milp: {res.message}")
    if res.status != 0:
        log.info("milp stopped before proving optimality (%s); keeping its best answer", res.message)
    x = res.x
    kw = {layer.name: x[x_off[layer.name]:x_off[layer.name] + layer.allowed.size].reshape(layer.groups, -1).argmax(1)
          for layer in p.layers}
    ka = {q: int(x[y_off[q]:y_off[q] + len(a.widths)].argmax()) for q, a in p.acts.items()}
    return kw, ka


def _buffer_set_rows(row, p: _Problem, key: str, y_off: dict, limit: float) -> None:
    """``sum_{b in S} sum_a size_b[a] y[q_b, a] <= limit`` for every buffer set ``S`` of ``key``
    (``_Problem.buffer_sets``: the live sets of peak RAM, each layer's in+out buffers)."""
    scale = max(abs(limit), 1.0)
    for buffers in p.buffer_sets(key):
        coef: dict[int, float] = {}
        for b in buffers:
            o = y_off[p.buffer_q[b]]
            for i, size in enumerate(p.buffer_table(key, b)):
                coef[o + i] = coef.get(o + i, 0.0) + size / scale
        row(list(coef), list(coef.values()), -np.inf, limit / scale)


def _big_m_rows(row, layer, cost, xs, ti, ys) -> None:
    """``t_l >= sum_{g,w} C[g, w, a] x[g, w] - M_a (1 - y_a)`` for every input width ``a``, and
    ``t_l >= sum min_a C x`` (valid whatever the width); ``M_a`` as small as keeps a row slack
    when ``y_a = 0``."""
    low = cost.min(axis=2)
    big = max(float(cost.max(axis=(1, 2)).sum()), 1.0)  # row scale
    row(np.append(xs, ti), np.append(low.ravel() / big, -1.0 / big), -np.inf, 0.0)
    for i in range(cost.shape[2]):
        m = float((cost[:, :, i] - low).max(axis=1).sum())
        if m > 0:
            row(np.append(xs, [ti, ys[i]]), np.concatenate([cost[:, :, i].ravel() / big, [-1.0 / big, m / big]]),
                -np.inf, m / big)


def _over(tot: dict, lim: dict) -> dict:
    return {k: tot[k] - v for k, v in lim.items() if tot[k] > v + 1e-9 * max(abs(v), 1.0)}


def _greedy_totals(p: _Problem, kw: dict, ka: dict, lim: dict) -> dict:
    """``p.totals``, the set costs as their excess over the limit (``_greedy_limits``)."""
    tot = p.totals(kw, ka)
    for key in SET_COSTS:
        if key in lim:
            tot[key] = p.excess(key, ka, lim[key])
    return tot


def _greedy_limits(lim: dict) -> dict:
    """The limits the greedy compares ``_greedy_totals`` with: a set cost's excess with 0."""
    return {k: 0.0 if k in SET_COSTS else v for k, v in lim.items()}


def _moves(p: _Problem, kw: dict, ka: dict, lim: dict):
    """Every single change: (kind, name, group, new index, delta costs dict, delta sensitivity)."""
    for layer in p.layers:
        g = np.arange(layer.groups)
        k, a = kw[layer.name], ka[layer.in_q]
        d = {"flash": layer.flash - layer.flash[g, k][:, None]}
        for key in ("bops", "ebops", "cycles"):
            cost = getattr(layer, key)
            d[key] = cost[:, :, a] - cost[g, k, a][:, None]
        ds = layer.sens - layer.sens[g, k][:, None]
        ok = layer.allowed.copy()
        ok[g, k] = False
        if layer.prune_k is not None:
            pruned = int((k == layer.prune_k).sum())
            if pruned >= layer.groups - 1:
                ok[:, layer.prune_k] &= False
        yield "w", layer, ok, d, ds
    set_lim = {key: lim[key] for key in SET_COSTS if key in lim}
    set0 = {key: p.excess(key, ka, limit) for key, limit in set_lim.items()}
    for q, act in p.acts.items():
        d = {key: np.zeros(len(act.widths)) for key in ("flash", "bops", "ebops", "cycles", *SET_COSTS)}
        for layer in p.layers:
            if layer.in_q == q:
                g, k = np.arange(layer.groups), kw[layer.name]
                for key in ("bops", "ebops", "cycles"):
                    cost = getattr(layer, key)
                    d[key] += cost[g, k, :].sum(0) - cost[g, k, ka[q]].sum()
        for i in range(len(act.widths)):
            for key, limit in set_lim.items():
                if i != ka[q]:
                    d[key][i] = p.excess(key, {**ka, q: i}, limit) - set0[key]
        ok = np.ones(len(act.widths), dtype=bool)
        ok[ka[q]] = False
        yield "a", act, ok, d, act.sens - act.sens[ka[q]]


def _solve_greedy(p: _Problem, lim: dict, start=None, max_steps: int = 100_000):
    """Cheapest sensitivity per unit of normalised violated cost first, then undo what is not needed."""
    kw, ka = start if start is not None else p.start()
    kw = {k: v.copy() for k, v in kw.items()}
    ka = dict(ka)
    keys = list(lim)
    glim = _greedy_limits(lim)  # RAM and in+out as the excess over their buffer sets
    for _ in range(max_steps):
        tot = _greedy_totals(p, kw, ka, lim)
        over = _over(tot, glim)
        if not over:
            break
        best = None
        for kind, obj, ok, d, ds in _moves(p, kw, ka, lim):
            gain = np.zeros(ds.shape)
            valid = ok.copy()
            for key in keys:
                dk = d.get(key, np.zeros(ds.shape))
                if key in over:
                    gain += np.minimum(-dk, over[key]) / over[key]
                else:
                    valid &= tot[key] + dk <= glim[key] + 1e-9 * max(abs(glim[key]), 1.0)
            valid &= gain > 1e-12
            if not valid.any():
                continue
            score = np.where(valid, np.maximum(ds, 0.0) / np.where(valid, gain, 1.0), np.inf)
            i = np.unravel_index(int(np.argmin(score)), score.shape)
            if best is None or score[i] < best[0]:
                best = (score[i], kind, obj, i)
        if best is None:
            return None
        _, kind, obj, i = best
        if kind == "w":
            kw[obj.name][i[0]] = i[1]
        else:
            ka[obj.name] = int(i[0])
    else:
        return None
    return _polish(p, lim, kw, ka, max_steps)


def _polish(p: _Problem, lim: dict, kw: dict, ka: dict, max_steps: int = 100_000):
    """Undo what is not needed: the largest sensitivity reduction that keeps every limit, while
    there is one (also run on the integer program's answer, which is optimal only to MIP_GAP)."""
    kw = {k: v.copy() for k, v in kw.items()}
    ka = dict(ka)
    keys = list(lim)
    glim = _greedy_limits(lim)
    for _ in range(max_steps):
        tot = _greedy_totals(p, kw, ka, lim)
        best = None
        for kind, obj, ok, d, ds in _moves(p, kw, ka, lim):
            valid = ok & (ds < -1e-15)
            for key in keys:
                dk = d.get(key, np.zeros(ds.shape))
                valid &= tot[key] + dk <= glim[key] + 1e-9 * max(abs(glim[key]), 1.0)
            if not valid.any():
                continue
            score = np.where(valid, ds, np.inf)
            i = np.unravel_index(int(np.argmin(score)), score.shape)
            if best is None or score[i] < best[0]:
                best = (score[i], kind, obj, i)
        if best is None:
            break
        _, kind, obj, i = best
        if kind == "w":
            kw[obj.name][i[0]] = i[1]
        else:
            ka[obj.name] = int(i[0])
    return kw, ka


def _solve(p: _Problem, lim: dict, solver: str, time_limit: float):
    """(choice or None, solver used)."""
    if solver == "auto":
        solver = "milp" if p.n_vars() <= MILP_MAX_VARS else "greedy"
    if solver == "milp":
        try:
            choice = _solve_milp(p, lim, time_limit)
            if choice is None:
                return None, "milp"
            choice = _polish(p, lim, *choice)
            greedy = _solve_greedy(p, lim)  # cheap; wins only where the solver stopped early
            if greedy is not None and p.sens(*greedy) < p.sens(*choice) - 1e-12:
                return greedy, "greedy"
            return choice, "milp"
        except (ImportError, RuntimeError, ValueError) as exc:
            log.warning("milp selection failed (%s); using the greedy selection", exc)
    elif solver != "greedy":
        raise ValueError(f"unknown solver {solver!r}; use auto, milp or greedy")
    return _solve_greedy(p, lim), "greedy"


def _min_choice(p: _Problem):
    """Every group at its narrowest non-zero allowed width (the smallest memory and EBOPs)."""
    kw = {}
    for layer in p.layers:
        ok = layer.allowed & (layer.widths > 0)[None, :]
        kw[layer.name] = np.where(ok.any(1), np.argmax(ok, axis=1), layer.cur)
    return kw, {q: 0 for q in p.acts}


def _until_feasible(qm, p: _Problem, t: Target, budget: Budget, lim: dict, solver: str, max_iterations: int,
                    time_limit: float, what: str):
    """Select, apply and measure until the measured cost meets ``budget``, lowering each internal
    limit by what the measured cost exceeds it (the planner's arena, the layout tables): (report or
    None, solver used, selections made); ``qm`` holds the last selection either way."""
    used, it = solver, 0
    for it in range(1, max_iterations + 1):
        choice, used = _solve(p, lim, solver, time_limit)
        if choice is None:
            break
        _apply_choice(qm, p, *choice)
        report = cost_report(qm, t)
        if feasible(report, budget):
            return report, used, it
        log.info("%s: measured %s after selection %d; tightening", what, violations(report, budget), it)
        _tighten(lim, report, budget, t, p, p.totals(*choice))
    return None, used, it
