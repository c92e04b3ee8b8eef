"""Sweep plots with matplotlib (an optional dependency)."""

from __future__ import annotations

import math


def plot_sweep(sweep, x: str, y: str, metric: str):
    import matplotlib.pyplot as plt

    rows = sweep.rows()
    client = sweep._sweeps._client
    figure, (heat, curves) = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = sorted({r[x] for r in rows if x in r})
    ys = sorted({r[y] for r in rows if y in r})
    maximize = sweep.raw.objective_direction != 2
    grid = [[math.nan] * len(xs) for _ in ys]
    for r in rows:
        if r.get("objective") is None or x not in r or y not in r:
            continue
        i, j = ys.index(r[y]), xs.index(r[x])
        old = grid[i][j]
        better = max if maximize else min
        grid[i][j] = r["objective"] if math.isnan(old) else better(old, r["objective"])
    image = heat.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
    heat.set_xticks(range(len(xs)), [str(v) for v in xs])
    heat.set_yticks(range(len(ys)), [f"{v:.3g}" if isinstance(v, float) else str(v) for v in ys])
    heat.set_xlabel(x)
    heat.set_ylabel(y)
    heat.set_title(f"{metric} ({'best' if maximize else 'lowest'} per cell)")
    figure.colorbar(image, ax=heat)
    for r in rows:
        frame = client.jobs.metrics(r["job_id"], kind="eval")
        points = [(m.step, m.value) for m in _records(frame) if m.name == metric]
        if points:
            steps, values = zip(*points)
            curves.plot(steps, values, marker=".", label=f"t{r['index']}")
    curves.set_xlabel("step")
    curves.set_ylabel(metric)
    curves.set_title("trials")
    if len(rows) <= 12:
        curves.legend(fontsize="small")
    figure.tight_layout()
    return figure


def _records(metrics):
    if hasattr(metrics, "itertuples"):
        return list(metrics.itertuples(index=False))
    return metrics
