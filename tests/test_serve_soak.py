"""benchmarks/serve_soak.py, shortened to 12 seconds: a real server process under the mixed load,
two promotions during it, no error, memory flat."""
import sys

from conftest import ROOT, TEST_DEVICE, synthetic_pairs

sys.path.insert(0, str(ROOT / "benchmarks"))
import serve_soak  # noqa: E402


def test_twelve_seconds_of_mixed_load_with_two_promotions(tiny_model_dir):
    pairs = synthetic_pairs(3000, 5)
    texts = list(dict.fromkeys(t for a, b, _ in pairs for t in (a, b)))
    result = serve_soak.soak(str(tiny_model_dir), minutes=12 / 60, rate=20, window_minutes=6 / 60, texts=texts,
                             pairs=pairs, curated=synthetic_pairs(192, 6), device=TEST_DEVICE)
    assert result["errors"] == 0, result["errors_by_status"]
    assert result["requests"] == 240 and [w["requests"] for w in result["windows"]] == [120, 120]
    assert result["promoted"] == ["round-001", "round-002"]
    assert result["versions_seen"] == ["base", "round-001", "round-002"]  # each swapped in while serving
    assert result["server_tracebacks"] == 0
    assert abs(result["rss_change"]) < 0.10, result
