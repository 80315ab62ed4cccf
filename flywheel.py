"""The data flywheel: as labelled pairs keep arriving, retrain, and promote a model only if it wins.

    python flywheel.py --home fw --base DIR --init      # once: a home from a base model alone (SQLite inside it)
    python flywheel.py --home fw --base DIR --init --database postgresql://embed@db:5432/fw   # many servers
    python flywheel.py --home fw                         # a round over the pairs stored since the last one
    python flywheel.py --home fw --conflicts             # the contradictions, for a person to settle
    python flywheel.py --home fw --export DIR            # every stored pair once, as pair files
    python flywheel.py --home fw --migrate               # a home made before the database: into it, once
    python flywheel.py --home fw --migrate --database postgresql://embed@db:5432/fw   # or to another database
    python flywheel.py --plot fw/history.jsonl

One call is one round, and one round at a time: it holds the home's round lock (an advisory lock on
PostgreSQL, HOME/round.lock on one machine; a second round exits with one line, or waits its turn
with --wait; a lock left by a killed round goes with it). The pairs are those that `serve.py`'s
`POST /v1/pairs` stored in the home's database (`state/home_db.py`), each once, contradictions kept apart;
`--pairs FILES` adds pair files to them first. (A home made before the database reads the files in
HOME/pairs/ or --pairs, each pair counted once, `pair_store.settle`.)

A round:
1. gives every text no round has seen a split, train, validation, test or audit, kept in the home
   for good (`state/heldout.py`); the held-out pairs are written to HOME/heldout/;
2. trains a candidate on the training pairs, from the base model (`--mode scratch`, the default) or
   from the current model on the pairs no earlier round has read (`--mode continue`), at the home's
   one width, decided at --init, so that a client's vector index never changes width;
3. compares it with the current model, each at its own threshold tuned on validation: if the
   validation pairs' groups (pairs that share texts) favour it by each pair's log-loss
   (`calibration.py`), the test pairs' groups vote too, and it is promoted when they favour it at
   the level this round may spend of the home's life-long alpha and it decides fewer test pairs
   wrong (`gate.py`), and, where the home has a curated --test, is not significantly worse there;
4. audits the model that is current after the round on the audit pairs, which no decision sees, and
   says so in the history where the audit disagrees with the error the decisions saw.

Before any promotion the model to beat is the base model as published. Promotion writes nothing
into the current model: the candidate's folder (HOME/rounds/round-NNN, the model alone; the
traffic it trained on stays in HOME/work/) is complete before the pointer changes, one row in
the database, so a crash leaves the old model in place, and every server polling it (`serve.py`)
sees the old model or the new one, never half of one. A refused candidate stays in HOME/rounds/ for
inspection. Each round appends a line to HOME/history.jsonl. Interrupted, a round resumes its
training from the candidate's checkpoint when run again. The settings given once are kept in
HOME/flywheel.json, so that a scheduled round needs only --home.
"""
from __future__ import annotations

import argparse
import getpass
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from embed_ft import (calibration, card, checkpoint, data, errors, evaluate, fingerprint, gate, history, home_admin,
                      jsonl, options, paired, paths, run_folder, train)
from embed_ft.state import heldout, home_state
from embed_ft.errors import InputError
from embed_ft.model import Embedder, load_model
from embed_ft.state.file_lock import FileLock
from embed_ft.state.home_db import check_url
from embed_ft.state.home_state import file_digest, pair_files
from embed_ft.state.pair_store import pair_key, pair_sources, settle

SETTINGS = ("base", "val", "test", "mode", "alpha", "set", "fractions", "caps", "after_caps")
DEFAULTS = {"mode": "scratch", "alpha": 0.05, "set": "", "val": "", "test": "",
            "fractions": heldout.FRACTIONS, "caps": heldout.CAPS, "after_caps": heldout.AFTER_CAPS}
MIN_TEST, MIN_VALIDATION = 50, 20  # held-out pairs a round needs before it can judge (both labels among them)


# ------------------------------------------------------------------------------------ the home

