"""serve.py over real HTTP on loopback: a uvicorn server on a free port, the official openai client."""
import base64
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import httpx
import modal
import numpy as np
import openai
import pytest
from conftest import local_modules_imported, ROOT, TEST_DEVICE, LoopbackServer, free_port, run_cli, synthetic_pairs, write_tsv

from embed_ft import flywheel, jsonl, serve
from embed_ft.server import api_contract, scheduler, serve_metrics
from embed_ft.state import heldout, home_db, home_state
from embed_ft.errors import InputError
from embed_ft.state.home_db import HomeDB
from embed_ft.model import Embedder, cpu_has_bf16

KEY = "test-write-key"


@pytest.fixture(scope="module")
def saved_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny BERT with a 96-d projection and a stored threshold, saved as train.py saves."""
    folder = tmp_path_factory.mktemp("served") / "tiny-96"
    Embedder.from_pretrained(str(tiny_model_dir), dense_out_features=96).save(folder, {"threshold": 0.5})
    return folder


@pytest.fixture(scope="module")
def model_server(saved_model):
    with LoopbackServer(serve.make_app(None, str(saved_model), device=TEST_DEVICE, precision="fp32")) as server:
        yield server


def make_home(tiny_model_dir, tmp_path, *options: str) -> Path:
    """A flywheel home of the tiny BERT on synthetic topics, initialised (with `options`), nothing promoted yet."""
    val = write_tsv(tmp_path / "val.tsv", synthetic_pairs(96, 2))
    test = write_tsv(tmp_path / "test.tsv", synthetic_pairs(400, 3))
    home = tmp_path / "fw"
    flywheel.main(["--home", str(home), "--base", str(tiny_model_dir), "--val", str(val), "--test", str(test),
                   "--set", f"epochs=4 batch_size=16 lr=1e-3 device={TEST_DEVICE}", "--init", *options])
    return home


@pytest.fixture
def home(tiny_model_dir, tmp_path) -> Path:
    return make_home(tiny_model_dir, tmp_path)


TEXTS = ["t1a the t1b", "how t2a is t2c", "t3b", "why can i t4a t4b t4c best way"]


def test_the_openai_client_gets_what_encode_computes(model_server, saved_model):
    client = openai.OpenAI(base_url=model_server.url + "/v1", api_key="unused")
    expected = Embedder.load(saved_model).encode(TEXTS, bf16=False)  # the server runs in fp32, on a CPU with bf16 too
    default = client.embeddings.create(model="text-embedding-3-small", input=TEXTS)  # base64 by default
    floats = client.embeddings.create(model="anything", input=TEXTS, encoding_format="float")
    for response in (default, floats):
        got = np.array([d.embedding for d in sorted(response.data, key=lambda d: d.index)])
        np.testing.assert_allclose(got, expected, atol=1e-6)
        assert response.model == "tiny-96" and response.usage.prompt_tokens == sum(
            len(ids) for ids in Embedder.load(saved_model).tokenizer(TEXTS)["input_ids"])
    short = client.embeddings.create(model="x", input="t1a the t1b", dimensions=64)
    vector = np.array(short.data[0].embedding)
    assert vector.shape == (64,) and np.linalg.norm(vector) == pytest.approx(1, abs=1e-6)
    prefix = expected[0, :64] / np.linalg.norm(expected[0, :64])
    np.testing.assert_allclose(vector, prefix, atol=1e-6)


def test_base64_is_raw_little_endian_float32(model_server, saved_model):
    body = httpx.post(model_server.url + "/v1/embeddings", json={"input": TEXTS[:1], "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(vector, Embedder.load(saved_model).encode(TEXTS[:1], bf16=False)[0], atol=1e-6)


def test_long_texts_are_truncated_and_counted(model_server, saved_model):
    long = " ".join(["t5a"] * 600)  # far past max_length (64 positions in the tiny BERT)
    body = httpx.post(model_server.url + "/v1/embeddings", json={"input": [long, "t1a"]}).json()
    assert body["truncated"] == 1
    np.testing.assert_allclose(body["data"][0]["embedding"], Embedder.load(saved_model).encode([long], bf16=False)[0], atol=1e-6)


def test_duplicates_answer_with_the_stored_threshold(model_server, saved_model):
    pairs = [("t1a the t1b", "t1b how t1c"), ("t2a", "t9c why")]
    body = httpx.post(model_server.url + "/v1/duplicates",
                      json={"pairs": [{"text1": a, "text2": b} for a, b in pairs]}).json()
    vectors = Embedder.load(saved_model).encode([t for pair in pairs for t in pair], bf16=False)  # fp32, as served
    cosines = (vectors[0::2] * vectors[1::2]).sum(1)
    assert body["model"] == "tiny-96" and body["threshold"] == 0.5
    assert [d["cosine"] for d in body["data"]] == pytest.approx(cosines.tolist(), abs=1e-6)
    assert [d["is_duplicate"] for d in body["data"]] == (cosines > 0.5).tolist()


BAD = [
    ("empty input", {"json": {"input": []}}, 400),
    ("an empty string", {"json": {"input": ["t1a", ""]}}, 400),
    ("2,049 inputs", {"json": {"input": ["t1a"] * 2049}}, 400),
    ("a non-string item", {"json": {"input": ["t1a", {"text": "t1b"}]}}, 400),
    ("token arrays", {"json": {"input": [[101, 2000, 102]]}}, 400),
    ("invalid JSON", {"content": b'{"input": ["t1a"', "headers": {"content-type": "application/json"}}, 400),
    ("a wrong content type", {"content": b"input=t1a", "headers": {"content-type": "application/x-www-form-urlencoded"}}, 415),
    ("a body over the limit", {"content": b"x" * (api_contract.MAX_READ_BODY_BYTES + 1), "headers": {"content-type": "application/json"}}, 413),
    ("3 MiB of empty objects", {"content": b'{"input": [' + b"{}," * (1 << 20) + b'{}]}', "headers": {"content-type": "application/json"}}, 400),
    ("a million short strings", {"content": b'{"input": [' + b'"ab",' * 700_000 + b'"ab"]}', "headers": {"content-type": "application/json"}}, 400),
    ("JSON nested 100,000 deep", {"content": b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "headers": {"content-type": "application/json"}}, 400),
    ("an unknown version", {"json": {"input": ["t1a"], "model": "round-007"}}, 404),
    ("a text over the character limit", {"json": {"input": ["t1a " * (api_contract.MAX_TEXT_CHARS // 4 + 1)]}}, 400),
    ("a bad encoding_format", {"json": {"input": ["t1a"], "encoding_format": "int8"}}, 400),
    ("dimensions past the width", {"json": {"input": ["t1a"], "dimensions": 97}}, 400),
]


@pytest.mark.parametrize("case, request_, status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_json_error_and_the_server_goes_on(model_server, case, request_, status):
    response = httpx.post(model_server.url + "/v1/embeddings", timeout=30, **request_)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and "Traceback" not in response.text
    assert httpx.post(model_server.url + "/v1/embeddings", json={"input": "t1a"}).status_code == 200


def pairs_of(n: int, seed: int) -> list[dict]:
    return [{"text1": a, "text2": b, "label": y} for a, b, y in synthetic_pairs(n, seed)]


def test_pairs_need_the_key_and_are_stored_once(home, monkeypatch):
    monkeypatch.setenv("EMBED_FT_WRITE_KEY", KEY)
    with LoopbackServer(serve.make_app(home, None, device=TEST_DEVICE)) as server:
        url, good = server.url + "/v1/pairs", {"authorization": f"Bearer {KEY}"}
        batch = {"pairs": pairs_of(20, 7)}
        assert httpx.post(url, json=batch).status_code == 401
        assert httpx.post(url, json=batch, headers={"authorization": "Bearer wrong"}).status_code == 401
        for bad in ({"pairs": [{"text1": "t1a", "text2": "t2a", "label": 2}]},
                    {"pairs": [{"text1": "t1a", "text2": "t2a", "label": "1"}]},
                    {"pairs": [{"text1": "t1a", "text2": "t2a"}]}, {"pairs": []}):
            response = httpx.post(url, json=bad, headers=good)
            assert response.status_code == 400 and response.json()["error"]["param"].startswith("pairs"), bad
        itself = httpx.post(url, json={"pairs": [{"text1": "t1a", "text2": " T1A ", "label": 1}]}, headers=good).json()
        assert itself["accepted"] == 0 and itself["dropped_self_pairs"] == 1  # dropped and counted, as train.py does
        first = httpx.post(url, json=batch, headers=good).json()
        assert (first["accepted"], first["duplicates"], first["conflicts"]) == (len(batch["pairs"]) - first["duplicates"], first["duplicates"], 0)
        again = httpx.post(url, json=batch, headers=good).json()
        assert again["accepted"] == 0 and again["duplicates"] == 20 and again["stored"] == first["stored"] == first["accepted"]
        flipped = {"pairs": [dict(batch["pairs"][0], label=1 - batch["pairs"][0]["label"])]}
        assert httpx.post(url, json=flipped, headers=good).json()["conflicts"] == 1
        metrics = httpx.get(server.url + "/metrics").text
        assert 'embed_ft_pairs_total{outcome="conflict"} 1.0' in metrics
        assert 'embed_ft_requests_total{code="401",route="/v1/pairs"} 2.0' in metrics
        assert KEY not in metrics
    assert home_state.database(home).count() == first["accepted"]


def test_a_person_corrects_a_stored_label_through_the_api_with_the_write_key(home, monkeypatch):
    monkeypatch.setenv("EMBED_FT_WRITE_KEY", KEY)
    good = {"authorization": f"Bearer {KEY}"}
    with LoopbackServer(serve.make_app(home, None, device=TEST_DEVICE)) as server:
        url = server.url + "/v1/pairs"
        posted = pairs_of(4, 3)
        httpx.post(url, json={"pairs": posted}, headers=good).raise_for_status()
        fix = {"text1": posted[0]["text1"], "text2": posted[0]["text2"], "label": 1 - posted[0]["label"], "by": "ana",
               "why": "a wrong first label"}
        assert httpx.post(url + "/corrections", json={"corrections": [fix]}).status_code == 401
        assert httpx.post(url + "/corrections", json={"corrections": [fix | {"why": ""}]}, headers=good).status_code == 400
        missing = httpx.post(url + "/corrections", json={"corrections": [fix | {"text1": "never posted"}]}, headers=good)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "pair_not_found"
        withdraw = {"text1": posted[1]["text1"], "text2": posted[1]["text2"], "label": None, "by": "ana", "why": "spam"}
        reply = httpx.post(url + "/corrections", json={"corrections": [fix, withdraw]}, headers=good)
        assert reply.status_code == 200 and reply.json()["corrected"] == 2
    stored = {(p["text1"], p["text2"]): p["label"] for p in home_state.database(home).pairs()}
    assert stored[(fix["text1"], fix["text2"])] == fix["label"] and (withdraw["text1"], withdraw["text2"]) not in stored


def test_a_batch_stored_is_acknowledged_even_when_a_read_after_the_commit_fails(home, monkeypatch):
    monkeypatch.setenv("EMBED_FT_WRITE_KEY", KEY)
    assert home_state.base_threshold(home) is None  # the server tunes the curated --val's threshold for itself only
    with LoopbackServer(serve.make_app(home, None, device=TEST_DEVICE)) as server:
        def failing_refresh(self):
            raise home_db.StoreUnavailable("the database went away after the commit")
        monkeypatch.setattr(heldout.Ledger, "refresh", failing_refresh)
        reply = httpx.post(server.url + "/v1/pairs", json={"pairs": pairs_of(5, 3)}, headers={"authorization": f"Bearer {KEY}"})
        assert reply.status_code == 200 and reply.json()["accepted"] == 5 and reply.json()["touching_held_out"] is None
    assert home_state.database(home).count() == 5 and home_state.base_threshold(home) is None


def start_server(home: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--home", str(home), "--port", str(port),
                                "--device", TEST_DEVICE], env=os.environ | {"EMBED_FT_WRITE_KEY": KEY})
    deadline = time.time() + 90
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        assert process.poll() is None and time.time() < deadline, "the server did not start"
        time.sleep(0.2)


def test_acknowledged_pairs_survive_kill_9(home):
    port = free_port()
    server = start_server(home, port)
    acknowledged, stop = [], threading.Event()

    def stream():  # a client posting batch after batch until the server dies under it
        with httpx.Client(headers={"authorization": f"Bearer {KEY}"}, timeout=10) as client:
            for i in range(400):
                batch = [{"text1": f"t{i % 24}a stream {i} {j}", "text2": f"t{i % 24}b", "label": j % 2, "id": f"{i}-{j}"}
                         for j in range(5)]
                try:
                    if client.post(f"http://127.0.0.1:{port}/v1/pairs", json={"pairs": batch}).status_code == 200:
                        acknowledged.extend(batch)
                except httpx.TransportError:
                    return
                if stop.is_set():
                    return

    client = threading.Thread(target=stream)
    client.start()
    while len(acknowledged) < 60:
        time.sleep(0.01)
    server.send_signal(signal.SIGKILL)  # mid-stream: a post is in flight
    server.wait()
    stop.set()
    client.join(timeout=30)
    restarted = HomeDB("sqlite:///pairs.db", home)  # what a restarted server opens
    ids = [r["id"] for r in restarted.pairs()]
    assert {p["id"] for p in acknowledged} <= set(ids) and len(ids) == len(set(ids))
    assert restarted.add(acknowledged) == {"accepted": 0, "duplicates": len(acknowledged), "conflicts": 0, "dropped_self_pairs": 0,
                                           "stored": len(ids)}


def test_the_loop_turns_a_round_promotes_under_load_and_no_request_fails(home, monkeypatch):
    """Serve the base model; post pairs; the scheduled round trains, tests and promotes; the server
    answers with the new version without a restart, and its test error is the one the history records."""
    monkeypatch.setenv("EMBED_FT_WRITE_KEY", KEY)
    app = serve.make_app(home, None, device=TEST_DEVICE, watch_every=0.2)
    rounds = scheduler.RoundScheduler(home, every=0.5, min_new_pairs=150)
    seen, failures, stop = [], [], threading.Event()
    with LoopbackServer(app) as server:
        def load():  # a bounded load: 4 clients 20 ms apart, until the swap is seen, at most 20,000 requests and 8 minutes
            with httpx.Client(base_url=server.url, timeout=30) as client:
                for i in range(20_000):
                    time.sleep(0.02)  # leaves the round (at nice 10) some of the cores
                    response = client.post("/v1/embeddings", json={"input": TEXTS[i % 4: i % 4 + 2]})
                    (seen if response.status_code == 200 else failures).append(
                        response.json()["model"] if response.status_code == 200 else response.text)
                    if stop.is_set() or time.time() > started + 480:
                        return
        started = time.time()
        clients = [threading.Thread(target=load) for _ in range(4)]
        for c in clients:
            c.start()
        posted = httpx.post(server.url + "/v1/pairs", json={"pairs": pairs_of(600, 1)},
                            headers={"authorization": f"Bearer {KEY}"}).json()
        assert posted["accepted"] > 550
        rounds.start()
        deadline = time.time() + 480  # a round takes ~10 s alone; at nice 10 beside other work, minutes
        while "round-001" not in seen[-4:] and time.time() < deadline and any(c.is_alive() for c in clients):
            time.sleep(0.2)
        stop.set()
        for c in clients:
            c.join(timeout=30)
        rounds.stop()
        while not jsonl.read(home / "history.jsonl") and time.time() < deadline:  # written right after the switch
            time.sleep(0.1)
        assert not failures and "round-001" in seen, (failures[:3], seen[-3:], (home / "rounds.log").read_text()[-2000:])
        first_new = seen.index("round-001")
        assert seen[:first_new] == ["base"] * first_new and first_new > 0  # old, then new; interleaving is
        assert seen[first_new:].count("base") <= 3                         # only requests admitted before the swap
        row = jsonl.read(home / "history.jsonl")[0]
        assert row["decision"] == "promoted" and row["trained_on"] <= row["splits"]["train"] < posted["accepted"]
        test = [(a, b, y) for a, b, y in synthetic_pairs(400, 3)]
        body = httpx.post(server.url + "/v1/duplicates", timeout=60,
                          json={"pairs": [{"text1": a, "text2": b} for a, b, _ in test]}).json()
        error = np.mean([d["is_duplicate"] != bool(y) for d, (_, _, y) in zip(body["data"], test)])
        assert body["model"] == "round-001" and error == pytest.approx(row["curated"]["error_a"], abs=1e-9)
        models = httpx.get(server.url + "/v1/models").json()
        while models["data"][0]["audit"] is None and time.time() < deadline:  # the watcher reads the history at its poll
            time.sleep(0.1)
            models = httpx.get(server.url + "/v1/models").json()
        assert models["current"] == "round-001" and [m["id"] for m in models["data"]] == ["round-001", "base"]
        assert models["data"][0]["training_pairs"] == row["trained_on"] and models["data"][0]["width"] == 32
        assert models["data"][0]["audit"]["error"] == row["audit"]["error"] and models["data"][0]["audit"]["round"] == 1
        old = httpx.post(server.url + "/v1/embeddings", json={"input": ["t1a"], "model": "base"}).json()
        assert old["model"] == "base" and len(old["data"][0]["embedding"]) == 32  # the previous version, same width
        assert 'embed_ft_model_version{role="current",version="round-001"} 1.0' in httpx.get(server.url + "/metrics").text


def test_the_modal_app_declares_a_web_class_and_a_scheduled_round(home, tiny_model_dir, tmp_path, postgres, monkeypatch):
    assert isinstance(serve.app, modal.App) and isinstance(serve.Server, modal.cls.Cls)
    assert isinstance(serve.scheduled_round, modal.Function) and isinstance(serve.volume, modal.Volume)
    source = Path(serve.__file__).read_text()
    assert '@modal.asgi_app()' in source and 'schedule=modal.Cron(' in source and "@modal.concurrent(" in source
    call = source[source.index(".add_local_python_source("):].split(")", 1)[0]
    missing = {name for name in local_modules_imported("serve") - {"serve"} if f'"{name}"' not in call}
    assert not missing, missing  # what serve.py, the server and the round import, through each other too
    assert '"embed_ft"' in call  # the name they are imported by
    monkeypatch.setattr(serve, "HOME", home)  # a SQLite home: one machine's, refused
    with pytest.warns(UserWarning, match="executing locally"), pytest.raises(InputError, match="must keep its state in PostgreSQL"):
        serve.scheduled_round.local(min_new_pairs=10)
    shared = tmp_path / "shared"
    flywheel.main(["--home", str(shared), "--base", str(tiny_model_dir), "--set", f"epochs=4 batch_size=16 lr=1e-3 "
                   f"device={TEST_DEVICE}", "--init", "--database", postgres.database("modal_round")])
    monkeypatch.setattr(serve, "HOME", shared)
    with pytest.warns(UserWarning, match="executing locally"):
        assert serve.scheduled_round.local(min_new_pairs=10) is None  # no pairs yet: no round
    home_state.database(shared).add(pairs_of(600, 1))
    with pytest.warns(UserWarning, match="executing locally"):
        row = serve.scheduled_round.local(min_new_pairs=10)
    assert row["decision"] == "promoted" and home_state.current_version(shared)["version"] == "round-001"


def test_a_threshold_or_a_version_decided_elsewhere_reaches_a_running_server(tiny_model_dir, tmp_path):
    """What a round in another process decides (the base threshold, a new version) is served by the
    next poll; a version the home serves but this process has not loaded is a 503 with Retry-After."""
    import shutil
    home = tmp_path / "fw"
    flywheel.main(["--home", str(home), "--base", str(tiny_model_dir), "--init"])
    pair = {"pairs": [{"text1": "t1a t1b", "text2": "t1a t1c"}]}

    def until(condition, seconds=20):
        deadline = time.time() + seconds
        while not condition() and time.time() < deadline:
            time.sleep(0.05)
        return condition()

    with LoopbackServer(serve.make_app(home, None, device=TEST_DEVICE, watch_every=0.1)) as server:
        fresh = httpx.post(server.url + "/v1/duplicates", json=pair).json()["error"]
        assert fresh["code"] == "no_threshold" and "the first round tunes one" in fresh["message"]
        home_state.keep_base_threshold(home, 0.5, 40, 1)  # a first round, refused, tuned it
        assert until(lambda: httpx.post(server.url + "/v1/duplicates", json=pair).status_code == 200)
        home_state.database(home).set_state("served", {"previous": home_state.BASE_POINTER, "current": {
            "version": "round-009", "path": "rounds/round-009", "promoted_at": "now"}})  # its folder is not readable yet
        assert until(lambda: httpx.get(server.url + "/health").json()["home_version"] == "round-009")
        pinned = httpx.post(server.url + "/v1/embeddings", json={"input": ["t1a"], "model": "round-009"})
        assert pinned.status_code == 503 and pinned.headers["retry-after"] and pinned.json()["error"]["code"] == "model_loading"
        assert httpx.get(server.url + "/health").json()["agrees"] is False
        shutil.copytree(tiny_model_dir, home / "rounds" / "round-009")
        assert until(lambda: httpx.get(server.url + "/health").json()["agrees"])
        assert httpx.post(server.url + "/v1/embeddings", json={"input": ["t1a"], "model": "round-009"}).json()["model"] == "round-009"
        assert httpx.post(server.url + "/v1/embeddings", json={"input": ["t1a"], "model": "base"}).json()["model"] == "base"
        metrics = httpx.get(server.url + "/metrics").text
        assert 'embed_ft_version_requests_total{version="round-009"} 1.0' in metrics


def fill_and_free_the_disk(home: Path, fill, free) -> None:
    """A served home whose store's disk fills up under a batch, then has space again: the batch is a
    503 with Retry-After, embeddings are still served, nothing of it is kept, and the next post is stored."""
    db, auth = home_state.database(home), {"authorization": f"Bearer {KEY}"}
    with LoopbackServer(serve.make_app(home, None, device=TEST_DEVICE)) as server:
        accepted = httpx.post(server.url + "/v1/pairs", json={"pairs": pairs_of(20, 1)}, headers=auth).json()["accepted"]
        fill()
        big = [{"text1": f"t1a {'long ' * 200}{i}", "text2": f"t1b {i}", "label": 1} for i in range(50)]
        full = httpx.post(server.url + "/v1/pairs", json={"pairs": big}, headers=auth)
        assert full.status_code == 503 and full.json()["error"]["code"] == "store_unavailable" and full.headers["retry-after"]
        assert httpx.post(server.url + "/v1/embeddings", json={"input": ["t1a"]}).status_code == 200  # still served
        free()
        again = httpx.post(server.url + "/v1/pairs", json={"pairs": big}, headers=auth).json()
        assert again["accepted"] == 50 and db.count() == accepted + 50  # nothing of the refused batch was kept


def test_a_full_disk_under_the_home_is_one_line_and_a_503_and_it_recovers_by_itself(home, monkeypatch, capfd):
    """SQLite's max_page_count makes the database full for real: what a full disk does to a write."""
    monkeypatch.setenv("EMBED_FT_WRITE_KEY", KEY)
    db = home_state.database(home)

    def max_pages(pages: int) -> None:
        with db.lock:
            db.connection.execute(f"PRAGMA max_page_count = {pages}")

    def fill() -> None:
        with db.lock:
            pages = db.connection.execute("PRAGMA page_count").fetchone()[0]
        max_pages(pages + 1)
    fill_and_free_the_disk(home, fill, lambda: max_pages(1073741823))
    err = capfd.readouterr().err
    assert err.count("error: /v1/pairs: the store cannot take the batch") == 1 and "full" in err and "Traceback" not in err


