"""A home's history read back: each round's audit beside the error its decisions saw, the errors by
source, the round in words, and the figure.

The audit pairs are held out like the test pairs, but no decision ever looks at them: each round
records the error of the model that is current after it, on all the audit pairs so far, with its
95% interval counted by groups of pairs that share texts (paired.py), beside the error the decisions saw for that model (its test error when it was
promoted). The test pairs choose the winners, so the winner's test error is optimistic by
selection; the audit is not. Where their intervals do not meet, the history says so.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from embed_ft import jsonl, paired
from embed_ft.errors import InputError
from embed_ft.state.pair_store import pair_key


def latest_audits(home: Path) -> dict[str, dict]:
    """Each version's latest audit in the history: {version id: {"error", "interval", "n", "round"}}."""
    return {row["audit"]["version"]: row["audit"] | {"round": row["round"]}
            for row in jsonl.read(home / "history.jsonl") if "audit" in row}


def audit(home: Path, history: list[dict], row: dict, audit_right: np.ndarray, groups: np.ndarray | None = None) -> dict:
    """The current model's error on the audit pairs, beside the error the decisions saw for it (its
    test error when it was promoted; the base's, this round's); a disagreement of their 95%
    intervals is the optimism of selection, and the history says so. `audit_right`: True where the
    current model decides an audit pair right; `groups`: the audit pairs' groups (pairs that share
    texts), by which both intervals are counted."""
    version = Path(row["current_after"]).name
    decided = [r for r in history + [row] if r.get("decision") == "promoted" and r["candidate"] == row["current_after"]]
    seen_row, seen_of = (decided[-1], "candidate") if decided else (row, "current")
    seen_error, seen_n = seen_row[f"{seen_of}_error"], seen_row["test_pairs"]
    interval = seen_row.get(f"{seen_of}_interval") or paired.wilson_interval(round(seen_error * seen_n), seen_n)  # older rows
    seen = {"error": seen_error, "n": seen_n, "groups": seen_row.get("test_groups"), "interval": tuple(interval)}
    if not len(audit_right):
        return {"seen": seen}
    result = {"version": version, "error": float(np.mean(~audit_right)), "n": len(audit_right),
              "groups": len(np.unique(groups)) if groups is not None else len(audit_right),
              "design_effect": paired.design_effect(~audit_right, groups),
              "interval": paired.error_interval(~audit_right, groups)}
    agrees = result["interval"][0] <= seen["interval"][1] and seen["interval"][0] <= result["interval"][1]
    out = {"audit": result, "seen": seen, "audit_agrees": agrees}
    if not agrees:
        direction = "optimistic" if seen_error < result["error"] else "pessimistic"
        out["note"] = (f"the decisions saw {seen_error:.2%} for {version}, the audit measures {result['error']:.2%}: "
                       f"their 95% intervals do not meet, so the history's test error is {direction} (selection on "
                       "reused test pairs, or the traffic changed): trust the audit")
    return out


def by_source(sources: dict, sets: dict) -> dict:
    """Each error broken down by the pairs' `source` (a field of /v1/pairs): where traffic changes
    domain, each domain's held-out shows its own change. `sets`: {name: (pairs, {model: right})}."""
    out: dict[str, dict] = {}
    for name, (pairs, right) in sets.items():
        labels = np.array([sources.get(pair_key(a, b)) for a, b, _ in pairs], dtype=object)
        for source in sorted({s for s in labels if s is not None}):
            mask = labels == source
            entry = out.setdefault(source, {})
            entry[f"{name}_pairs"] = int(mask.sum())
            for model_name, r in right.items():
                entry[f"{name}_{model_name}_error"] = float(1 - r[mask].mean())
    return out



def spending(row: dict) -> str:
    """Where the round stands in the home's life-long alpha (rows before the budget was kept say less)."""
    if "alpha_allotted" not in row:
        return f": test {row['test_number']} of the home's life-long alpha {row['alpha_life']}" if "test_number" in row else ""
    return (f"; of the home's life-long alpha {row['alpha_life']}, {row['alpha_allotted']:.2g} allotted by round "
            f"{row['round_of_life']}, {row['alpha_spent_before']:.2g} spent before")


