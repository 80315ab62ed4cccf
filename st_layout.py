"""A sentence-transformers folder, read and written: the modules it chains, how it pools, its prompts,
its Dense layers and the transformer it holds.

    layout = published_layout("BAAI/bge-base-en-v1.5")   # a hub name or a folder: what it was published as
    layout.pooling, layout.prompts                        # "cls", {"query": "Represent this sentence ..."}
    write(directory, layout, hidden_size, dense)          # the same layout, for a fine-tuned model

A published embedding model is more than its transformer: `modules.json` chains a Transformer, a
Pooling (`1_Pooling/config.json`: CLS, mean, ...; `include_prompt`), maybe Dense layers and a
Normalize, and `config_sentence_transformers.json` names the prompts its texts take (`prompts`,
`default_prompt_name`). sentence-transformers, Infinity and text-embeddings-inference read these
files; so does `model.Embedder`, so that a model gives here the vectors it was published to give.
A plain transformers model without them is pooled as sentence-transformers pools it: by the mean.
Weights are read from safetensors (a Dense layer's) or by transformers (the encoder's); a bad folder
or name is one line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel, AutoTokenizer

from embed_ft.errors import InputError, first_line
from embed_ft.jsonl import write_json
from embed_ft.pooling import MODES
from embed_ft.sources import model_kind

IDENTITY = "torch.nn.modules.linear.Identity"
# The long-standing module names: every sentence-transformers version from 2 to 6 and TEI read them.
MODULE_TYPES = {kind: f"sentence_transformers.models.{kind}" for kind in ("Transformer", "Pooling", "Dense", "Normalize")}
SETTINGS_FILE = "config_sentence_transformers.json"
# Pooling configs of sentence-transformers 2 to 5 (and TEI) switch each mode on or off by these keys.
LEGACY_MODE_KEYS = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens", "mean": "pooling_mode_mean_tokens",
                    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
                    "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "tokenizer.model")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# sentence-transformers' encode_query / encode_document: the prompt names each one looks for.
ROLE_PROMPTS = {"query": ("query",), "document": ("document", "passage", "corpus")}


@dataclass
class Layout:
    pooling: str = "mean"
    include_prompt: bool = True
    normalize: bool = True
    transformer: str = ""                                   # the Transformer module's folder ("" = the root)
    dense: list[str] = field(default_factory=list)          # Dense modules' folders, in order
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    max_seq_length: int | None = None
    do_lower_case: bool = False
    published: bool = True                                  # False: no sentence-transformers files

    def prompt_for(self, role: str = "default") -> str:
        """The prompt a text takes: the default prompt's; for "query" and "document" the prompt named
        for that role where the model names one (as sentence-transformers' encode_query and
        encode_document choose), else the default's; for a prompt's own name, that prompt. "" for none."""
        for name in ROLE_PROMPTS.get(role, () if role == "default" else (role,)):
            if name in self.prompts:
                return self.prompts[name]
        return self.prompts.get(self.default_prompt_name, "") if self.default_prompt_name else ""

    def prompt_chosen(self, role: str, choice: str | None) -> str:
        """The prompt a role's texts take (`prompt_for`), or the user's choice: a prompt the model
        names, or "none" for no prompt (`--query-prompt`, `--document-prompt`)."""
        if choice is None:
            return self.prompt_for(role)
        if choice == "none":
            return ""
        if choice not in self.prompts:
            raise InputError(f"the model names no prompt {choice!r}; it names {', '.join(map(repr, self.prompts)) or 'none'}")
        return self.prompts[choice]

    def describe(self) -> str:
        """The pipeline in words, for a run's log and the model card."""
        steps = [f"{self.pooling} pooling" + ("" if self.include_prompt else " (prompt tokens excluded)")]
        steps += [f"{len(self.dense)} published Dense layer(s)"] if self.dense else []
        return ", ".join(steps)


def published_layout(name_or_path: str | Path) -> tuple[Layout, Path | None]:
    """The layout a hub name or a folder was published with, and the folder its files are in (the
    hub's download cache for a name); a model without sentence-transformers files gets the default."""
    root = Path(name_or_path) if model_kind(str(name_or_path)) != "hub" else hub_files(str(name_or_path))
    if root is None or not (root / "modules.json").is_file():
        return Layout(published=False), root
    return read(root), root