@contextlib.contextmanager
def small_filesystem(folder: Path, megabytes: int):
    """A tmpfs of its own at `folder`, owned by the postgres user: a disk that can fill up for real."""
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small filesystem here (needs root and mount)")
    try:
        shutil.chown(folder, "postgres", "postgres")
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


@contextlib.contextmanager
def database_on(postgres, disk: Path, name: str):
    """A new database of the throwaway cluster whose files are all on `disk` (a tablespace); dropped at the end."""
    import psycopg
    with psycopg.connect(postgres.url(), autocommit=True) as admin:
        admin.execute(f"CREATE TABLESPACE {name} LOCATION '{disk}'")
        admin.execute(f"CREATE DATABASE {name} TABLESPACE {name}")
        try:
            yield postgres.url(name)
        finally:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            admin.execute(f"DROP TABLESPACE IF EXISTS {name}")


def fill(folder: Path) -> None:
    """Write a file into `folder` until its disk is full."""
    with open(folder / "ballast", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def test_a_full_disk_under_the_database_is_one_line_and_a_503_and_it_recovers_by_itself(postgres, tiny_model_dir,
                                                                                        tmp_path, monkeypatch, capfd):
    """PostgreSQL's own disk fills up (the database in a tablespace on a small tmpfs): the server's
    answer is the SQLite one's. WAL stays on the cluster's disk, as it would on a server whose data
    volume fills."""
    monkeypatch.setenv("EMBED_FT_WRITE_KEY", KEY)
    name = f"full_{abs(hash(str(tmp_path)))}"
    with small_filesystem(postgres.folder / name, 32) as disk, database_on(postgres, disk, name) as url:
        home = make_home(tiny_model_dir, tmp_path, "--database", url)
        try:
            fill_and_free_the_disk(home, lambda: fill(disk), (disk / "ballast").unlink)
        finally:
            home_state.database(home).close()  # this process's pool, before its database goes
    err = capfd.readouterr().err
    assert err.count("error: /v1/pairs: the store cannot take the batch") == 1 and "No space left on device" in err
    assert "Traceback" not in err


def test_a_served_version_keeps_no_file_of_its_folder_open(tiny_model_dir):
    """In a process of its own: another test's model, loaded from the same folder in this worker,
    may still be mapped here."""
    script = ("import os, sys; from pathlib import Path; from server import versions\n"
              f"folder = {str(tiny_model_dir)!r}\n"
              f"version = versions.load_version('v', folder, {TEST_DEVICE!r})\n"
              "mapped = Path('/proc/self/maps').read_text()\n"
              "opened = [os.readlink(f'/proc/self/fd/{fd}') for fd in os.listdir('/proc/self/fd') if os.path.exists(f'/proc/self/fd/{fd}')]\n"
              "print(folder in mapped, any(folder in p for p in opened))")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False", "False"], result.stderr[-2000:]


def test_copying_a_served_version_out_of_its_file_starts_no_threads():
    """A parallel copy in the loading thread started OpenMP threads of its own beside the batcher's,
    and every pass the server made ran 10% slower (benchmarks/serve_speed.py --before)."""
    script = ("import os, torch; from server.versions import in_memory; torch.set_num_threads(2)\n"
              "module = torch.nn.Module(); module.register_buffer('w', torch.empty(4_000_000))  # big enough to split\n"
              "before = len(os.listdir('/proc/self/task')); in_memory(module)\n"
              "print(before, len(os.listdir('/proc/self/task')), torch.get_num_threads())")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    before, after, threads = map(int, result.stdout.split())
    assert after == before and threads == 2, result.stderr[-2000:]


def test_the_command_line_names_bad_options(tmp_path, capsys):
    code, err = run_cli(serve.main, ["--home", str(tmp_path)], capsys)
    assert code == 2 and "not a flywheel home" in err
    code, err = run_cli(serve.main, ["--model", str(tmp_path), "--round-every", "1h"], capsys)
    assert code == 2 and "--round-every needs --home" in err
    assert scheduler.parse_period("90") == 90 and scheduler.parse_period("10m") == 600 and scheduler.parse_period("1h") == 3600
    with pytest.raises(scheduler.InputError, match="90s, 10m, 1h"):
        scheduler.parse_period("hourly")
    if not cpu_has_bf16():
        code, err = run_cli(serve.main, ["--model", str(tmp_path), "--precision", "bf16", "--device", "cpu"], capsys)
        assert code == 2 and "no bf16 units" in err


def test_the_scheduler_survives_every_state_of_the_store(home, capsys):
    """Missing, empty, only conflicts, a torn file, a file being written: never a dead scheduler (a
    home made before the database, whose pairs are files)."""
    jsonl.write_json(home / "flywheel.json", {k: v for k, v in jsonl.read_json(home / "flywheel.json").items() if k != "database"})
    rounds = scheduler.RoundScheduler(home, every=0.05, min_new_pairs=10)
    pairs = home / "pairs"
    assert not pairs.exists()
    rounds.tick()                                                # missing: 0 new pairs
    (pairs / "conflicts").mkdir(parents=True)
    rounds.tick()                                                # empty but for conflicts/
    (pairs / "conflicts" / "batch-1.jsonl").write_text('{"text1": "t1a", "text2": "t2a", "label": 1}\n')
    (pairs / ".batch-2.jsonl.123.tmp").write_text('{"text1": "t1a", "text2"')  # being written by the store
    rounds.tick()
    assert rounds.status["failures"] == 0 and rounds.status["rounds"] == 0
    (pairs / "dropped.jsonl").write_text('{"text1": "t1a", "text2": "t2b", "label": 1}\n{"text1": "t3a", "te')  # torn
    metrics = serve_metrics.Metrics(lambda: 0, types.SimpleNamespace(held=[]))
    rounds.metrics = metrics
    rounds.start()
    deadline = time.time() + 10
    while rounds.status["failures"] < 2 and time.time() < deadline:  # it fails, says so, and ticks again
        time.sleep(0.02)
    rounds.stop()
    assert rounds.status["failures"] >= 2  # the first failure did not end the thread
    assert "dropped.jsonl line 2: not valid JSON" in rounds.status["last_error"]
    err = capsys.readouterr().err
    assert "round: the tick failed:" in err and "Traceback" not in err
    assert "embed_ft_round_failures_total" in metrics.render().decode()


def test_pairs_touching_held_out_texts_are_counted_by_split(home, monkeypatch):
    home_state.ledger(home).assign([("t1a held", "t1b held", 1), ("t2a trained", "t2b trained", 0)],
                                   fractions={"validation": 0.0, "test": 0.0, "audit": 0.0})
    home_state.database(home).add_splits([("t3a audited", "audit")])
    monkeypatch.setenv("EMBED_FT_WRITE_KEY", KEY)
    with LoopbackServer(serve.make_app(home, None, device=TEST_DEVICE)) as server:
        body = {"pairs": [{"text1": "T3A  audited", "text2": "t3b new", "label": 1},
                          {"text1": "t2a trained", "text2": "t4a new", "label": 0}]}
        reply = httpx.post(server.url + "/v1/pairs", json=body, headers={"authorization": f"Bearer {KEY}"}).json()
        assert reply["accepted"] == 2 and reply["touching_held_out"] == 1
        text = httpx.get(server.url + "/metrics").text
        assert 'embed_ft_pairs_held_out_total{split="audit"} 1.0' in text
        health = httpx.get(server.url + "/health").json()
        assert health == {"status": "ok", "version": "base", "home_version": "base", "agrees": True}


# Every field of every route that takes a body, holding a lone surrogate: valid JSON ("\ud800"), but
# no UTF-8 form, so no tokenizer can take it. Each is a 400 naming the field, and nothing is logged.
BAD_UNICODE = "\\ud800"
UNENCODABLE = {
    "/v1/embeddings": {"input": '{"input": "X"}', "input[1]": '{"input": ["t1a", "X"]}', "model": '{"input": "t1a", "model": "X"}',
                       "encoding_format": '{"input": "t1a", "encoding_format": "X"}', "user": '{"input": "t1a", "user": "X"}'},
    "/v1/duplicates": {"pairs[0].text1": '{"pairs": [{"text1": "X", "text2": "t1a"}]}',
                       "pairs[0].text2": '{"pairs": [{"text1": "t1a", "text2": "X"}]}',
                       "model": '{"pairs": [{"text1": "t1a", "text2": "t2a"}], "model": "X"}'},
    "/v1/pairs": {f"pairs[0].{field}": '{"pairs": [{"text1": "t1a", "text2": "t2a", "label": 1, "FIELD": "X"}]}'.replace("FIELD", field)
                  for field in ("text1", "text2", "id", "source")} | {"pairs[0].label": '{"pairs": [{"text1": "t1a", "text2": "t2a", "label": "X"}]}'},
    "/v1/pairs/corrections": {f"corrections[0].{field}": '{"corrections": [{"text1": "t1a", "text2": "t2a", "label": 1, '
                              '"by": "ana", "why": "w", "FIELD": "X"}]}'.replace("FIELD", field)
                              for field in ("text1", "text2", "id", "by", "why")},
}


def test_text_that_cannot_be_encoded_is_a_400_naming_the_field_on_every_route(home, monkeypatch, capfd):
    monkeypatch.setenv("EMBED_FT_WRITE_KEY", KEY)
    app = serve.make_app(home, None, device=TEST_DEVICE)
    with_bodies = {r.path for r in app.routes if "POST" in getattr(r, "methods", set())}
    assert with_bodies == set(UNENCODABLE), "a route that takes a body needs its cases here"
    with LoopbackServer(app) as server:
        capfd.readouterr()
        for route, cases in UNENCODABLE.items():
            for field, body in cases.items():
                response = httpx.post(server.url + route, content=body.replace("X", BAD_UNICODE).encode(),
                                      headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"})
                assert response.status_code == 400, (route, field, response.text)
                assert response.json()["error"]["param"] == field and response.json()["error"]["code"] == "invalid_unicode"
        assert httpx.post(server.url + "/v1/embeddings", json={"input": "t1a"}).status_code == 200
    logged = capfd.readouterr()
    assert "Traceback" not in logged.err + logged.out and "error:" not in logged.err


def test_the_server_binds_first_says_when_it_is_ready_and_retrieves_a_model(saved_model, capsys):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, err = run_cli(serve.main, ["--model", str(saved_model), "--port", str(taken.getsockname()[1])], capsys)
    assert code == 2 and err.startswith("error: cannot listen on 127.0.0.1:") and "Traceback" not in err
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--model", str(saved_model), "--port", str(port),
                               "--device", TEST_DEVICE], stdout=subprocess.PIPE, text=True, env=os.environ | {"EMBED_FT_WRITE_KEY": ""})
    try:
        line = server.stdout.readline()
        assert line.startswith(f"serving tiny-96 (96-d, threshold 0.5000) at http://127.0.0.1:{port}/v1;"), line
        assert "write key not set, read key not set; no scheduled rounds" in line
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        assert client.models.retrieve("tiny-96").id == "tiny-96"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("round-009")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_sigterm_mid_load_finishes_every_admitted_request_and_refuses_new_ones(saved_model):
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--model", str(saved_model), "--port", str(port),
                               "--device", TEST_DEVICE], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().startswith("serving tiny-96")
    texts = [" ".join(["t1a t2b why"] * 20)] * 64  # requests that take a moment each
    outcomes = [[] for _ in range(4)]  # each client's, in order

    def client(mine: list):  # bounded: at most 300 requests, until the server is gone
        refused = False
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            for _ in range(300):
                try:
                    mine.append(c.post("/v1/embeddings", json={"input": texts}).status_code)
                    if mine[-1] == 503:  # a refusal is instant: pause, as a client told Retry-After would,
                        refused = True   # so that the 300 tries outlast the drain rather than a busy machine's
                        time.sleep(0.1)
                except httpx.ConnectError:  # nobody listens any more: the server has exited
                    return mine.append("gone")
                except httpx.TransportError as e:  # after a 503: a connection the exiting server closed unread;
                    return mine.append("gone" if refused else f"cut: {e!r}")  # before: a request cut mid-way

    clients = [threading.Thread(target=client, args=(mine,)) for mine in outcomes]
    for c in clients:
        c.start()
    while sum(map(len, outcomes)) < 8:
        time.sleep(0.01)
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=60)
    for c in clients:
        c.join(timeout=60)
    assert server.returncode == 0 and "shutting down: draining" in server.stdout.read()
    for mine in outcomes:  # none cut; once refused, never answered again; then the server was gone
        assert all(o in (200, 503, "gone") for o in mine) and mine[-1] == "gone", mine
        assert 503 not in mine or 200 not in mine[mine.index(503):], mine
    # How many were refused depends on the machine: a client slowed down past the drain's end finds the
    # server gone without a 503 (seen with clients held back 0.5 s). The refusal itself, and its order,
    # is checked without a process or a signal: test_draining_refuses_new_requests_while_admitted_ones_finish.
    assert sum(mine.count(200) for mine in outcomes) >= 8


