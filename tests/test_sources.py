import json

from embed_ft import sources


def test_one_function_names_what_a_model_string_is(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    saved = tmp_path / "out"
    saved.mkdir()
    (saved / "modules.json").write_text(json.dumps([]))
    assert sources.model_kind("openai:text-embedding-3-small") == "openai"
    assert sources.model_kind(str(saved)) == sources.model_kind("out") == "saved"
    assert sources.model_kind(str(tiny_model_dir)) == "folder"                    # an encoder, no modules.json
    assert sources.model_kind("./typo") == sources.model_kind("/no/such") == "folder"  # named as a missing folder
    assert sources.model_kind("BAAI/bge-base-en-v1.5") == "hub"
    assert sources.is_hub_id("BAAI/bge-base-en-v1.5") and not sources.is_hub_id("out")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    assert not sources.is_hub_id("org/name")  # a local folder of that shape is local
