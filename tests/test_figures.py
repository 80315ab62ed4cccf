from embed_ft import figures


def run_row(size: int, train_pairs: int, epochs_done: float, stopped_by: str, error: float) -> dict:
    return {"kind": "run", "config": {"model": "m", "dense_out_features": 8, "dataset_size": size},
            "training": {"train_pairs": train_pairs, "pairs": int(train_pairs * epochs_done), "epochs": 3,
                         "pairs_per_s": 100.0, "stopped_by": stopped_by},
            "fine_tuned": {"test": {"error_rate": error, "n_pairs": 1000}}}


def test_the_full_split_sits_at_its_size_and_a_cut_run_is_marked(tmp_path):
    rows = [run_row(100, 100, 3, "completed", 0.2), run_row(0, 5000, 1.72, "time_budget", 0.15)]
    assert [figures.training_set_size(r) for r in rows] == [100, 5000]  # not 8,600 pairs processed
    table = figures.sweep_table(rows).splitlines()
    assert table[1].split()[2:4] == ["100", "3.00"] and "budget" not in table[1]
    assert table[2].split()[2:4] == ["5000", "1.72"] and table[2].endswith("cut by the time budget")
    figures.sweep_plot(rows, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_the_figure_marks_runs_better_than_zero_shot_and_than_a_baseline(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    import numpy as np
    from embed_ft import paired
    right = np.ones(1000, bool)
    right[:100] = False                                       # the run: 10% error
    weaker = right.copy()
    weaker[100:300] = False                                   # 30%: 200 pairs only the run gets right
    run = run_row(100, 100, 3, "completed", 0.1) | {"test_correct": paired.pack(right)}
    zero_shot = {"kind": "zero_shot", "model": "m", "dimensions": 8, "test": {"error_rate": 0.3, "n_pairs": 1000},
                 "test_correct": paired.pack(weaker)}
    baseline = {"kind": "baseline", "model": "dir/base", "dimensions": 16, "test": {"error_rate": 0.1, "n_pairs": 1000},
                "test_correct": paired.pack(right)}               # as good as the run: no mark
    drawn = []
    monkeypatch.setattr(plt, "close", drawn.append)
    figures.sweep_plot([run, zero_shot, baseline], tmp_path / "f.png")
    labels = [t.get_text() for t in drawn[0].axes[0].get_legend().get_texts()]
    assert "8-d: better than zero-shot (McNemar)" in labels and not any("better than base" in t for t in labels)
    baseline["test_correct"] = paired.pack(weaker)             # now the run beats it too
    figures.sweep_plot([run, zero_shot, baseline], tmp_path / "f.png")
    labels = [t.get_text() for t in drawn[1].axes[0].get_legend().get_texts()]
    assert "8-d: better than base (McNemar)" in labels