def test_draining_refuses_new_requests_while_admitted_ones_finish():
    """server.shutdown's Drain and DrainingServer in this process, so that the order holds on any
    machine: a request admitted before the signal gets its answer, one that comes after it is a 503
    with Retry-After, and the server is told to exit only once nothing is in flight."""
    from embed_ft.server.shutdown import Drain, DrainingServer
    import asyncio
    import uvicorn
    release = asyncio.Event()

    async def slow_app(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    drain = Drain(slow_app)
    server = DrainingServer(uvicorn.Config(drain), drain)

    async def request() -> tuple[int, dict]:
        sent = []

        async def send(message):
            sent.append(message)
        await drain({"type": "http"}, None, send)
        return sent[0]["status"], dict(sent[0]["headers"])

    async def scenario():
        admitted = asyncio.create_task(request())
        await asyncio.sleep(0.01)
        assert drain.in_flight == 1
        server.handle_exit(signal.SIGTERM, None)
        status, headers = await asyncio.wait_for(request(), 10)  # not admitted: not held by the slow app
        assert status == 503 and headers[b"retry-after"] == b"1" and headers[b"connection"] == b"close"
        await asyncio.sleep(0.3)
        assert not server.should_exit  # one admitted request still runs
        release.set()
        assert (await admitted)[0] == 200
        for _ in range(100):
            if server.should_exit:
                break
            await asyncio.sleep(0.05)
        assert server.should_exit and drain.in_flight == 0
    asyncio.run(scenario())


def test_a_folder_holding_another_model_than_the_one_promoted_is_refused_never_served(home, tiny_model_dir):
    import torch

    from embed_ft import fingerprint
    from embed_ft.server.versions import HomeWatcher, NotThatModel, Versions, load_pointer
    promoted, other = (Embedder.from_pretrained(str(tiny_model_dir)) for _ in range(2))
    with torch.no_grad():
        other.encoder.embeddings.word_embeddings.weight.add_(0.5)
    promoted.save(home / "rounds" / "round-001")
    versions = Versions.from_home(home, "cpu")
    home_state.switch_current(home, home / "rounds" / "round-001", fingerprint=fingerprint.of(promoted))
    assert load_pointer(home, home_state.current_version(home), "cpu").id == "round-001"
    other.save(home / "rounds" / "round-001")  # a second writer under the same id: the folder now holds another model
    watcher = HomeWatcher(versions, home, device="cpu")
    with pytest.raises(NotThatModel, match="holds another model than the one promoted as round-001"):
        watcher.poll()
    assert versions.current.id == "base"