def describe(row: dict) -> str:
    """The round in two or three lines: the decision on the traffic's test pairs, and the audit."""
    if "evidence" in row:
        t, e = row["traffic"], row["evidence"]
        (lc, hc), (lk, hk) = t["interval_a"], t["interval_b"]
        line = (f"round {row['round']}: candidate {t['error_a']:.2%} [{lc:.1%}, {hc:.1%}] vs current {t['error_b']:.2%} "
                f"[{lk:.1%}, {hk:.1%}] test error on {t['n']:,} pairs in {t['groups']:,} groups ({t['only_a_right']} vs "
                f"{t['only_b_right']} pairs only one got right); {e['groups_for_a']} vs {e['groups_for_b']} groups favour "
                f"each by its log-loss, p = {e['p_value']:.2g} (at this round's level {row['alpha_round']:.2g}"
                f"{spending(row)}) -> {row['decision'].upper()}")
    elif "traffic" in row:  # a round decided before the gate weighed costs
        line = (f"round {row['round']}: " + paired.describe(row["traffic"], "candidate", "current")
                + f" (at this round's level {row['alpha_round']:.2g}{spending(row)}) -> {row['decision'].upper()}")
    else:
        votes = row.get("screen", {})
        line = (f"round {row['round']}: candidate {row['candidate_error']:.2%} vs current {row['current_error']:.2%} test "
                f"error; not tested, since validation does not favour it ({votes.get('for')} groups for it by their "
                f"log-loss, {votes.get('against')} against): nothing spent{spending(row)} -> REFUSED")
    if "curated" in row:
        line += f"; on the curated test: {row['curated']['verdict']}"
    if "audit" in row:
        a = row["audit"]
        groups = f" in {a['groups']:,} groups" if "groups" in a else ""
        line += (f"\naudit: {a['version']} {a['error']:.2%} [{a['interval'][0]:.1%}, {a['interval'][1]:.1%}] on {a['n']:,} "
                 f"pairs{groups} no decision saw; {row['splits']['unusable']:,} pairs unusable (their texts lie in two splits)")
    return line + (f"\nnote: {row['note']}" if row.get("note") else "")


def plot(history_path: Path, figure: Path) -> None:
    """Error against round: the current model's audit error with its 95% interval, the error the
    decisions saw, and each candidate (filled: promoted)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in jsonl.read(history_path) if r.get("decision") in ("promoted", "refused")]
    if not rows:
        raise InputError(f"{history_path}: no round has judged a candidate yet")
    rounds = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    audited = [r for r in rows if "audit" in r]
    if audited:
        errors_ = np.array([100 * r["audit"]["error"] for r in audited])
        bounds = np.array([[100 * r["audit"]["error"] - 100 * r["audit"]["interval"][0],
                            100 * r["audit"]["interval"][1] - 100 * r["audit"]["error"]] for r in audited]).T
        ax.errorbar([r["round"] for r in audited], errors_, yerr=bounds, fmt="s-", color="C0", capsize=3,
                    label="current model, audit error (95%)")
    ax.plot(rounds, [100 * r["seen"]["error"] for r in rows], "^:", color="C2", label="current model, as the decisions saw it")
    for r in rows:
        ax.plot(r["round"], 100 * r["candidate_error"], "o", color="C1" if r["decision"] == "promoted" else "C3",
                fillstyle="full" if r["decision"] == "promoted" else "none", ms=8)
        tested = f"p={r['p_value']:.1g}" if r.get("p_value") is not None else "not tested"
        ax.annotate(f"{r['decision']}\n{tested}\n{r['trained_on']:,} pairs", (r["round"], 100 * r["candidate_error"]),
                    textcoords="offset points", xytext=(8, -4), fontsize=7)
    ax.plot([], [], "o", color="C1", label="candidate on test, promoted")
    ax.plot([], [], "o", color="C3", fillstyle="none", label="candidate on test, refused")
    ax.set_xticks(rounds)
    ax.set_xlim(min(rounds) - 0.5, max(rounds) + 0.9)  # room for the last round's note
    ax.set_xlabel("round")
    ax.set_ylabel("error rate (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figure, dpi=120)
    plt.close(fig)
    print(f"figure: {figure}")
