"""A small GPT-style byte-level language model and the text it trains on.

The examples need a model that is a real transformer (so that DiLoCo's
pseudo-gradients look like those of a real run) yet trains on a CPU in
minutes, and data that every machine already has: bytes need no tokenizer
and the Python standard library's own source is always installed.

The architecture is GPT-2's, as in nanoGPT: token and position embeddings,
pre-LayerNorm blocks of causal self-attention and an MLP, a final
LayerNorm, and an output head that shares the token embedding's weights.
"""

from __future__ import annotations

import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VOCAB_SIZE = 256  # one token per byte value
DEFAULT_CORPUS_BYTES = 8 << 20


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    block_size: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")


# `tiny` is for tests and smoke runs (seconds per outer step); `small` learns
# visibly in a few minutes on a CPU.
MODEL_SIZES: dict[str, GPTConfig] = {
    "tiny": GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64),
    "small": GPTConfig(),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, channels = x.shape
        # (B, T, 3C) -> three (B, n_head, T, head_dim) tensors.
        q, k, v = (
            t.view(batch, time, self.n_head, channels // self.n_head).transpose(1, 2)
            for t in self.qkv(x).split(channels, dim=2)
        )
        y: torch.Tensor = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(batch, time, channels)
        y = self.resid_dropout(self.proj(y))
        return y


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x)
        x = F.gelu(x)
        x = self.proj(x)
        x = self.dropout(x)
        return x


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(VOCAB_SIZE, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, VOCAB_SIZE, bias=False)
        # Tying saves a vocab x n_embd matrix and helps small models; the
        # embedding is what the head reads out against anyway.
        self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2: every block adds two projections onto the residual stream,
        # so shrink them to keep its variance from growing with depth.
        for name, parameter in self.named_parameters():
            if name.endswith("proj.weight"):  # attn.proj and mlp.proj, not qkv
                nn.init.normal_(parameter, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Small weights keep the initial logits near zero, so the initial
        # loss is the uniform guess's ln(256) rather than something worse.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def num_parameters(self) -> int:
        # parameters() yields the tied weight once, so it is counted once.
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position of ``idx`` (B, T), and the loss if ``targets`` are given."""
        time = idx.shape[1]
        if time > self.config.block_size:
            raise ValueError(f"sequence length {time} exceeds block_size={self.config.block_size}")
        positions = torch.arange(time, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, VOCAB_SIZE), targets.view(-1))
        return logits, loss


class ByteDataset(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Non-overlapping windows of a byte string, as (input, target) pairs.

    Window ``i`` starts at ``i * block_size`` and is ``block_size + 1`` bytes
    long: the target is the input shifted by one, so consecutive windows share
    one byte and every byte of the corpus is predicted exactly once.
    """

    def __init__(self, data: bytes, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1")
        # bytearray: torch.frombuffer wants a writable (and non-empty) buffer.
        self.data = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if data
            else torch.empty(0, dtype=torch.uint8)
        )
        self.block_size = block_size
        self._len = max(0, (len(data) - 1) // block_size)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self._len:
            raise IndexError(f"window {i} is out of range for {self._len} windows")
        start = i * self.block_size
        window = self.data[start : start + self.block_size + 1].long()
        return window[:-1], window[1:]


def _python_sources(root: Path) -> list[Path]:
    """Every ``*.py`` under the standard library, in an order no file system can change.

    Installed packages (``site-packages``) differ between machines and are
    left out; sorting the relative paths as strings makes the order the same
    everywhere rather than whatever the directory listing returns.
    """
    found = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [
            d for d in subdirectories if d not in ("site-packages", "dist-packages", "__pycache__")
        ]
        found += [Path(directory, f) for f in files if f.endswith(".py")]
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def default_corpus(max_bytes: int = DEFAULT_CORPUS_BYTES) -> bytes:
    """The first ``max_bytes`` of the standard library's source, so examples run offline.

    The same on every machine with the same Python version, which is what
    lets replica groups on different machines shard one corpus consistently.
    """
    chunks: list[bytes] = []
    remaining = max_bytes
    for path in _python_sources(Path(sysconfig.get_paths()["stdlib"])):
        if remaining <= 0:
            break
        chunk = path.read_bytes()[:remaining]
        chunks.append(chunk)
        remaining -= len(chunk)
    corpus = b"".join(chunks)
    if not corpus:
        raise RuntimeError(f"no Python sources found under {sysconfig.get_paths()['stdlib']}")
    return corpus


def load_corpus(paths: list[str]) -> bytes:
    """The bytes of the given files, and of every file under the given directories.

    Files under a directory are read in sorted path order (so every group
    builds the same corpus), skipping hidden ones such as ``.git``.
    """
    chunks: list[bytes] = []
    for name in paths:
        path = Path(name)
        if path.is_file():
            chunks.append(path.read_bytes())
        elif path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            chunks += [f.read_bytes() for f in files]
        else:
            raise FileNotFoundError(f"--data {name}: no such file or directory")
    corpus = b"".join(chunks)
    if not corpus:
        raise ValueError(f"no text found in {', '.join(paths) or 'no paths'}")
    return corpus
