"""The sweep's table and figure (test error against training pairs), drawn from its results file
alone. matplotlib is imported only when a figure is drawn.
"""
from __future__ import annotations

import textwrap
from pathlib import Path


def training_set_size(run: dict) -> int:
    """The x of a run: its training pairs (the full split's own size where dataset_size is 0)."""
    t = run["training"]
    return run["config"]["dataset_size"] or t.get("train_pairs") or t["pairs"] // max(1, t["epochs"])


def cut_short(run: dict) -> bool:
    return run["training"].get("stopped_by") == "time_budget"


def sweep_table(rows: list[dict]) -> str:
    runs = sorted((r for r in rows if r.get("kind") == "run" and "fine_tuned" in r),
                  key=lambda r: (r["config"]["model"], r["config"]["dense_out_features"], training_set_size(r)))
    lines = [f"{'model':40} {'dim':>4} {'pairs':>7} {'epochs':>6} {'test error':>10} {'pairs/s':>8}  stopped"]
    for r in runs:
        c, t = r["config"], r["training"]
        epochs = t["pairs"] / training_set_size(r)  # a run cut by the time budget did not finish its epochs
        lines.append(f"{c['model'][-40:]:40} {c['dense_out_features']:4d} {training_set_size(r):7d} "
                     f"{epochs:6.2f} {r['fine_tuned']['test']['error_rate']:10.2%} {t['pairs_per_s']:8.1f}  "
                     f"{'by the time budget' if cut_short(r) else ''}")
    for r in rows:
        if r.get("kind") in ("zero_shot", "baseline") and "test" in r:
            name = r["model"] + (" (zero-shot)" if r["kind"] == "zero_shot" else "")
            lines.append(f"{name[-40:]:40} {r['dimensions'] or 0:4d} {'-':>7} {'-':>6} {r['test']['error_rate']:10.2%}")
    failed = [r for r in rows if "error" in r]
    if failed:
        lines.append(f"{len(failed)} failed attempt(s) recorded; rerun to retry them")
    return "\n".join(lines)


def sweep_plot(rows: list[dict], figure: Path, title: str = "") -> None:
    """Test error against training pairs, a panel per model, a line per output width (a hollow
    point: a run the time budget cut short); the zero-shot model (dotted, same colour) and each
    baseline (dashed) as horizontal lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [r for r in rows if r.get("kind") == "run" and "fine_tuned" in r]
    models = sorted({r["config"]["model"] for r in runs})
    baselines = [r for r in rows if r.get("kind") == "baseline" and "test" in r]
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(5.5 * max(1, len(models)), 4.2), squeeze=False)
    for ax, name in zip(axes[0], models):
        mine = [r for r in runs if r["config"]["model"] == name]
        for i, dim in enumerate(sorted({r["config"]["dense_out_features"] for r in mine})):
            line = sorted((r for r in mine if r["config"]["dense_out_features"] == dim), key=training_set_size)
            sizes = [training_set_size(r) for r in line]
            errors = [100 * r["fine_tuned"]["test"]["error_rate"] for r in line]
            ax.plot(sizes, errors, "o-", color=f"C{i}", label=f"fine-tuned, {dim}-d")
            cut = [(x, y) for x, y, r in zip(sizes, errors, line) if cut_short(r)]
            if cut:  # hollow: the time budget stopped these runs before their last epoch
                ax.plot(*zip(*cut), "o", mfc="white", color=f"C{i}", label=f"{dim}-d, cut by the time budget")
            for z in rows:
                if z.get("kind") == "zero_shot" and z["model"] == name and z["dimensions"] == dim:
                    ax.axhline(100 * z["test"]["error_rate"], color=f"C{i}", ls=":", label=f"zero-shot, {dim}-d")
        for j, base in enumerate(baselines):
            ax.axhline(100 * base["test"]["error_rate"], color=f"C{j + 5}", ls="--",
                       label=f"{Path(base['model']).name}, {base['dimensions']}-d (as published)")
        ax.set_xscale("log")
        sizes = sorted({training_set_size(r) for r in mine})
        ax.set_xticks(sizes, [f"{n:,}" for n in sizes], rotation=45, fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("training pairs")
        ax.set_ylabel("test error rate (%)")
        ax.set_title(Path(name).name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(textwrap.fill(title, 45 * max(1, len(models))), fontsize=10)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=120)
    plt.close(fig)
