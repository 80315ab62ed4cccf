"""corpus_search.py: a corpus folder's index, built and grown, and search through it."""
import pytest
from conftest import corpus_texts, write_table

from embed_ft import corpus, corpus_folder, corpus_search
from embed_ft.model import load_model


@pytest.fixture
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir)).eval()


def test_search_finds_a_corpus_text_by_itself(tiny, tmp_path):
    sample = corpus_texts(120)
    (tmp_path / "c.txt").write_text("\n".join(sample) + "\n")
    corpus.embed_corpus(tmp_path / "c.txt", tmp_path / "out", tiny, "tiny", bf16=False)
    hits = corpus_search.search_corpus(tmp_path / "out", sample[:3], tiny, k=4, bf16=False)
    assert [h[0]["text"] for h in hits] == sample[:3] and all(len(h) == 4 for h in hits)
    assert all(h[0]["score"] == pytest.approx(1.0, abs=1e-4) and h[0]["score"] >= h[1]["score"] for h in hits)
    corpus_search.index_corpus(tmp_path / "out", "hnsw")  # the graph index: recall measured against exact search
    manifest = corpus_folder.read_manifest(tmp_path / "out")
    assert manifest["index"]["kind"].startswith("hnsw") and 0.9 <= manifest["index"]["recall_at_10"] <= 1.0


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivf"])
def test_a_corpus_grown_with_nothing_dropped_adds_to_its_index(tiny, tmp_path, kind):
    rows = [(f"q{i}", t) for i, t in enumerate(corpus_texts(150))]
    out = tmp_path / "out"
    corpus.embed_corpus(write_table(tmp_path / "c.tsv", rows[:100]), out, tiny, "tiny", shard_size=40, bf16=False,
                        build_index=False)
    corpus_search.index_corpus(out, kind)
    manifest = corpus.embed_corpus(write_table(tmp_path / "c.tsv", rows), out, tiny, "tiny", shard_size=40, bf16=False)
    assert manifest["index"]["built"] == "extended" and manifest["index"]["vectors"] == 150
    assert manifest["index"]["kind"].startswith(kind)
    hits = corpus_search.search_corpus(out, [t for _, t in rows[120:125]], tiny, k=1, bf16=False)
    assert [h[0]["id"] for h in hits] == [i for i, _ in rows[120:125]]
    shrunk = corpus.embed_corpus(write_table(tmp_path / "c.tsv", rows[5:]), out, tiny, "tiny", shard_size=40, bf16=False)
    assert shrunk["index"]["built"] == "built" and shrunk["index"]["vectors"] == 145  # rows dropped: built again