def read(root: Path) -> Layout:
    """A folder's modules.json and the configs it points to. Only a Transformer, a Pooling, Dense
    layers and a Normalize, in that order, are read; anything else is named and refused."""
    layout, kinds = Layout(normalize=False), []
    for module in json.loads((root / "modules.json").read_text()):
        kind = module["type"].rsplit(".", 1)[-1]
        if kind not in MODULE_TYPES:
            raise InputError(f"{root}: module {module['type']} is not supported "
                             "(only a Transformer, a Pooling, Dense layers and a Normalize)")
        kinds.append(kind)
        if kind == "Transformer":
            layout.transformer = module["path"]
        elif kind == "Pooling":
            layout.pooling, layout.include_prompt = read_pooling(root / module["path"] / "config.json")
        elif kind == "Dense":
            layout.dense.append(module["path"])
        else:
            layout.normalize = True
    expected = ["Transformer", "Pooling"] + ["Dense"] * len(layout.dense) + ["Normalize"] * layout.normalize
    if kinds != expected:
        raise InputError(f"{root}: expected a Transformer, a Pooling, Dense layers and a Normalize in that order, "
                         f"found {kinds}")
    settings = read_json(root / SETTINGS_FILE)
    layout.prompts = settings.get("prompts") or {}
    layout.default_prompt_name = settings.get("default_prompt_name") or None
    if layout.default_prompt_name and layout.default_prompt_name not in layout.prompts:
        raise InputError(f"{root / SETTINGS_FILE}: default_prompt_name '{layout.default_prompt_name}' is not one of "
                         f"its prompts ({', '.join(layout.prompts) or 'none'})")
    bert = read_json(root / layout.transformer / "sentence_bert_config.json")
    layout.max_seq_length, layout.do_lower_case = bert.get("max_seq_length"), bool(bert.get("do_lower_case"))
    return layout


def read_pooling(path: Path) -> tuple[str, bool]:
    """(mode, include_prompt) from a Pooling config: sentence-transformers 6 names the mode, earlier
    versions switch each one on or off. One mode only (a concatenation of modes is refused)."""
    config = read_json(path)
    if "pooling_mode" in config:
        modes = [config["pooling_mode"]] if isinstance(config["pooling_mode"], str) else list(config["pooling_mode"])
    else:
        modes = [mode for mode, key in LEGACY_MODE_KEYS.items() if config.get(key)] or ["mean"]
    if len(modes) != 1 or modes[0] not in MODES:
        raise InputError(f"{path}: pooling {modes} is not supported (one of {', '.join(MODES)})")
    return modes[0], bool(config.get("include_prompt", True))


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not JSON ({first_line(e)}): fetch or copy it again") from None


def hub_files(name: str) -> Path | None:
    """Download a hub model's sentence-transformers files (JSON, and Dense weights) into the hub's
    cache and return the snapshot folder that holds them; None when it has no modules.json."""
    from huggingface_hub import _CACHED_NO_EXIST, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    def fetch(filename: str) -> Path | None:
        try:
            return Path(hf_hub_download(name, filename))
        except RemoteEntryNotFoundError:  # the hub says the model has no such file
            return None
        except Exception as e:
            if isinstance(e, LocalEntryNotFoundError) and try_to_load_from_cache(name, filename) is _CACHED_NO_EXIST:
                return None  # offline, and the cache remembers that the file does not exist
            # Offline with nothing cached, or no such model: how it pools cannot be known, so no guess.
            raise InputError(f"could not load model '{name}': not a local folder, and the Hugging Face hub has no such "
                             f"model or cannot be reached (offline?): {first_line(e)}") from e

    modules = fetch("modules.json")
    if modules is None:
        return None
    fetch(SETTINGS_FILE)
    for module in json.loads(modules.read_text()):
        prefix = f"{module['path']}/" if module["path"] else ""
        kind = module["type"].rsplit(".", 1)[-1]
        names = {"Transformer": ["sentence_bert_config.json"], "Pooling": ["config.json"],
                 "Dense": ["config.json", "model.safetensors"]}.get(kind, [])
        for filename in names:
            fetch(prefix + filename)
    return modules.parent


def write(directory: Path, layout: Layout, hidden_size: int, dense: list[dict], max_length: int) -> list[Path]:
    """The sentence-transformers files of `layout` in `directory`, whose root holds the transformer
    (save_pretrained's files): modules.json, the pooling, each Dense layer's config, Normalize, the
    prompts. Returns the Dense layers' folders, for their weights. By hand: sentence-transformers
    6's own save writes module names and drops settings that older versions and TEI need."""
    kinds = ["Transformer", "Pooling"] + ["Dense"] * len(dense) + ["Normalize"] * layout.normalize
    paths = ["" if kind == "Transformer" else f"{i}_{kind}" for i, kind in enumerate(kinds)]
    write_json(directory / "modules.json", [{"idx": i, "name": str(i), "path": path, "type": MODULE_TYPES[kind]}
                                            for i, (kind, path) in enumerate(zip(kinds, paths))])
    write_json(directory / "sentence_bert_config.json", {"max_seq_length": max_length, "do_lower_case": layout.do_lower_case})
    write_json(directory / paths[1] / "config.json", {"word_embedding_dimension": hidden_size}
               | {key: mode == layout.pooling for mode, key in LEGACY_MODE_KEYS.items()}
               | {"include_prompt": layout.include_prompt})
    folders = [directory / path for path in paths[2:2 + len(dense)]]
    for folder, config in zip(folders, dense):
        write_json(folder / "config.json", config)
    if layout.normalize:
        (directory / paths[-1]).mkdir(exist_ok=True)
    write_json(directory / SETTINGS_FILE, {"prompts": layout.prompts, "default_prompt_name": layout.default_prompt_name,
                                           "similarity_fn_name": "cosine"})
    return folders


