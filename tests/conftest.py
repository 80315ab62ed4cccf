"""Shared fixtures: a tiny random BERT encoder written to disk, synthetic pairs, the real shared data."""
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The shared models and data: ../shared beside the checkout, or wherever EMBED_FT_SHARED points.
SHARED = Path(os.environ.get("EMBED_FT_SHARED", ROOT.parent / "shared"))
# The device every test that trains or evaluates runs on: cpu here and in CI; EMBED_FT_TEST_DEVICE=cuda
# (the GPU check) runs them on a GPU. There, deterministic kernels keep "same seed, same weights"
# true; where a GPU's bf16 needs another tolerance than a CPU's fp32, the test says so.
TEST_DEVICE = os.environ.get("EMBED_FT_TEST_DEVICE", "cpu")
ON_GPU = TEST_DEVICE.startswith("cuda")
# The suite runs two tests at a time (pytest-xdist, `-n 2` in pyproject.toml), each on one thread,
# and so does every process a test starts, unless it picks its threads itself (the server does): the
# tests' models are tiny, and two tests on a core each finish sooner than one test on two cores
# whose threads wait for each other (docs/testing.md). Set before torch is imported, so that it counts.
os.environ.setdefault("OMP_NUM_THREADS", "1")
if ON_GPU:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts: cuBLAS's deterministic mode
    import torch
    torch.use_deterministic_algorithms(True)

