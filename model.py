"""An embedding model: a Hugging Face encoder pooled as the model was published to be pooled (CLS,
mean, ...), its published Dense layers, an optional linear projection of ours to
`dense_out_features`, and L2 normalisation where the model was published with it, so that a dot
product of two embeddings is their cosine similarity.

    embedder = Embedder.from_pretrained("BAAI/bge-base-en-v1.5", dense_out_features=256)
    vectors = embedder.encode(["How do I learn Python?", "What is the best way to learn Python?"])
    queries = embedder.encode(["learn python"], role="query")     # the model's query prompt, if it names one
    embedder.save("out")                      # and later: Embedder.load("out")

The published pipeline (st_layout.py) is read from the source's sentence-transformers files: its
pooling, `include_prompt`, Dense layers, Normalize and prompts, which a text takes as
sentence-transformers gives them (the prompt's text before the text). A plain transformers model
without such files is mean-pooled and normalised, as sentence-transformers pools it. `save` writes
the same layout with our projection after the published layers, so the folder loads, unchanged, in
sentence-transformers, Infinity, text-embeddings-inference and (with a few lines) plain
transformers, giving our vectors. The decision threshold tuned on validation travels in the folder
too (`embedder.json`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from embed_ft import st_layout
from embed_ft.errors import InputError
from embed_ft.jsonl import write_json
from embed_ft.packing import pack
from embed_ft.pooling import pool_packed, pool_padded
from embed_ft.sources import model_kind
from embed_ft.st_layout import IDENTITY, Layout, as_projection, load_encoder, read_dense

CONFIG_FILE = "embedder.json"  # ours: trust_remote_code, whether the last Dense is our projection, the decision
CUSTOM_PROMPT = "custom"       # the name a --prompt of the user's own is saved under


class Embedder(nn.Module):
    def __init__(self, encoder: nn.Module, tokenizer, dense_out_features: int | None = None,
                 max_length: int = 256, trust_remote_code: bool = False, decision: dict | None = None,
                 layout: Layout | None = None):
        super().__init__()
        self.encoder, self.tokenizer = encoder, tokenizer
        self.max_length = max_length
        self.trust_remote_code = trust_remote_code
        self.decision = decision or {}  # {"threshold": ..., "constraint": ..., "val": {...}, "test": {...}}
        self.layout = layout or Layout(published=False)
        self.dense = nn.ModuleList()    # the published Dense layers, before our projection
        self.projection = None
        self.packing: bool | None = None  # whether encode_ids packs texts (packs(), checked at first use)
        self.prompt_lengths: dict[str, int] = {}
        if dense_out_features:
            self.add_projection(dense_out_features)

    def add_projection(self, out_features: int) -> None:
        # No bias (it would shift every embedding) and orthogonal weights: at the same width this is a
        # rotation, which leaves every cosine exactly as the pretrained model had it; at a smaller
        # width it is a random orthonormal projection, which keeps cosines approximately
        # (Johnson-Lindenstrauss). A default (uniform) init scrambles the geometry at step 0.
        in_features = self.dense[-1].linear.out_features if len(self.dense) else self.encoder.config.hidden_size
        self.projection = nn.Linear(in_features, out_features, bias=False)
        nn.init.orthogonal_(self.projection.weight)

    @property
    def dim(self) -> int:
        if self.projection is not None:
            return self.projection.out_features
        return self.dense[-1].linear.out_features if len(self.dense) else self.encoder.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, name_or_path: str, dense_out_features: int | None = None,
                        max_length: int = 256, trust_remote_code: bool = False) -> "Embedder":
        """A pretrained model from the hub or a local folder as it was published (its pooling, Dense
        layers, Normalize and prompts), with a fresh projection of ours if asked."""
        layout, root = st_layout.published_layout(name_or_path)
        local = model_kind(str(name_or_path)) != "hub"
        source = Path(name_or_path) / layout.transformer if local else name_or_path
        tokenizer, encoder = load_encoder(source, trust_remote_code, subfolder="" if local else layout.transformer)
        max_length = min(max_length, layout.max_seq_length or tokenizer.model_max_length,
                         getattr(encoder.config, "max_position_embeddings", max_length))
        embedder = cls(encoder, tokenizer, None, max_length, trust_remote_code, layout=layout)
        embedder.dense.extend(read_dense(root / path) for path in layout.dense)
        if dense_out_features:
            embedder.add_projection(dense_out_features)
        return embedder

    @classmethod
    def load(cls, directory: str | Path) -> "Embedder":
        """A sentence-transformers folder, ours or anyone's: a Transformer, a Pooling of any mode,
        Dense layers, a Normalize or none, prompts. Only safetensors and JSON are read: nothing is
        unpickled."""
        directory = Path(directory)
        if not (directory / "modules.json").is_file():
            raise InputError(f"{directory} is not a sentence-transformers folder (no modules.json)")
        layout = st_layout.read(directory)
        extras = json.loads((directory / CONFIG_FILE).read_text()) if (directory / CONFIG_FILE).is_file() else {}
        trust = extras.get("trust_remote_code", False)
        tokenizer, encoder = load_encoder(directory / layout.transformer, trust, safetensors_only=True)
        embedder = cls(encoder, tokenizer, None, layout.max_seq_length or tokenizer.model_max_length, trust,
                       extras.get("decision"), layout)
        dense = [read_dense(directory / path) for path in layout.dense]
        # Ours has a projection when embedder.json says so; a folder of the earlier layout had one
        # exactly when it had a Dense layer.
        if dense and extras.get("projection", bool(extras)):
            embedder.projection = as_projection(dense.pop(), directory / layout.dense[-1])
        embedder.dense.extend(dense)
        return embedder

    def save(self, directory: str | Path, decision: dict | None = None) -> None:
        """The sentence-transformers layout (st_layout.write), the weights, and our extras."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.decision = decision if decision is not None else self.decision
        self.encoder.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        layers = [(layer.config(), {f"linear.{k}": v for k, v in layer.linear.state_dict().items()}) for layer in self.dense]
        if self.projection is not None:
            # The activation is always written: without it sentence-transformers applies Tanh.
            layers.append(({"in_features": self.projection.in_features, "out_features": self.dim, "bias": False,
                            "activation_function": IDENTITY}, {"linear.weight": self.projection.weight}))
        folders = st_layout.write(directory, dataclasses.replace(self.layout, transformer=""), self.encoder.config.hidden_size, [c for c, _ in layers], self.max_length)
        for folder, (_, weights) in zip(folders, layers):
            save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, folder / "model.safetensors")
        write_json(directory / CONFIG_FILE, {"trust_remote_code": self.trust_remote_code,
                                             "projection": self.projection is not None, "decision": self.decision})

    def describe(self) -> dict:
        """What the folder holds, for metrics.json and the card."""
        return {"pooling": self.layout.pooling, "include_prompt": self.layout.include_prompt,
                "published_dense": [layer.config() for layer in self.dense],
                "projection": self.projection.out_features if self.projection is not None else None,
                "normalize": self.layout.normalize, "prompts": self.layout.prompts,
                "default_prompt_name": self.layout.default_prompt_name, "published_layout": self.layout.published}

    # -------------------------------------------------------------------------------- prompts

    def choose_prompt(self, name: str = "", text: str = "") -> None:
        """--prompt-name picks one of the model's prompts, --prompt gives one's own text: the prompt
        every text then takes for duplicate detection, and the saved folder's default."""
        if name and text:
            raise InputError("give --prompt-name or --prompt, not both")
        if name and name not in self.layout.prompts:
            raise InputError(f"--prompt-name {name}: the model names {', '.join(map(repr, self.layout.prompts)) or 'no prompts'}")
        if text:
            self.layout.prompts = {**self.layout.prompts, CUSTOM_PROMPT: text}
        if name or text:
            self.layout.default_prompt_name = name or CUSTOM_PROMPT

    def tokenize(self, texts: list[str], role: str = "default", truncate: bool = True,
                 prompt: str | None = None) -> tuple[list[list[int]], int]:
        """Token ids of the texts, each after the prompt of its role or name (Layout.prompt_for), or
        after `prompt` where one is given ("" for none), and how many leading tokens pooling leaves
        out: the prompt's, where the model excludes it."""
        prompt = self.layout.prompt_for(role) if prompt is None else prompt
        texts = [prompt + t for t in texts] if prompt else texts
        if self.layout.do_lower_case:
            texts = [t.lower() for t in texts]
        ids = self.tokenizer(texts, truncation=truncate, max_length=self.max_length if truncate else None)["input_ids"]
        return ids, self.prompt_length(prompt) if prompt and not self.layout.include_prompt else 0

    def prompt_length(self, prompt: str) -> int:
        """The prompt's tokens with the leading special token, as sentence-transformers counts them."""
        if prompt not in self.prompt_lengths:
            ids = self.tokenizer([prompt.lower() if self.layout.do_lower_case else prompt])["input_ids"][0]
            self.prompt_lengths[prompt] = len(ids) - (ids[-1] in self.tokenizer.all_special_ids)
        return self.prompt_lengths[prompt]

    # -------------------------------------------------------------------------------- embedding

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, skip: torch.Tensor | int = 0,
                **features) -> torch.Tensor:
        """Token ids (B, L) to embeddings (B, dim); `skip`: prompt tokens left out of pooling."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **features).last_hidden_state
        return self.head(pool_padded(hidden, attention_mask, self.layout.pooling, skip))

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled token vectors to embeddings: the published Dense layers, our projection, if any, then
        normalising (where the model was published with a Normalize module)."""
        for layer in self.dense:
            pooled = layer(pooled.to(layer.linear.weight.dtype))
        if self.projection is not None:
            pooled = self.projection(pooled.to(self.projection.weight.dtype))
        return F.normalize(pooled.float(), dim=-1) if self.layout.normalize else pooled.float()

    def encode(self, texts: list[str], batch_size: int = 128, progress: bool | None = None,
               bf16: bool | None = None, role: str = "default") -> np.ndarray:
        """Texts to a float32 array (n, dim); in bf16 where the hardware has it (`bf16=None`), or as
        asked. Each distinct text is embedded once, after its role's prompt ("default", "query" or
        "document")."""
        unique = list(dict.fromkeys(texts))
        input_ids, skip = self.tokenize(unique, role)
        vectors = self.encode_ids(input_ids, batch_size, progress, bf16, skip)
        row = {t: i for i, t in enumerate(unique)}
        return vectors[[row[t] for t in texts]]

    @torch.inference_mode()
    def encode_ids(self, input_ids: list[list[int]], batch_size: int = 128, progress: bool | None = None,
                   bf16: bool | None = None, skip: list[int] | int = 0) -> np.ndarray:
        """Token ids (already truncated) to embeddings: what `encode` and the server's batcher share;
        `skip`, for all texts or each, the prompt tokens pooling leaves out. Texts go longest first
        (an out-of-memory shows at the first batch), and each batch is packed end to end
        (packing.py: no pass computes padding but a row's tail), or, for an architecture that does
        not give the same vectors packed, padded to its longest text."""
        order = np.argsort([-len(ids) for ids in input_ids], kind="stable")
        skips = np.broadcast_to(np.asarray(skip, dtype=np.int64), (len(input_ids),))
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
                vectors[chosen] = embed([input_ids[i] for i in chosen], skips[chosen]).cpu().numpy()
        if was_training:
            self.train()
        return vectors

    def embed_padded(self, input_ids: list[list[int]], skip: np.ndarray | None = None) -> torch.Tensor:
        features = self.tokenizer.pad({"input_ids": input_ids}, return_tensors="pt")
        skip = torch.from_numpy(np.array(skip)).to(self.device) if skip is not None and skip.any() else 0
        return self(**{k: v.to(self.device) for k, v in features.items()}, skip=skip)

    def embed_packed(self, input_ids: list[list[int]], skip: np.ndarray | None = None) -> torch.Tensor:
        embeddings = self.encoder.embeddings
        # RoBERTa's and MPNet's positions start after their padding index; BERT's at 0
        first = embeddings.padding_idx + 1 if getattr(embeddings, "padding_idx", None) is not None else 0
        rows = pack(input_ids, self.tokenizer.pad_token_id or 0, first)
        hidden = self.encoder(input_ids=rows.ids.to(self.device), position_ids=rows.positions.to(self.device),
                              attention_mask=rows.mask().to(self.device)).last_hidden_state
        skip = torch.from_numpy(np.array(skip)) if skip is not None and skip.any() else 0
        return self.head(pool_packed(hidden, rows.texts, rows.positions - first, len(input_ids), self.layout.pooling, skip))

    @torch.inference_mode()
    def packs(self) -> bool:
        """Whether packed texts get the vectors padded ones do, on this architecture and pooling, with
        the model's default prompt (checked once, in fp32, on three probe texts); anything that fails
        or differs means padding."""
        if self.packing is None:
            probe, skip = self.tokenize(["a short text", "two", "and a third, somewhat longer, text"])
            skips = np.full(len(probe), skip)
            try:
                with autocast_for(self.device, False):
                    gap = (self.embed_packed(probe, skips) - self.embed_padded(probe, skips)).abs().max().item()
                self.packing = gap < 1e-4
            except Exception:  # an attention that takes no 4-D mask, an encoder that takes no position ids
                self.packing = False
        return self.packing

    def similarity(self, texts_a: list[str], texts_b: list[str], batch_size: int = 128) -> np.ndarray:
        """The cosine similarity of each pair (texts_a[i], texts_b[i])."""
        vectors = self.encode([t for pair in zip(texts_a, texts_b) for t in pair], batch_size)
        if not self.layout.normalize:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
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
    """What --model names: a sentence-transformers folder (a run's output, a published model's) is
    loaded whole, with its projection; anything else is a pretrained model as published, with a
    fresh projection if asked. `dense_out_features`
    None keeps the folder's width; a width that contradicts the folder's projection is an error."""
    if model_kind(name_or_path) != "saved":
        embedder = Embedder.from_pretrained(name_or_path, dense_out_features or None, max_length, trust_remote_code)
        if not embedder.layout.published:
            print(f"note: {name_or_path} has no sentence-transformers modules (modules.json): mean pooling, as "
                  f"sentence-transformers pools such a model", file=sys.stderr)
        return embedder
    embedder = Embedder.load(name_or_path)
    embedder.max_length = min(embedder.max_length, max_length)
    width = embedder.projection.out_features if embedder.projection else 0
    if embedder.projection is None and dense_out_features:
        embedder.add_projection(dense_out_features)
    elif dense_out_features is not None and dense_out_features != width:
        raise InputError(f"{name_or_path} already projects to {width} dimensions: pass --dense-out-features {width} "
                         f"to continue from it, or start from its base encoder for another width")
    return embedder


# ------------------------------------------------------------------------------------------- maths

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
