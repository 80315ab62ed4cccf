"""An embedding model: a Hugging Face encoder, masked mean pooling, an optional linear projection
to `dense_out_features`, and L2 normalisation, so that a dot product of two embeddings is their
cosine similarity.

    embedder = Embedder.from_pretrained("BAAI/bge-base-en-v1.5", dense_out_features=256)
    vectors = embedder.encode(["How do I learn Python?", "What is the best way to learn Python?"])
    embedder.save("out")                      # and later: Embedder.load("out")
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

CONFIG_FILE = "embedder.json"
PROJECTION_FILE = "projection.safetensors"


class Embedder(nn.Module):
    def __init__(self, encoder: nn.Module, tokenizer, dense_out_features: int | None = None,
                 max_length: int = 256, trust_remote_code: bool = False):
        super().__init__()
        self.encoder, self.tokenizer = encoder, tokenizer
        self.max_length = max_length
        self.trust_remote_code = trust_remote_code
        hidden = encoder.config.hidden_size
        self.projection = None
        if dense_out_features:
            # No bias (it would shift every embedding) and orthogonal weights: at the same width this
            # is a rotation, which leaves every cosine exactly as the pretrained model had it; at a
            # smaller width it is a random orthonormal projection, which keeps cosines approximately
            # (Johnson-Lindenstrauss). A default (uniform) init scrambles the geometry at step 0.
            self.projection = nn.Linear(hidden, dense_out_features, bias=False)
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
        """A pretrained encoder from the hub or a local folder, with a fresh projection if asked."""
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        encoder = load_encoder(name_or_path, trust_remote_code, safetensors_only=False)
        max_length = min(max_length, tokenizer.model_max_length,
                         getattr(encoder.config, "max_position_embeddings", max_length))
        return cls(encoder, tokenizer, dense_out_features, max_length, trust_remote_code)

    @classmethod
    def load(cls, directory: str | Path) -> "Embedder":
        """An embedder written by `save`. Only safetensors and JSON are read: nothing is unpickled."""
        directory = Path(directory)
        config = json.loads((directory / CONFIG_FILE).read_text())
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=config["trust_remote_code"])
        encoder = load_encoder(directory, config["trust_remote_code"], safetensors_only=True)
        embedder = cls(encoder, tokenizer, config["dense_out_features"], config["max_length"],
                       config["trust_remote_code"])
        if embedder.projection is not None:
            embedder.projection.load_state_dict(load_file(directory / PROJECTION_FILE))
        return embedder

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        if self.projection is not None:
            save_file({k: v.contiguous().cpu() for k, v in self.projection.state_dict().items()},
                      directory / PROJECTION_FILE)
        config = {"dense_out_features": self.projection.out_features if self.projection else None,
                  "max_length": self.max_length, "pooling": "mean", "normalize": True,
                  "trust_remote_code": self.trust_remote_code}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    # -------------------------------------------------------------------------------- embedding

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **features) -> torch.Tensor:
        """Token ids (B, L) to unit-length embeddings (B, dim)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **features).last_hidden_state
        embeddings = mean_pool(hidden, attention_mask)
        if self.projection is not None:
            embeddings = self.projection(embeddings.to(self.projection.weight.dtype))
        return F.normalize(embeddings.float(), dim=-1)

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 128, progress: bool | None = None,
               bf16: bool | None = None) -> np.ndarray:
        """Texts to a float32 array (n, dim) of unit-length rows; in bf16 where the hardware has it
        (`bf16=None`), or as asked.

        Each distinct text is embedded once, and texts are batched longest first, so a batch holds
        texts of similar length and pads little (and an out-of-memory shows up at the first batch).
        """
        unique = list(dict.fromkeys(texts))
        input_ids = self.tokenizer(unique, truncation=True, max_length=self.max_length)["input_ids"]
        order = np.argsort([-len(ids) for ids in input_ids], kind="stable")
        was_training = self.training
        self.eval()
        vectors = np.empty((len(unique), self.dim), dtype=np.float32)
        starts = range(0, len(unique), batch_size)
        show = progress if progress is not None else len(starts) > 20
        for start in tqdm(starts, desc="encode", unit="batch", disable=not show, leave=False):
            chosen = order[start:start + batch_size]
            features = self.tokenizer.pad({"input_ids": [input_ids[i] for i in chosen]}, return_tensors="pt")
            with autocast_for(self.device, bf16):
                batch = self(**{k: v.to(self.device) for k, v in features.items()})
            vectors[chosen] = batch.float().cpu().numpy()
        self.train(was_training)
        row = {t: i for i, t in enumerate(unique)}
        return vectors[[row[t] for t in texts]]


def load_encoder(name_or_path: str | Path, trust_remote_code: bool, safetensors_only: bool) -> nn.Module:
    """AutoModel with PyTorch's fused SDPA attention where the architecture supports it."""
    kwargs = dict(trust_remote_code=trust_remote_code, use_safetensors=True if safetensors_only else None)
    try:
        return AutoModel.from_pretrained(name_or_path, attn_implementation="sdpa", **kwargs)
    except (ValueError, ImportError):  # this architecture has no SDPA path: use its own attention
        return AutoModel.from_pretrained(name_or_path, **kwargs)


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