def settings(home: Path, given: dict) -> dict:
    """The round's settings: those given now, else those kept in home/flywheel.json, else defaults.
    What is given is kept for the next round. The width is decided once, from the base model."""
    kept = jsonl.read_json(home / "flywheel.json") or {}
    merged = DEFAULTS | kept | {k: v for k, v in given.items() if v is not None}
    if not merged.get("base"):
        raise InputError(f"{home} has no flywheel settings yet: give --base MODEL once (it is kept in flywheel.json)")
    if bool(merged["val"]) != bool(merged["test"]):
        raise InputError("a curated set is --val and --test together (or neither: the traffic grows its own)")
    if "width" not in merged:  # what the base serves; every candidate is trained at it
        merged["width"] = load_model(merged["base"], None).dim
    asked = options.parse_overrides(merged["set"]).get("dense_out_features")
    if asked not in (None, 0, merged["width"]):
        raise InputError(f"--set dense_out_features={asked}: this home serves {merged['width']}-d vectors for its "
                         "whole life (a client's index must not change width); make a new home for another width")
    if merged != kept:
        jsonl.write_json(home / "flywheel.json", merged)
    return merged


# ------------------------------------------------------------------------------------ a round

def run_round(home: Path, chosen: dict, sources: list[str] | None = None, wait: bool = False,
              commit: Callable[[], None] | None = None) -> dict:
    """One round, holding the home's lock: assign, train, decide, audit, log. `sources`: pair files
    or folders (a file home reads them, by default HOME/pairs; a database home adds them first).
    `commit()` makes the home's files durable where a rename is not (a Modal Volume): it runs before
    the pointer names a new folder, and after the history's line."""
    home.mkdir(parents=True, exist_ok=True)
    db = home_state.database(home)
    with db.round_lock(wait) if db is not None else FileLock(home / "round.lock", wait=wait):
        return locked_round(home, chosen, sources, commit or (lambda: None))


def pairs_from_files(home: Path, sources: list[str], past: list[dict]) -> tuple[list, set, dict, dict]:
    """A file home's round reads every pair file, each pair once (`settle`): (pairs, the new ones,
    the history's facts about them, each pair's source)."""
    paths_ = pair_files(sources)
    if not paths_:
        raise InputError(f"no pair files (.csv, .tsv, .jsonl, .parquet, optionally .gz) in {' '.join(sources)} yet")
    files = {os.path.relpath(p): file_digest(p) for p in paths_}  # no absolute path in the history
    seen = home_state.files_read(past)
    new = [f for f, digest in files.items() if digest not in seen]
    if not new:
        raise InputError("no new pair files since the last round; drop some into --pairs")
    loaded = {f: data.load_pairs(f) for f in files}
    pairs, repeats, conflicts = settle([p for f in files for p in loaded[f]])
    facts = {"files": files, "new_files": len(new), "pairs_seen": sum(map(len, loaded.values())),
             "repeats_dropped": repeats, "conflicts_dropped": conflicts}
    return pairs, {p for f in new for p in loaded[f]}, facts, pair_sources(paths_)


def pairs_from_database(home: Path, db, sources: list[str] | None) -> tuple[list, set, dict, dict]:
    """A database home's round reads the stored pairs in arrival order (each once already; the
    conflicts are kept apart), after adding the pair files it was given."""
    repeats = 0
    for path in pair_files(sources or []):
        outcome = db.add(*home_state.stored_rows(path))
        repeats += outcome["duplicates"]
        print(f"{path}: {outcome['accepted']} pairs stored, {outcome['duplicates']} already there, "
              f"{outcome['conflicts']} conflicts")
    rows, read_before = db.pairs(), home_state.pairs_read(home)
    new = [(r["text1"], r["text2"], r["label"]) for r in rows if r["seq"] > read_before]
    if not new:
        raise InputError(f"no new pairs since the last round ({len(rows)} stored); send some to POST /v1/pairs")
    facts = {"pairs_through": rows[-1]["seq"], "new_pairs": len(new), "pairs_seen": len(rows), "repeats_dropped": repeats,
             "conflicts_kept_apart": db.conflict_count()}
    sources_ = {pair_key(r["text1"], r["text2"]): r["source"] for r in rows if r["source"]}
    return [(r["text1"], r["text2"], r["label"]) for r in rows], set(new), facts, sources_