# ------------------------------------------------------------------------------- the weights

class Dense(nn.Module):
    """sentence-transformers' Dense module, as a model was published with it: a linear layer, then
    an activation of torch.nn (sentence-transformers applies Tanh where the config names none)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "torch.nn.modules.activation.Tanh"):
        super().__init__()
        module, _, name = activation.rpartition(".")
        if not module.startswith("torch.nn") or not isinstance(getattr(nn, name, None), type):
            raise InputError(f"Dense activation {activation} is not supported (only torch.nn's own)")
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.activation, self.activation_name = getattr(nn, name)(), activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.linear(x))

    def config(self) -> dict:
        return {"in_features": self.linear.in_features, "out_features": self.linear.out_features,
                "bias": self.linear.bias is not None, "activation_function": self.activation_name}


def load_encoder(name_or_path: str | Path, trust_remote_code: bool, safetensors_only: bool = False, subfolder: str = ""):
    """Tokenizer and AutoModel (fp32 weights, whatever the checkpoint's dtype), with PyTorch's fused
    SDPA attention where the architecture supports it; `subfolder`: a hub model's Transformer module
    in a folder of its own. A bad folder or name is one line."""
    check_model_folder(name_or_path)
    kwargs = dict(trust_remote_code=trust_remote_code, dtype=torch.float32,
                  use_safetensors=True if safetensors_only else None, **({"subfolder": subfolder} if subfolder else {}))
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                                  **({"subfolder": subfolder} if subfolder else {}))
        try:
            encoder = AutoModel.from_pretrained(name_or_path, attn_implementation="sdpa", **kwargs)
        except (ValueError, ImportError):  # this architecture has no SDPA path: use its own attention
            encoder = AutoModel.from_pretrained(name_or_path, **kwargs)
    except OSError as e:  # unknown name, no network, unreadable files
        if Path(name_or_path).is_dir():
            raise InputError(f"could not load the model in {name_or_path}: {first_line(e)}") from e
        raise InputError(f"could not load model '{name_or_path}': not a local folder, and the Hugging Face hub "
                         f"has no such model or cannot be reached (offline?): {first_line(e)}") from e
    except Exception as e:  # weights that do not read: safetensors' or torch's own error
        if "trust_remote_code" in str(e) or "custom code" in str(e):
            raise InputError(f"{name_or_path} runs its own model code (auto_map in its config.json): pass "
                             "--trust-remote-code if you trust that code") from e
        if not Path(name_or_path).is_dir():
            raise
        raise damaged_weights(Path(name_or_path), e) from e
    return tokenizer, encoder


def damaged_weights(folder: Path, error: Exception) -> InputError:
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), folder)
    return InputError(f"{weights} is damaged ({first_line(error)}): fetch or copy it again (a download that stopped?)")


def check_model_folder(name: str | Path) -> None:
    """A local model folder needs a config, a tokenizer and weights; say which is missing."""
    if model_kind(str(name)) == "hub":
        return
    path = Path(name)
    if not path.is_dir():
        raise InputError(f"model folder not found: {path}")
    for what, names in [("config.json", ("config.json",)), ("tokenizer", TOKENIZER_FILES), ("weights", WEIGHT_FILES)]:
        if not any((path / name).is_file() for name in names):
            raise InputError(f"{path} has no {what} ({', '.join(names)}); copy it from the base model's folder")


def read_dense(directory: Path) -> Dense:
    """A sentence-transformers Dense folder: its config and its safetensors weights."""
    config = read_json(directory / "config.json")
    if not (directory / "model.safetensors").is_file():
        raise InputError(f"{directory} has no model.safetensors (pickled weights are not read)")
    layer = Dense(config["in_features"], config["out_features"], config.get("bias", True),
                  config.get("activation_function", "torch.nn.modules.activation.Tanh"))
    try:
        weights = load_file(directory / "model.safetensors")
    except Exception as e:  # SafetensorError: cut short or overwritten
        raise damaged_weights(directory, e) from e
    layer.linear.load_state_dict({k.removeprefix("linear."): v for k, v in weights.items()})
    return layer


def as_projection(layer: Dense, directory: Path) -> nn.Linear:
    """The last Dense of a folder we saved: our projection, bias-free and linear."""
    if layer.linear.bias is not None or layer.activation_name != IDENTITY:
        raise InputError(f"{directory}: our projection is a bias-free Dense with activation {IDENTITY}; "
                         f"found bias {layer.linear.bias is not None}, activation {layer.activation_name}")
    return layer.linear
