"""The model card: README.md in a saved model folder, in the Hugging Face format (YAML front matter,
then what was trained, how well it does, and how to use it), written by train.py after each run.
"""
from __future__ import annotations

from pathlib import Path

from embed_ft import paired
from embed_ft.sources import is_hub_id

TRANSFORMERS_SNIPPET = '''import json, torch, torch.nn.functional as F
from pathlib import Path
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

folder = Path("{folder}")
tokenizer, encoder = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder{remote})
texts = [{prompt}"How do I learn Python?", {prompt}"What is the best way to learn Python?"]
batch = tokenizer(texts, padding=True, truncation=True, max_length={max_length}, return_tensors="pt")
with torch.no_grad():
    hidden = encoder(**batch).last_hidden_state
mask = batch["attention_mask"].unsqueeze(-1).float()
{pooling}
{dense}vectors = F.normalize(vectors, dim=-1)
print(vectors @ vectors.T)'''
# The pooling line of the snippet for the modes plain transformers computes in one line (right padding).
POOLING_LINES = {
    "mean": "vectors = (hidden * mask).sum(1) / mask.sum(1)                      # mean pooling",
    "cls": "vectors = hidden[:, 0]                                              # CLS pooling",
    "max": "vectors = hidden.masked_fill(mask == 0, float('-inf')).max(1).values  # max pooling",
    "lasttoken": "vectors = hidden[torch.arange(len(hidden)), batch['attention_mask'].sum(1) - 1]  # last token"}


def write(directory: Path, metrics: dict) -> None:
    (Path(directory) / "README.md").write_text(render(metrics, Path(directory)))