def locked_round(home: Path, chosen: dict, sources: list[str] | None, commit: Callable[[], None]) -> dict:
    started = time.perf_counter()
    past = logged_promotion(home, jsonl.read(home / "history.jsonl"), commit)
    number, mode, pointer = home_state.round_number(home, past), chosen["mode"], home_state.current_version(home)
    before = pointer["path"] or "base"
    db = home_state.database(home)
    pairs, new_pairs, facts, sources_of = (pairs_from_database(home, db, sources) if db is not None else
                                           pairs_from_files(home, sources or [str(home / "pairs")], past))
    curated = {name: data.load_pairs(chosen[name]) for name in ("val", "test") if chosen[name]}
    curated_texts = {data.normalise(t) for ps in curated.values() for a, b, _ in ps for t in (a, b)}
    ledger = home_state.ledger(home)
    texts_before = len(ledger.split_of)
    splits = ledger.assign(pairs, curated_texts, chosen["fractions"], chosen["caps"], chosen["after_caps"])
    if curated and len(splits["curated"]) == len(pairs):
        raise InputError(f"all {len(pairs)} training pairs share a text with the curated --val/--test: the round has "
                         "nothing to train on; send pairs about other texts")
    heldout.write_held_out(home, splits)
    row = {"round": number, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "mode": mode, **facts,
           "splits": {k: len(v) for k, v in splits.items()},
           "new_texts": len(ledger.split_of) - texts_before, "width": chosen["width"], "current": before}
    row["unusable_new"] = row["splits"]["unusable"] - (past[-1]["splits"]["unusable"] if past and "splits" in past[-1] else 0)
    val, test = splits["validation"] + curated.get("val", []), splits["test"]
    missing = too_few(val, test)
    if missing:
        row |= {"decision": "waiting", "reason": missing, "current_after": before, "seconds": time.perf_counter() - started}
        jsonl.append(home / "history.jsonl", row)
        commit()
        print(f"round {number}: {missing}; the pairs are assigned, training waits for more")
        return row

    folder = home / "rounds" / f"round-{number:03d}"  # the model alone: the traffic stays in the home
    work = home / "work" / folder.name                 # the round's training and validation pairs
    chosen_train = [p for p in splits["train"] if mode == "scratch" or before == "base" or p in new_pairs]
    kept = data.drop_overlap(chosen_train, *curated.values(), remedy="the round has nothing to train on yet; "
                             "send more pairs") if curated else chosen_train
    if not kept:
        raise InputError("the round has no training pairs yet (every new pair was held out or unusable): send more pairs")
    overrides = options.parse_overrides(chosen["set"])
    base_model = load_model(chosen["base"], None, overrides.get("max_length", 256))
    config = options.Config(**overrides | {
        "model": str(home / before) if mode == "continue" and before != "base" else chosen["base"],
        "dense_out_features": chosen["width"] if base_model.projection is not None else 0,  # the base's own width
        "data": str(data.write_pairs(kept, work / "pairs.tsv.gz")),
        "val": str(data.write_pairs(val, work / "val.tsv.gz")), "test": str(home / "heldout" / "test.tsv.gz"),
        "zero_shot": False, "out": str(folder), "resume": checkpoint.exists(folder)})
    trained = time.perf_counter()
    if run_folder.finished_metrics(folder) is None:  # a round stopped after its training needs no second one
        train.train(config)
    row["train_seconds"] = time.perf_counter() - trained

    candidate = evaluate.Remembered(Embedder.load(folder))
    incumbent, incumbent_threshold = the_model_to_beat(home, before, base_model.to(candidate.encoder.device), val, number)
    thresholds = {"candidate": candidate.encoder.decision["threshold"], "current": incumbent_threshold}
    right = {name: evaluate.correct(model, test, thresholds[name]) for name, model in
             (("candidate", candidate), ("current", incumbent))}
    test_groups = paired.groups_of(test)
    groups_now, judged = len(np.unique(test_groups)), [r for r in past if r.get("decision") in ("promoted", "refused")]
    at = gate.level(past, chosen["alpha"], groups_now, chosen["caps"]["test"])
    spend = {"round_of_life": len(judged) + 1, "alpha_life": chosen["alpha"], "alpha_spent_before": gate.spent(past),
             "alpha_allotted": gate.allotted(len(judged) + 1, chosen["alpha"], groups_now, chosen["caps"]["test"]),
             "new_test_groups": groups_now - (judged[-1].get("test_groups", judged[-1]["test_pairs"]) if judged else 0)}
    costs = {name: decision_costs(model, thresholds[name], val, test) for name, model in
             (("candidate", candidate), ("current", incumbent))}
    screen = ({"favoured": True} if config.objective == "retrieval" else   # retrieval rounds are always tested
              gate.favoured(costs["candidate"][0], costs["current"][0], paired.groups_of(val)))
    verdict = (judge(candidate, incumbent, thresholds, right, costs, test, curated.get("test"), at, config.objective)
               if screen["favoured"] else {"alpha_round": 0.0, "decision": "refused", "refused_by": "validation"})
    promoted = verdict["decision"] == "promoted"
    after = str(folder.relative_to(home)) if promoted else before
    row |= {"trained_on": len(kept), "candidate": str(folder.relative_to(home)), "test_pairs": len(test),
            "test_groups": len(np.unique(test_groups)),
            "current_error": float(1 - right["current"].mean()), "candidate_error": float(1 - right["candidate"].mean()),
            "current_interval": paired.error_interval(~right["current"], test_groups),
            "candidate_interval": paired.error_interval(~right["candidate"], test_groups),
            "p_value": verdict.get("evidence", verdict.get("traffic", {})).get("p_value"),
            "verdict": verdict["traffic"]["verdict"] if "traffic" in verdict else "not tested: validation does not favour it",
            **spend, "screen": screen, **verdict,
            "objective": config.objective, "current_after": after}
    current, threshold = (candidate, thresholds["candidate"]) if promoted else (incumbent, thresholds["current"])
    audit_right = evaluate.correct(current, splits["audit"], threshold) if splits["audit"] else np.array([], bool)
    row |= history.audit(home, past, row, audit_right, paired.groups_of(splits["audit"]) if splits["audit"] else None)
    row["by_source"] = history.by_source(sources_of, {"test": (test, right),
                                                                "audit": (splits["audit"], {"current_after": audit_right})})
    if after != "base" and "audit" in row:
        card.add_audit(home / after, row)
    row["seconds"] = time.perf_counter() - started
    if promoted:  # everything measured first: the history's line follows the switch at once
        jsonl.write_json(work / "decision.json", row)  # what a crash before the line leaves for the next round
        commit()
        try:
            home_state.switch_current(home, folder, expected=pointer, number=number,
                                      fingerprint=fingerprint.of(candidate.encoder))
        except home_state.LostRace as e:  # another round holds the lock now: it decides, this one says so
            row = {k: v for k, v in row.items() if k not in ("audit", "seen", "audit_agrees", "note")}
            row |= {"decision": "lost", "current_after": before, "lost": str(e)}
            jsonl.append(home / "history.jsonl", row)
            commit()
            print(f"round {number}: its candidate won, but this round lost its lock before the switch ({e}): "
                  f"not promoted; {folder} stays for inspection")
            return row
    jsonl.append(home / "history.jsonl", row)
    commit()
    print(history.describe(row))
    return row


