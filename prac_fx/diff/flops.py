"""Weight-gradient flops per site: exact ``2 N n m`` against factored ``2 (N r m + m r n)``
(arXiv 2605.01255, dW = (dY^T (X P)) P^T); a skipped site keeps the exact cost; ``compress`` is
the forward cost ``2 N n r`` of each group's ``x @ P``.
"""
from __future__ import annotations

from prac_fx.passes import kinds
from prac_fx.passes.kinds import LINEAR_KINDS


def flops(sites: list[dict], groups) -> dict:
    rows = []
    for s in sites:
        if s["kind"] not in LINEAR_KINDS or s["n"] is None or s["N"] is None:
            continue
        N, n, m = s["N"], s["n"], s["m"]
        r = (s["r1"] or 0) + (s["r2"] or 0)
        exact = 2 * N * n * m
        factored = 2 * (N * r * m + m * r * n) if s["status"] == kinds.REWRITTEN else exact
        rows.append({"graph": s["graph"], "module": s["module"], "N": N, "n": n, "m": m, "r": r,
                     "exact": exact, "factored": factored})
    exact = sum(r["exact"] for r in rows)
    factored = sum(r["factored"] for r in rows)
    compress = 0
    for index, group, n_rows in groups:
        compress += 2 * n_rows * group.n * group.rank
    return {"sites": rows, "exact": exact, "factored": factored,
            "ratio": round(factored / exact, 4) if exact else None, "compress": compress}