def render(metrics: dict, directory: Path) -> str:
    config, training = metrics["config"], metrics["training"]
    decision = metrics["fine_tuned"]["val"]
    base = config["model"] if is_hub_id(config["model"]) else None
    dataset = config["data"] if is_hub_id(config["data"]) else None
    tags = ["sentence-transformers", "sentence-similarity", "feature-extraction", "embed-ft"]
    tags += ["matryoshka"] if config.get("matryoshka_dims") else []
    front = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity"]
    front += [f"base_model: {base}"] if base else []
    front += ["tags:"] + [f"- {t}" for t in tags]
    front += ["datasets:", f"- {dataset}"] if dataset else []
    front += ["---", ""]
    constraint = decision.get("constraint")
    rule = " under " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in constraint.items()) if constraint else ""
    folder = metrics.get("model") or {"pooling": "mean", "include_prompt": True, "published_dense": [], "normalize": True,
                                      "projection": config["dense_out_features"] or None, "prompts": {}}
    prompt = folder["prompts"].get(folder.get("default_prompt_name") or "", "")
    # a run before "kept" was recorded kept the best epoch's weights
    kept = training.get("kept") or f"the weights of epoch {training['best_epoch'] or training['epochs']}, the best on validation"
    lines = front + [
        f"# {directory.resolve().name}", "",
        f"A sentence embedding model fine-tuned with embed-ft from `{config['model']}` on "
        f"{training.get('train_pairs', training['pairs']):,} distinct labelled pairs of `{config['data']}` "
        f"({training['epochs']} epoch(s), {training['pairs']:,} pairs seen; kept: {kept}). " + pipeline(folder), "",
        f"Training: objective `{config.get('objective', 'classification')}` (epochs chosen by validation "
        f"{'MRR' if config.get('objective') == 'retrieval' else 'error'}), loss "
        f"`{'contrastive' if config.get('objective') == 'retrieval' else config['loss']}`, learning rate {config['lr']}, batch {config['batch_size']}, max length "
        f"{config['max_length']} tokens, precision {config['resolved_precision']}, seed {config['seed']}; "
        f"stopped: {training['stopped_by']}."
        + (f" The weights are {config['merge']} x the fine-tuned ones + {1 - config['merge']:g} x the starting "
           f"model's (--merge)." if config.get("merge", 1.0) < 1 else ""), "",
        "## Results", "",
        "Duplicate classification: a pair is a duplicate when its cosine is above a threshold tuned on the "
        "validation pairs (so validation numbers are optimistic) and applied unchanged to the test pairs.", "",
        "| model | val error | test error | test F1 | test AP | test ROC AUC |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ] + [row(name, metrics[key]) for name, key in [("zero-shot (as published)", "zero_shot"), ("fine-tuned", "fine_tuned")] if key in metrics] + [
        "", f"Decision threshold: cosine > {decision['threshold']:.4f} (best accuracy on validation{rule}); stored in "
        "`embedder.json`.", "",
        *verdict_lines(metrics),
        "Retrieval: each test text that has a duplicate searches every other text of the split.", "",
        "| model | recall@1 | recall@10 | MRR |", "| --- | ---: | ---: | ---: |",
    ] + [retrieval_row(name, metrics[key]) for name, key in [("zero-shot (as published)", "zero_shot"), ("fine-tuned", "fine_tuned")]
         if "retrieval" in metrics.get(key, {})] + [
        "",
        "## Use it", "", "embed-ft (`Embedder.load`; `is_duplicate` applies the stored threshold):", "", "```python",
        "from embed_ft.model import Embedder", f'embedder = Embedder.load("{directory.name}")',
        'print(embedder.is_duplicate(["How do I learn Python?"], ["What is the best way to learn Python?"]))',
        "```", "", "sentence-transformers (3.x to 6.x):", "", "```python",
        "from sentence_transformers import SentenceTransformer",
        f'model = SentenceTransformer("{directory.name}"' + (", trust_remote_code=True)" if config["trust_remote_code"] else ")"),
        'vectors = model.encode(["How do I learn Python?", "What is the best way to learn Python?"])',
        "print(vectors @ vectors.T)", "```", "",
        "Text Embeddings Inference (TEI 1.8.3 or later applies the Dense projection of a local folder):", "", "```bash",
        f"docker run --gpus all -p 8080:80 -v $PWD/{directory.name}:/model ghcr.io/huggingface/text-embeddings-inference:1.8 "
        "--model-id /model",
        "curl 127.0.0.1:8080/embed -X POST -H 'Content-Type: application/json' -d '{\"inputs\": [\"How do I learn Python?\"]}'",
        "```", "", "Plain transformers:", "", "```python",
        transformers_snippet(folder, directory.name, config, prompt), "```", "",
        "## Upload", "", "```bash", f"hf upload YOUR-NAME/{directory.resolve().name} {directory.name}", "```", ""]
    return "\n".join(lines)


def pipeline(folder: dict) -> str:
    """What the folder computes, in words: the published pooling and layers, ours, the prompts."""
    origin = "as published" if folder.get("published_layout", True) else "(the base has no sentence-transformers modules)"
    steps = [f"{folder['pooling']} pooling {origin}" + ("" if folder["include_prompt"] else " (prompt tokens left out)")]
    steps += [f"{len(folder['published_dense'])} published Dense layer(s)"] if folder["published_dense"] else []
    steps += [f"a linear projection of ours to {folder['projection']} dimensions" if folder["projection"] else "no projection of ours"]
    steps += ["unit-length embeddings: compare them by cosine (a dot product)." if folder["normalize"] else
              "embeddings not normalised (as published): compare them by cosine."]
    prompts = {name: text for name, text in folder["prompts"].items() if text}
    if not prompts:
        return ", ".join(steps) + " No prompts."
    default = folder.get("default_prompt_name")
    return (", ".join(steps) + " Prompts (config_sentence_transformers.json): "
            + ", ".join(f"`{name}`: `{text!r}`" for name, text in prompts.items())
            + (f"; every text takes `{default}` unless another is asked for (sentence-transformers' "
               "`encode_query` and `encode_document` take the query and document prompts)." if default else
               "; texts take none unless one is asked for."))