def logged_promotion(home: Path, past: list[dict], commit: Callable[[], None]) -> list[dict]:
    """The history, with the line of a round that crashed between its switch and its line: the served
    row names a version the history never promoted, so that round's line, kept in its work folder
    before the switch, is appended first. Without it the next round would judge the served model
    against itself, and count one test too few."""
    path = home_state.current_version(home)["path"]
    if path is None or any(r.get("decision") == "promoted" and r.get("candidate") == path for r in past):
        return past
    kept = jsonl.read_json(home / "work" / Path(path).name / "decision.json")
    if kept is None:  # a version promoted before the rounds kept their decision: nothing to repair from
        return past
    kept["repaired"] = "the switch was made and the round stopped before its history line; appended by the next round"
    jsonl.append(home / "history.jsonl", kept)
    commit()
    print(f"round {kept['round']}: promoted {path}, and stopped before its history line; the line is added now")
    return past + [kept]


def the_model_to_beat(home: Path, before: str, base_model, val: list[data.Pair], number: int):
    """The current model and its threshold; before any promotion, the base model as published (what a
    server of the home serves), its threshold tuned on validation and kept in the home."""
    if before != "base":
        incumbent = evaluate.Remembered(Embedder.load(home / before))
        return incumbent, incumbent.encoder.decision["threshold"]
    incumbent = evaluate.Remembered(base_model)
    threshold = evaluate.evaluate(incumbent, val)["val"]["threshold"]
    home_state.keep_base_threshold(home, threshold, len(val), number)  # every server polls it
    return incumbent, threshold


