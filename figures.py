"""The sweep's table and figure (test error against training pairs), drawn from its results file
alone. matplotlib is imported only when a figure is drawn.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from embed_ft import paired


def training_set_size(run: dict) -> int:
    """The x of a run: its training pairs (the full split's own size where dataset_size is 0)."""
    t = run["training"]
    return run["config"]["dataset_size"] or t.get("train_pairs") or t["pairs"] // max(1, t["epochs"])


def cut_short(run: dict) -> bool:
    return run["training"].get("stopped_by") == "time_budget"


def test_groups(rows: list[dict], n: int) -> np.ndarray | None:
    """The groups of the test pairs (pairs that share texts), as the zero-shot and baseline rows
    recorded them; None where no row of `n` pairs did (results of earlier code)."""
    recorded = next((r["test_groups"] for r in rows if len(r.get("test_groups") or []) == n), None)
    return np.array(recorded) if recorded is not None else None


def verdicts(run: dict, rows: list[dict]) -> dict:
    """The run against its zero-shot model and against each baseline, paired on the same test pairs
    (by groups where they were recorded, else McNemar): {"zero-shot" or the baseline's name: verdict}.
    Rows without outcomes are skipped."""
    if not run.get("test_correct"):
        return {}
    c, mine = run["config"], paired.unpack(run["test_correct"])
    groups = test_groups(rows, len(mine))
    others = {("zero-shot" if r["kind"] == "zero_shot" else Path(r["model"]).name): r for r in rows
              if r.get("test_correct") and "test" in r and (r.get("kind") == "baseline" or (
                  r.get("kind") == "zero_shot" and r["model"] == c["model"] and r["dimensions"] == c["dense_out_features"]))}
    return {name: paired.compare_pairs(mine, paired.unpack(r["test_correct"]), groups=groups)["verdict"]
            for name, r in others.items() if r["test_correct"]["n"] == len(mine)}


def interval(row: dict, rows: list[dict]) -> tuple[float, float]:
    """The 95% interval of a row's test error: by groups where its outcomes and the groups were
    recorded, else Wilson's."""
    test = row.get("fine_tuned", row).get("test")
    if row.get("test_correct"):
        right = paired.unpack(row["test_correct"])
        return paired.error_interval(~right, test_groups(rows, len(right)))
    return paired.wilson_interval(round(test["error_rate"] * test["n_pairs"]), test["n_pairs"])


def sweep_table(rows: list[dict]) -> str:
    """A row per run (better / worse than its zero-shot model and than each baseline, by the paired
    test), then the zero-shot and baseline rows. Names are never cut."""
    runs = sorted((r for r in rows if r.get("kind") == "run" and "fine_tuned" in r),
                  key=lambda r: (r["config"]["model"], r["config"]["dense_out_features"], training_set_size(r)))
    others = [r for r in rows if r.get("kind") in ("zero_shot", "baseline") and "test" in r]
    width = max([5] + [len(r["config"]["model"]) for r in runs] + [len(r["model"]) + 12 for r in others])
    lines = [f"{'model':{width}} {'dim':>4} {'pairs':>7} {'epochs':>6} {'test error':>10} {'95% interval':>15} "
             f"{'pairs/s':>8}  paired test (by groups of pairs that share texts) / stopped"]
    for r in runs:
        c, t = r["config"], r["training"]
        epochs = t["pairs"] / training_set_size(r)  # a run cut by the time budget did not finish its epochs
        low, high = interval(r, rows)
        said = "; ".join(f"{v} than {name}" if v in ("better", "worse") else f"vs {name}: {v}"
                         for name, v in verdicts(r, rows).items())
        lines.append(f"{c['model']:{width}} {c['dense_out_features']:4d} {training_set_size(r):7d} "
                     f"{epochs:6.2f} {r['fine_tuned']['test']['error_rate']:10.2%} {f'[{low:.1%}, {high:.1%}]':>15} "
                     f"{t['pairs_per_s']:8.1f}  {said}{'; cut by the time budget' if cut_short(r) else ''}")
    for r in others:
        name = r["model"] + (" (zero-shot)" if r["kind"] == "zero_shot" else "")
        low, high = interval(r, rows)
        lines.append(f"{name:{width}} {r['dimensions'] or 0:4d} {'-':>7} {'-':>6} {r['test']['error_rate']:10.2%} "
                     f"{f'[{low:.1%}, {high:.1%}]':>15}")
    failed = [r for r in rows if "error" in r]
    if failed:
        lines.append(f"{len(failed)} failed attempt(s) recorded; rerun to retry them")
    return "\n".join(lines)


def sweep_plot(rows: list[dict], figure: Path, title: str = "") -> None:
    """Test error against training pairs, a panel per model, a line per output width with each run's
    95% interval (a ring: better than its zero-shot model by the paired test; a square, in a
    baseline's colour: better than that baseline; a hollow point: a run the time budget cut short);
    the zero-shot model (dotted, same colour) and each baseline (dashed) as horizontal lines."""
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
            spans = [[e - 100 * interval(r, rows)[0] for e, r in zip(errors, line)],
                     [100 * interval(r, rows)[1] - e for e, r in zip(errors, line)]]
            ax.errorbar(sizes, errors, yerr=spans, fmt="o-", color=f"C{i}", capsize=3,
                        label=f"fine-tuned, {dim}-d (95% interval)")
            said = [verdicts(r, rows) for r in line]  # each run's paired tests, decoded once
            better = [(x, y) for x, y, v in zip(sizes, errors, said) if v.get("zero-shot") == "better"]
            if better:  # a ring: better than its zero-shot model by the paired test
                ax.plot(*zip(*better), "o", ms=11, mfc="none", color=f"C{i}", label=f"{dim}-d: better than zero-shot (McNemar)")
            for j, base in enumerate(baselines):  # a square: better than that baseline by the paired test
                beat = [(x, y) for x, y, v in zip(sizes, errors, said) if v.get(Path(base["model"]).name) == "better"]
                if beat:
                    ax.plot(*zip(*beat), "s", ms=14, mfc="none", color=f"C{j + 5}",
                            label=f"{dim}-d: better than {Path(base['model']).name} (McNemar)")
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
