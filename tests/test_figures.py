import figures


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
