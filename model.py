"""An embedding model: a Hugging Face encoder, masked mean pooling, an optional linear projection
to `dense_out_features`, and L2 normalisation, so that a dot product of two embeddings is their
cosine similarity.

    embedder = Embedder.from_pretrained("BAAI/bge-base-en-v1.5", dense_out_features=256)
    vectors = embedder.encode(["How do I learn Python?", "What is the best way to learn Python?"])
    embedder.save("out")                      # and later: Embedder.load("out")

`save` writes the sentence-transformers layout (Transformer, mean Pooling, Dense, Normalize), so the
folder also loads, unchanged, in sentence-transformers, text-embeddings-inference and (with a few
lines) plain transformers. `load` reads such folders, ours or anyone's, when the architecture is
ours. The decision threshold tuned on validation travels in the folder too (`embedder.json`).
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from errors import InputError, first_line
from jsonl import write_json
from packing import mean_by_text, pack
from sources import model_kind

CONFIG_FILE = "embedder.json"  # ours: trust_remote_code and the decision (threshold, metrics)
IDENTITY = "torch.nn.modules.linear.Identity"
# The long-standing module names: every sentence-transformers version from 2 to 6 and TEI read them.
MODULE_TYPES = {kind: f"sentence_transformers.models.{kind}" for kind in ("Transformer", "Pooling", "Dense", "Normalize")}
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "tokenizer.model")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class Embedder(nn.Module):
    def __init__(self, encoder: nn.Module, tokenizer, dense_out_features: int | None = None,
                 max_length: int = 256, trust_remote_code: bool = False, decision: dict | None = None):
        super().__init__()
        self.encoder, self.tokenizer = encoder, tokenizer
        self.max_length = max_length
        self.trust_remote_code = trust_remote_code
        self.decision = decision or {}  # {"threshold": ..., "constraint": ..., "val": {...}, "test": {...}}
        self.projection = None
        self.packing: bool | None = None  # whether encode_ids packs texts (packs(), checked at first use)
        if dense_out_features:
            self.add_projection(dense_out_features)

    def add_projection(self, out_features: int) -> None:
        # No bias (it would shift every embedding) and orthogonal weights: at the same width this is a
        # rotation, which leaves every cosine exactly as the pretrained model had it; at a smaller
        # width it is a random orthonormal projection, which keeps cosines approximately
        # (Johnson-Lindenstrauss). A default (uniform) init scrambles the geometry at step 0.
        self.projection = nn.Linear(self.encoder.config.hidden_size, out_features, bias=False)
        nn.init.orthogonal_(self.projection.weight)

    @property
    def dim(self) -> int:
        return self.projection.out_features if self.projection else self.encoder.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, name_or_path: str, dense_out_features: int | None = None,
                        max_length: int = 256, trust_remote_code: bool = False) -> "Embedder":
        """A pretrained encoder from the hub or a local folder, with our mean pooling and a fresh
        projection if asked (whatever pooling the model was published with)."""
        tokenizer, encoder = load_encoder(name_or_path, trust_remote_code)
        max_length = min(max_length, tokenizer.model_max_length,
                         getattr(encoder.config, "max_position_embeddings", max_length))
        return cls(encoder, tokenizer, dense_out_features, max_length, trust_remote_code)

    @classmethod
    def load(cls, directory: str | Path) -> "Embedder":
        """A sentence-transformers folder: ours, or anyone's with a Transformer, mean Pooling, an
        optional bias-free Dense with identity activation, and Normalize. Anything else is refused.
        Only safetensors and JSON are read: nothing is unpickled."""
        directory = Path(directory)
        modules = read_modules(directory)
        extras = json.loads((directory / CONFIG_FILE).read_text()) if (directory / CONFIG_FILE).is_file() else {}
        transformer = directory / modules["Transformer"]
        tokenizer, encoder = load_encoder(transformer, extras.get("trust_remote_code", False), safetensors_only=True)
        bert_config = transformer / "sentence_bert_config.json"
        max_length = json.loads(bert_config.read_text()).get("max_seq_length") if bert_config.is_file() else None
        embedder = cls(encoder, tokenizer, None, max_length or tokenizer.model_max_length,
                       extras.get("trust_remote_code", False), extras.get("decision"))
        if "Dense" in modules:
            embedder.projection = read_dense(directory / modules["Dense"], encoder.config.hidden_size)
        return embedder

    def save(self, directory: str | Path, decision: dict | None = None) -> None:
        """Write the sentence-transformers layout (by hand: sentence-transformers 6's own `save`
        writes module names and drops settings that older versions and TEI need), and our extras."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.decision = decision if decision is not None else self.decision
        self.encoder.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        kinds = ["Transformer", "Pooling"] + (["Dense"] if self.projection else []) + ["Normalize"]
        paths = {kind: "" if kind == "Transformer" else f"{i}_{kind}" for i, kind in enumerate(kinds)}
        write_json(directory / "modules.json", [{"idx": i, "name": str(i), "path": paths[kind], "type": MODULE_TYPES[kind]}
                                                for i, kind in enumerate(kinds)])
        write_json(directory / "sentence_bert_config.json", {"max_seq_length": self.max_length, "do_lower_case": False})
        write_json(directory / paths["Pooling"] / "config.json", {
            "word_embedding_dimension": self.encoder.config.hidden_size, "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False})
        if self.projection is not None:
            dense = directory / paths["Dense"]
            # The activation is always written: without it sentence-transformers 6 applies Tanh.
            write_json(dense / "config.json", {"in_features": self.projection.in_features, "out_features": self.dim,
                                               "bias": False, "activation_function": IDENTITY})
            save_file({"linear.weight": self.projection.weight.detach().contiguous().cpu()}, dense / "model.safetensors")
        (directory / paths["Normalize"]).mkdir(exist_ok=True)
        write_json(directory / CONFIG_FILE, {"trust_remote_code": self.trust_remote_code, "decision": self.decision})

    # -------------------------------------------------------------------------------- embedding

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **features) -> torch.Tensor:
        """Token ids (B, L) to unit-length embeddings (B, dim)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **features).last_hidden_state
        return self.head(mean_pool(hidden, attention_mask))

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled token vectors to unit-length embeddings: the projection, if any, then normalising."""
        if self.projection is not None:
            pooled = self.projection(pooled.to(self.projection.weight.dtype))
        return F.normalize(pooled.float(), dim=-1)

    def encode(self, texts: list[str], batch_size: int = 128, progress: bool | None = None,
               bf16: bool | None = None) -> np.ndarray:
        """Texts to a float32 array (n, dim) of unit-length rows; in bf16 where the hardware has it
        (`bf16=None`), or as asked. Each distinct text is embedded once."""
        unique = list(dict.fromkeys(texts))
        input_ids = self.tokenizer(unique, truncation=True, max_length=self.max_length)["input_ids"]
        vectors = self.encode_ids(input_ids, batch_size, progress, bf16)
        row = {t: i for i, t in enumerate(unique)}
        return vectors[[row[t] for t in texts]]

    @torch.inference_mode()
    def encode_ids(self, input_ids: list[list[int]], batch_size: int = 128, progress: bool | None = None,
                   bf16: bool | None = None) -> np.ndarray:
        """Token ids (already truncated) to embeddings: what `encode` and the server's batcher share.
        Texts go longest first (an out-of-memory shows at the first batch), and each batch is packed
        end to end (packing.py: no pass computes padding but a row's tail), or, for an architecture
        that does not give the same vectors packed, padded to its longest text."""
        order = np.argsort([-len(ids) for ids in input_ids], kind="stable")
        was_training = self.training
        if was_training:  # eval() walks every module (and transformers' kernel hooks): 2 ms a call on a CPU
            self.eval()
        embed = self.embed_packed if self.packs() else self.embed_padded
        vectors = np.empty((len(input_ids), self.dim), dtype=np.float32)
        starts = range(0, len(input_ids), batch_size)
        show = progress if progress is not None else len(starts) > 20
        for start in tqdm(starts, desc="encode", unit="batch", disable=not show, leave=False):
            chosen = order[start:start + batch_size]
            with autocast_for(self.device, bf16):
                vectors[chosen] = embed([input_ids[i] for i in chosen]).cpu().numpy()
        if was_training:
            self.train()
        return vectors

    def embed_padded(self, input_ids: list[list[int]]) -> torch.Tensor:
        features = self.tokenizer.pad({"input_ids": input_ids}, return_tensors="pt")
        return self(**{k: v.to(self.device) for k, v in features.items()})

    def embed_packed(self, input_ids: list[list[int]]) -> torch.Tensor:
        embeddings = self.encoder.embeddings
        # RoBERTa's and MPNet's positions start after their padding index; BERT's at 0
        first = embeddings.padding_idx + 1 if getattr(embeddings, "padding_idx", None) is not None else 0
        rows = pack(input_ids, self.tokenizer.pad_token_id or 0, first)
        hidden = self.encoder(input_ids=rows.ids.to(self.device), position_ids=rows.positions.to(self.device),
                              attention_mask=rows.mask().to(self.device)).last_hidden_state
        return self.head(mean_by_text(hidden, rows.texts, len(input_ids)))

    @torch.inference_mode()
    def packs(self) -> bool:
        """Whether packed texts get the vectors padded ones do, on this architecture (checked once, in
        fp32, on three probe texts); anything that fails or differs means padding."""
        if self.packing is None:
            probe = self.tokenizer(["a short text", "two", "and a third, somewhat longer, text"])["input_ids"]
            try:
                with autocast_for(self.device, False):
                    gap = (self.embed_packed(probe) - self.embed_padded(probe)).abs().max().item()
                self.packing = gap < 1e-4
            except Exception:  # an attention that takes no 4-D mask, an encoder that takes no position ids
                self.packing = False
        return self.packing

    def similarity(self, texts_a: list[str], texts_b: list[str], batch_size: int = 128) -> np.ndarray:
        """The cosine similarity of each pair (texts_a[i], texts_b[i])."""
        vectors = self.encode([t for pair in zip(texts_a, texts_b) for t in pair], batch_size)
        return (vectors[0::2] * vectors[1::2]).sum(1)

    def is_duplicate(self, texts_a: list[str], texts_b: list[str], threshold: float | None = None) -> np.ndarray:
        """True where a pair's cosine is above the threshold tuned on validation (stored with the
        model by train.py), or the one given."""
        threshold = self.decision.get("threshold") if threshold is None else threshold
        if threshold is None:
            raise ValueError("this model has no stored threshold (it was not saved by train.py): pass threshold=")
        return self.similarity(texts_a, texts_b) > threshold


# ------------------------------------------------------------------------------------ loading parts

def mix_weights(start: dict, tuned: dict, share: float) -> dict:
    """(1 - share) x start + share x tuned, weight by weight; integer buffers stay the start's.
    Averaging a fine-tuned model with the one it started from keeps some of what each is good at
    (Wortsman et al. 2022, "WiSE-FT"; BAAI's LM-Cocktail for embedding models)."""
    return {k: (1 - share) * v + share * tuned[k] if v.is_floating_point() else v for k, v in start.items()}


def pick_device(name: str = "auto") -> torch.device:
    """"auto": the GPU if there is one (under torchrun, this process's), else the CPU."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise InputError(f"--device {name}: use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA GPU is visible here; use --device cpu (or auto)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device(name)
    if device.type == "cuda":
        # cuDNN's attention builds a plan for each new (batch, length) shape: 5 to 6 ms of host time
        # a call on an H200, so with texts of every length a training step took 3x longer than with
        # the memory-efficient kernel that PyTorch picks instead (docs/speed.md).
        torch.backends.cuda.enable_cudnn_sdp(False)
    return device


def load_model(name_or_path: str, dense_out_features: int | None = None, max_length: int = 256,
               trust_remote_code: bool = False) -> Embedder:
    """What --model names: a sentence-transformers folder (a run's output, say) is loaded whole, with
    its projection; anything else is a pretrained encoder with our head on it. `dense_out_features`
    None keeps the folder's width; a width that contradicts the folder's projection is an error."""
    if model_kind(name_or_path) != "saved":
        return Embedder.from_pretrained(name_or_path, dense_out_features or None, max_length, trust_remote_code)
    embedder = Embedder.load(name_or_path)
    embedder.max_length = min(embedder.max_length, max_length)
    width = embedder.projection.out_features if embedder.projection else 0
    if embedder.projection is None and dense_out_features:
        embedder.add_projection(dense_out_features)
    elif dense_out_features is not None and dense_out_features != width:
        raise InputError(f"{name_or_path} already projects to {width} dimensions: pass --dense-out-features {width} "
                         f"to continue from it, or start from its base encoder for another width")
    return embedder


def load_encoder(name_or_path: str | Path, trust_remote_code: bool, safetensors_only: bool = False):
    """Tokenizer and AutoModel (fp32 weights, whatever the checkpoint's dtype), with PyTorch's fused
    SDPA attention where the architecture supports it. A bad folder or name is one line."""
    check_model_folder(name_or_path)
    kwargs = dict(trust_remote_code=trust_remote_code, dtype=torch.float32,
                  use_safetensors=True if safetensors_only else None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
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


def read_modules(directory: Path) -> dict[str, str]:
    """{kind: path} from modules.json, checking that the pipeline is ours."""
    if not (directory / "modules.json").is_file():
        raise InputError(f"{directory} is not a sentence-transformers folder (no modules.json)")
    modules = {}
    for module in json.loads((directory / "modules.json").read_text()):
        kind = module["type"].rsplit(".", 1)[-1]
        if kind not in MODULE_TYPES or kind in modules:
            raise InputError(f"{directory}: module {module['type']} is not supported "
                             "(only Transformer, mean Pooling, one Dense and Normalize)")
        modules[kind] = module["path"]
    if list(modules)[:2] != ["Transformer", "Pooling"]:
        raise InputError(f"{directory}: expected a Transformer then a Pooling module, found {list(modules)}")
    pooling = json.loads((directory / modules["Pooling"] / "config.json").read_text())
    if "pooling_mode" in pooling:  # sentence-transformers 6 names the mode
        modes = [pooling["pooling_mode"]] if isinstance(pooling["pooling_mode"], str) else pooling["pooling_mode"]
    else:  # earlier versions switch each mode on or off
        modes = [k.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token")
                 for k, v in pooling.items() if k.startswith("pooling_mode_") and v]
    if modes != ["mean"]:
        raise InputError(f"{directory}: pooling {modes} is not supported (only mean)")
    return modules


def read_dense(directory: Path, in_features: int) -> nn.Linear:
    """A sentence-transformers Dense folder as our projection; only an identity activation will do."""
    config = json.loads((directory / "config.json").read_text())
    activation = config.get("activation_function", "missing (sentence-transformers then applies Tanh)")
    if activation != IDENTITY:
        raise InputError(f"{directory}: Dense activation {activation} is not supported (only {IDENTITY})")
    if not (directory / "model.safetensors").is_file():
        raise InputError(f"{directory} has no model.safetensors (pickled weights are not read)")
    if config["in_features"] != in_features:
        raise InputError(f"{directory}: Dense takes {config['in_features']} features, the encoder gives {in_features}")
    projection = nn.Linear(in_features, config["out_features"], bias=config.get("bias", True))
    try:
        weights = load_file(directory / "model.safetensors")
    except Exception as e:  # SafetensorError: cut short or overwritten
        raise damaged_weights(directory, e) from e
    projection.load_state_dict({k.removeprefix("linear."): v for k, v in weights.items()})
    return projection


# ------------------------------------------------------------------------------------------- maths

def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors, padding excluded."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def autocast_for(device: torch.device, bf16: bool | None = None) -> contextlib.AbstractContextManager:
    """bf16 autocast for inference; by default on CUDA and on CPUs with bf16 units."""
    if bf16 is None:
        bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_has_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX), which makes it faster here."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
