"""corpus_input.py: the rows of a corpus file, as a stream."""
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import corpus_texts

from embed_ft import corpus_input


def test_parquet_rows_from_a_line_on_skip_whole_row_groups_and_keep_the_numbers(tmp_path):
    column = corpus_texts(50)
    column[23] = ""  # an empty text: skipped, yet every later row keeps its number
    pq.write_table(pa.table({"doc_id": [f"d{i}" for i in range(50)], "text": column}), tmp_path / "c.parquet", row_group_size=7)
    everything = list(corpus_input.rows(tmp_path / "c.parquet"))
    assert len(everything) == 49 and everything[23].line == 25 and everything[23].id == "d24"
    assert list(corpus_input.rows(tmp_path / "c.parquet", start_line=20)) == [r for r in everything if r.line >= 20]
