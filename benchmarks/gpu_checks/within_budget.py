"""The GPU checks' tolerance rule (design.md's): a result passes where its largest error against the
float64 reference is at most twice that of the same computation in the input dtype, plus ``atol``.

Imported by the check scripts beside it (a script's own folder is on ``sys.path``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_within_budget(
    label: str,
    names: Sequence[str],
    got: Sequence[torch.Tensor],
    want: Sequence[torch.Tensor],
    lowp: Sequence[torch.Tensor],
    atol: float,
    checks: list[str],
) -> float:
    """Append one ``FAIL`` line per tensor over its budget and a last ``PASS`` / ``FAIL`` line for
    ``label`` to ``checks``; return the worst error / budget ratio (<= 1 passes).

    Args:
        label: what was checked, e.g. ``"bias B=8 H=12 N=197 D=64"``.
        names: one name per tensor (``("out", "dq", "dk", "dv")``).
        got, want, lowp: the tensors under test, the float64 reference's, and the low-precision
            computation's (SDPA or the upstream math in the input dtype), in the same order.
        atol: the absolute slack added to every budget.
        checks: the list of check lines to extend.

    Example:
        >>> checks = []
        >>> check_within_budget("D=64", ("out",), [out], [out64], [out_sdpa], 1.6e-2, checks)
    """
    worst = 0.0
    for name, o, w, lo in zip(names, got, want, lowp, strict=True):
        budget = 2 * (lo.double() - w).abs().max().item() + atol
        err = (o.double() - w).abs().max().item()
        worst = max(worst, err / budget)
        if not err <= budget:
            checks.append(f"FAIL {label} {name}: err {err:.3g} > budget {budget:.3g}")
    checks.append(f"{'PASS' if worst <= 1 else 'FAIL'} {label} worst/budget={worst:.2f}")
    return worst