def decision_costs(model, threshold: float, val: list[data.Pair], test: list[data.Pair]) -> tuple[np.ndarray, np.ndarray]:
    """Each validation and each test pair's cost for a model (calibration.py: the log-loss of its
    probability, its slope fitted on validation): what the screen and the gate's votes compare."""
    val_scores, labels = evaluate.cosine_scores(model, val), evaluate.labels_of(val)
    slope = calibration.fit_slope(val_scores, threshold, labels)
    return (calibration.log_losses(val_scores, threshold, labels, slope),
            calibration.log_losses(evaluate.cosine_scores(model, test), threshold, evaluate.labels_of(test), slope))


def judge(candidate, incumbent, thresholds: dict, right: dict, costs: dict, test: list[data.Pair], curated_test,
          at: float, objective: str) -> dict:
    """The gate's verdict at level `at`: on pairs (with a curated test set as a guard), or on ranking."""
    if objective == "retrieval":
        ranks = [np.array(evaluate.retrieval_metrics(m, test, per_query=True)["reciprocal_ranks"]) for m in (candidate, incumbent)]
        return gate.decide_queries(*ranks, at)
    guard = None
    if curated_test:
        guard = tuple(evaluate.correct(m, curated_test, thresholds[n]) for n, m in (("candidate", candidate), ("current", incumbent)))
    return gate.decide(right["candidate"], right["current"], costs["candidate"][1], costs["current"][1], at, guard,
                       paired.groups_of(test), paired.groups_of(curated_test) if curated_test else None)


def too_few(val: list[data.Pair], test: list[data.Pair]) -> str | None:
    """Why the held-out pairs cannot judge a round yet, if they cannot."""
    for name, pairs, least in (("test", test, MIN_TEST), ("validation", val, MIN_VALIDATION)):
        labels = {y for *_, y in pairs}
        if len(pairs) < least or labels != {0, 1}:
            return f"{len(pairs)} {name} pairs so far ({sorted(labels)} labels); a round needs {least} with both labels"
    return None