# Synthetic "topics": two texts are duplicates when they are about the same topic.
TOPICS = [[f"t{i}a", f"t{i}b", f"t{i}c"] for i in range(24)]
FILLER = ["the", "a", "of", "how", "what", "is", "do", "i", "can", "why", "best", "way"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT with random weights and a WordPiece vocabulary of our synthetic words."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + FILLER + [w for t in TOPICS for w in t]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast.from_pretrained(directory).save_pretrained(directory)  # reads vocab.txt
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(directory)
    return directory


def synthetic_pairs(n: int, seed: int) -> list[tuple[str, str, int]]:
    """Half duplicates (same topic, different filler), half not (different topics)."""
    rng = random.Random(seed)

    def text(topic: int) -> str:
        words = rng.sample(TOPICS[topic], 2) + rng.sample(FILLER, 3)
        rng.shuffle(words)
        return " ".join(words)

    pairs = []
    for i in range(n):
        t = rng.randrange(len(TOPICS))
        other = t if i % 2 == 0 else (t + rng.randrange(1, len(TOPICS))) % len(TOPICS)
        pairs.append((text(t), text(other), int(other == t)))
    return pairs


def corpus_texts(n: int, seed: int = 0) -> list[str]:
    """n distinct texts of a corpus (a topic's words, filler, a number): what the corpus tests embed."""
    rng = random.Random(seed)
    return [" ".join(rng.sample(TOPICS[rng.randrange(len(TOPICS))], 2) + rng.sample(FILLER, 4) + [str(i)]) for i in range(n)]


def write_table(path: Path, rows, header=("id", "text")) -> Path:
    """A corpus table of (id, text) rows, tab-separated."""
    path.write_text("\t".join(header) + "\n" + "".join(f"{i}\t{t}\n" for i, t in rows))
    return path


def write_tsv(path: Path, pairs, header=("question1", "question2", "is_duplicate")) -> Path:
    path.write_text("\t".join(header) + "\n" + "".join(f"{a}\t{b}\t{y}\n" for a, b, y in pairs))
    return path


@pytest.fixture
def pair_files(tmp_path) -> dict[str, Path]:
    """Train/val/test TSV files of synthetic pairs, disjoint seeds."""
    return {name: write_tsv(tmp_path / f"{name}.tsv", synthetic_pairs(n, seed))
            for name, n, seed in [("train", 192, 1), ("val", 96, 2), ("test", 96, 3)]}


needs_shared = pytest.mark.skipif(not (SHARED / "data" / "quora" / "splits").is_dir(),
                                  reason="../shared (real models and Quora data) is not beside the checkout")


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server for the session (tests that claim a database guarantee run on it)."""
    import throwaway_postgres
    why = throwaway_postgres.available()
    if why:
        pytest.skip(why)
    with throwaway_postgres.ThrowawayPostgres() as server:
        yield server


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 from ../shared/fetch-models, cached outside the repository."""
    cache = Path(os.environ.get("EMBED_FT_MODELS", Path.home() / ".cache" / "embed-ft" / "models"))
    subprocess.run([str(SHARED / "fetch-models"), str(cache), "minilm-l6"], check=True,
                   env=os.environ | {"PYTHON": sys.executable})
    return cache / "sentence-transformers-all-MiniLM-L6-v2"


def st_modules():
    """sentence-transformers' module classes (Transformer, Pooling, Dense, Normalize): from their home
    since version 6, where `sentence_transformers.models` warns that it goes; before 6, from there."""
    try:
        from sentence_transformers.sentence_transformer import modules
    except ImportError:
        from sentence_transformers import models as modules
    return modules


def tiny_config(model_dir, files: dict, out, **overrides):
    """A training run of the tiny BERT on synthetic pair files: fast, and it learns."""
    from embed_ft.options import Config
    settings = dict(model=str(model_dir), data=str(files["train"]), val=str(files["val"]), test=str(files["test"]),
                    dense_out_features=16, epochs=3, batch_size=16, lr=1e-3, device=TEST_DEVICE, out=str(out))
    return Config(**settings | overrides)


def fault_at_step(monkeypatch, step: int, fault) -> None:
    """Inject a fault into training: at the `step`-th loss computed, `fault(loss)` runs (it may send a
    signal) and its return value is the loss the step goes on with."""
    from embed_ft import losses
    calls = []

    class Faulty(losses.OnlineContrastiveLoss):
        def forward(self, a, b, labels):
            calls.append(1)
            loss = super().forward(a, b, labels)
            return fault(loss) if len(calls) == step else loss

    monkeypatch.setitem(losses.BY_NAME, "ocl", lambda config: Faulty(config.margin))


def signal_at_step(monkeypatch, step: int, *signals: int) -> None:
    """A real signal (SIGTERM unless given) to this process while the loss of `step` is computed."""
    def send(loss):
        for signum in signals or (signal.SIGTERM,):
            os.kill(os.getpid(), signum)
        return loss
    fault_at_step(monkeypatch, step, send)


def run_cli(main, argv: list[str], capsys) -> tuple[int, str]:
    """An entry point run as its `if __name__ == "__main__"` does: (exit code, what it printed on stderr)."""
    from embed_ft import errors
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        errors.run(main, argv)
    return exit_info.value.code, capsys.readouterr().err


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackServer:
    """A real uvicorn server for `app` on 127.0.0.1 and a free port, in a thread of this process."""

    def __init__(self, app):
        import uvicorn
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))

    def __enter__(self):
        import threading
        import time
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def local_modules_imported(*names: str) -> set[str]:
    """The project's modules (root files, and the packages server/ and state/ by their name) that these
    import, directly or through each other, themselves included: what a Modal image must carry (with
    embed_ft/, the name they are imported by)."""
    import ast
    project = {p.stem for p in ROOT.glob("*.py")} | {p.parent.name for p in ROOT.glob("*/__init__.py")}

    def imports(name: str) -> set[str]:
        files = [ROOT / f"{name}.py"] if (ROOT / f"{name}.py").is_file() else sorted((ROOT / name).glob("*.py"))
        found = set()
        for tree in (ast.parse(f.read_text()) for f in files):  # `from embed_ft import x`, `from embed_ft.x import ...`
            for node in (n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level):
                if node.module == "embed_ft":
                    found |= {a.name for a in node.names}
                elif node.module.startswith("embed_ft."):
                    found.add(node.module.split(".")[1])
        return found & project

    needed, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += imports(name)
    return needed