def transformers_snippet(folder: dict, name: str, config: dict, prompt: str) -> str:
    """The plain-transformers lines that give this folder's vectors, where one line can pool it."""
    if folder["pooling"] not in POOLING_LINES or folder["published_dense"] or not folder["include_prompt"]:
        return (f"# {folder['pooling']} pooling" + (" without the prompt's tokens" if not folder["include_prompt"] else "")
                + (" and published Dense layers" if folder["published_dense"] else "")
                + ": use sentence-transformers (above), which reads the folder's modules.json")
    dense = ('vectors = vectors @ load_file(folder / "2_Dense/model.safetensors")["linear.weight"].T   # projection\n'
             if folder["projection"] else "")
    snippet = TRANSFORMERS_SNIPPET.format(folder=name, max_length=config["max_length"], dense=dense,
                                          pooling=POOLING_LINES[folder["pooling"]], prompt=f"{prompt!r} + " if prompt else "",
                                          remote=", trust_remote_code=True" if config["trust_remote_code"] else "")
    return snippet if folder["normalize"] else snippet.replace("vectors = F.normalize(vectors, dim=-1)\n", "")


def verdict_lines(metrics: dict) -> list[str]:
    """The paired test of fine-tuned against the model as published, in words (train.py's verdict)."""
    if "verdict" not in metrics:
        return []
    pairs, ranks = metrics["verdict"]["pairs"], metrics["verdict"]["retrieval"]
    test = (f"{pairs['n']:,} test pairs in {pairs['groups']:,} groups of pairs that share texts (a sign-flip test over "
            "groups, exact, one-sided)" if "groups" in pairs else f"{pairs['n']:,} test pairs (McNemar's exact test, one-sided)")
    return [f"Against the model as published, on the same {test}: "
            f"**{pairs['verdict']}** ({pairs['only_a_right']} pairs only the fine-tuned model got right, "
            f"{pairs['only_b_right']} only the published one, p = {paired.p_of_verdict(pairs):.2g}). On retrieval (sign test "
            f"over {ranks['n']:,} queries): **{ranks['verdict']}** (p = {paired.p_of_verdict(ranks):.2g}).", ""]


def retrieval_row(name: str, result: dict) -> str:
    test = result["retrieval"]["test"]
    return f"| {name} | {test['recall@1']:.4f} | {test['recall@10']:.4f} | {test['mrr']:.4f} |"


def row(name: str, result: dict) -> str:
    val, test = result["val"], result["test"]
    ap, auc = (f"{test[k]:.4f}" if test[k] is not None else "-" for k in ("average_precision", "roc_auc"))
    return f"| {name} | {val['error_rate']:.2%} | {test['error_rate']:.2%} | {test['f1']:.4f} | {ap} | {auc} |"


AUDIT_HEADING = "## Audit by the flywheel"


def add_audit(directory: Path, row: dict) -> None:
    """The latest flywheel audit of a promoted model, as a section of its card (replaced each round):
    its error on pairs that no decision saw, beside the error the decisions saw."""
    readme = Path(directory) / "README.md"
    text = readme.read_text() if readme.is_file() else f"# {Path(directory).name}\n"
    text = text.split("\n" + AUDIT_HEADING)[0].rstrip("\n") + "\n"
    audit, seen = row["audit"], row["seen"]
    lines = ["", AUDIT_HEADING, "",
             f"Round {row['round']} ({row['time']}): error **{audit['error']:.2%}** (95% interval {audit['interval'][0]:.1%} "
             f"to {audit['interval'][1]:.1%}, counted by groups of pairs that share texts) on {audit['n']:,} audit pairs"
             + (f" in {audit['groups']:,} groups" if "groups" in audit else "") + " of the home's own traffic, which no promotion "
             f"decision has seen; the decisions saw {seen['error']:.2%} on {seen['n']:,} test pairs. Width "
             f"{row['width']}." + (f" Note: {row['note']}" if row.get("note") else ""), ""]
    readme.write_text(text + "\n".join(lines))