def parse_shares(text: str, flag: str, kind) -> dict:
    """--fractions 0.1,0.3,0.1 or --caps 1000,5000,2000: validation, test and audit."""
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or min(values) < 0:
        raise InputError(f"{flag} {text}: give three numbers, VALIDATION,TEST,AUDIT (for example "
                         f"{','.join(str(v) for v in (heldout.FRACTIONS if kind is float else heldout.CAPS).values())})")
    if kind is float and sum(values) >= 1:
        raise InputError(f"{flag} {text}: the held-out shares must leave some pairs to train on (sum below 1)")
    return dict(zip(heldout.HELD_OUT, values))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", metavar="OUTDIR", help="the flywheel's folder: flywheel.json, pairs.db, rounds/, "
                        "heldout/, work/, history.jsonl")
    parser.add_argument("--base", metavar="MODEL", help="the base encoder (hub name or folder) that training starts from")
    parser.add_argument("--database", help="with --init (or --migrate): where the home's pairs, splits and versions live, "
                        f"{home_state.DEFAULT_DATABASE} (default, in the home) or postgresql://USER@HOST:PORT/DB "
                        "(the password in PGPASSWORD, never in the home)")
    parser.add_argument("--pairs", nargs="+", metavar="PAIRS", help="pair files, or folders of them, added to the store "
                        "before the round")
    parser.add_argument("--val", metavar="FILE", help="optional curated validation pairs, beside the traffic's own")
    parser.add_argument("--test", metavar="FILE", help="optional curated test pairs: a candidate must not be worse there")
    parser.add_argument("--mode", choices=["scratch", "continue"],
                        help="scratch (default): base model on all pairs; continue: current model on new pairs only")
    parser.add_argument("--alpha", type=float, help="the home's budget of false promotions over its life (default 0.05)")
    parser.add_argument("--fractions", help="of new pairs, the shares held out as VALIDATION,TEST,AUDIT (default 0.1,0.3,0.1)")
    parser.add_argument("--caps", help="... until each holds this many groups of pairs that share texts "
                        "(default 1000,5000,2000)")
    parser.add_argument("--after-caps", help="... then these shares of new pairs (default 0,0.1,0: the test set "
                        "keeps growing, slowly, so that an old home's tests keep their power)")
    parser.add_argument("--set", help="training options as option=value ... (see python train.py --help)")
    parser.add_argument("--init", action="store_true", help="only keep the settings in HOME/flywheel.json")
    parser.add_argument("--wait", action="store_true", help="wait for a round already running, instead of exiting")
    parser.add_argument("--conflicts", action="store_true", help="only list the stored contradictions")
    parser.add_argument("--export", metavar="OUTDIR", help="only write every stored pair once (pairs.tsv) and the "
                        "conflicts (conflicts.tsv) into this folder")
    parser.add_argument("--correct", nargs=3, metavar=("TEXT1", "TEXT2", "LABEL"), help="only correct a stored "
                        "pair's label (LABEL 0 or 1), or withdraw it (LABEL withdraw), with --why; kept with who and when")
    parser.add_argument("--why", help="with --correct: why, kept beside the correction")
    parser.add_argument("--by", default=getpass.getuser(), help="with --correct: who (default: this user)")
    parser.add_argument("--prune", type=int, metavar="KEEP", help="only remove the model folders and work files of "
                        "rounds: all but the versions served and the last KEEP rounds (the history keeps every number)")
    parser.add_argument("--migrate", action="store_true", help="only move a home made before the database into it, "
                        "or a database home into the (empty) --database, the old one kept")
    parser.add_argument("--plot", metavar="FILE", help="only draw this history.jsonl as a figure")
    errors.add_debug_flag(parser)
    args = paths.parse(parser, argv)
    if args.plot:
        return history.plot(Path(args.plot), Path(args.plot).with_suffix(".png"))
    if not args.home:
        raise InputError("a round needs --home")
    if args.alpha is not None and not 0 < args.alpha < 1:
        raise InputError("--alpha must be between 0 and 1")
    home = Path(args.home)
    if args.database:
        check_url(args.database)
    is_new = not (home / "flywheel.json").is_file()
    if args.migrate:
        return home_admin.migrate(home, args.database or home_state.DEFAULT_DATABASE)
    if args.database and not is_new:
        raise InputError("--database is chosen when a home is made (--init), or with --migrate to move the home")
    if args.conflicts or args.export:
        return home_admin.show_data(home, args.conflicts, args.export)
    if args.correct:
        return home_admin.correct(home, args.correct, args.why, args.by)
    if args.prune is not None:
        return home_admin.prune(home, args.prune)
    if args.set:
        options.parse_overrides(args.set)  # a bad --set is named before it is kept
    given = {k: getattr(args, k) for k in SETTINGS}
    given["fractions"] = parse_shares(args.fractions, "--fractions", float) if args.fractions else None
    given["caps"] = parse_shares(args.caps, "--caps", int) if args.caps else None
    given["after_caps"] = parse_shares(args.after_caps, "--after-caps", float) if args.after_caps else None
    if is_new:
        given["database"] = args.database or home_state.DEFAULT_DATABASE
        home_state.open_database(given["database"], home.resolve())  # reachable, its tables made, before it is kept
    chosen = settings(home, given)
    if args.init:
        return print(f"{home}/flywheel.json: {chosen}")
    run_round(home, chosen, args.pairs, args.wait)


if __name__ == "__main__":
    errors.run(main)
