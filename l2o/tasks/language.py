"""Character-level language-model tasks: a small LSTM and a tiny causal Transformer.

Both predict the next character of windows of the stdlib-source corpus (:mod:`l2o.tasks.text`);
the loss is the mean next-character cross-entropy (nats) over all positions of the batch.

The networks are ``nn.Module`` s built on the ``meta`` device (structure only, no memory, no
global RNG); parameters are drawn from the instance generator in :meth:`init` and the loss runs
the module with ``torch.func.functional_call``, so it is pure and runs under ``vmap`` and
``grad`` (including second order, for meta-gradients). Two PyTorch kernels are avoided on
purpose because they have no vmap batching rule: ``nn.LSTM`` (the cell is written out with
``nn.Linear`` and elementwise ops) and ``scaled_dot_product_attention`` (attention is written
out with matmuls, a causal mask and softmax).
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from l2o.optim.base import Params
from l2o.tasks.base import Batch, Task
from l2o.tasks.registry import register_task
from l2o.tasks.text import DEFAULT_MODULES, VOCAB_SIZE, CharCorpus
from l2o.validation import positive_int


class _LSTMNet(nn.Module):
    def __init__(self, vocab_size: int, embed_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.embed = nn.Embedding(vocab_size, embed_dim)
        # One matmul for the four gates (input, forget, cell, output) from [x_t, h_{t-1}].
        self.gates = nn.Linear(embed_dim + hidden_size, 4 * hidden_size)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)  # [B, T, E]
        h = x.new_zeros(x.shape[0], self.hidden_size)
        c = h
        outputs = []
        for t in range(x.shape[1]):
            i, f, g, o = self.gates(torch.cat([x[:, t], h], dim=-1)).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return self.head(torch.stack(outputs, dim=1))  # [B, T, V]


class _CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (
            z.reshape(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v)
        )
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.n_heads)  # [B, H, T, T]
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = _CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class _TransformerNet(nn.Module):
    def __init__(
        self, vocab_size: int, d_model: int, n_heads: int, n_layers: int, seq_len: int
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.empty(seq_len, d_model))
        self.blocks = nn.ModuleList(_Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[-1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class CharLMTask(Task):
    """Shared machinery of the character LM tasks: corpus, batches, loss. Not registered."""

    net: nn.Module

    def __init__(
        self,
        seq_len: int,
        batch_size: int,
        modules: tuple[str, ...] | list[str] = DEFAULT_MODULES,
    ) -> None:
        positive_int("seq_len", seq_len)
        positive_int("batch_size", batch_size)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.corpus = CharCorpus(modules)
        self.vocab_size = VOCAB_SIZE

    @abstractmethod
    def _init_tensor(self, name: str, shape: torch.Size, generator: torch.Generator) -> Tensor:
        """Initial value of parameter ``name``."""

    def init(self, generator: torch.Generator) -> Params:
        params = {
            name: self._init_tensor(name, p.shape, generator)
            for name, p in self.net.named_parameters()
        }
        return {k: v.to(device=self.device, dtype=self.dtype) for k, v in params.items()}

    def logits(self, params: Params, tokens: Tensor) -> Tensor:
        """Next-character logits ``[B, T, vocab_size]`` for ``tokens`` ``[B, T]``."""
        return functional_call(self.net, params, (tokens,))

    def loss(self, params: Params, batch: Batch) -> Tensor:
        """Mean next-character cross-entropy, ``-mean_{b,t} log p(y[b,t] | x[b,:t+1])``."""
        inputs, targets = batch
        logits = self.logits(params, inputs)
        return F.cross_entropy(logits.reshape(-1, self.vocab_size), targets.reshape(-1))

    def batch(self, seed: int, step: int, split: str = "train") -> Batch:
        return self.corpus.windows(seed, step, split, self.batch_size, self.seq_len)

    def to(self, device: torch.device | str) -> CharLMTask:
        super().to(device)
        self.corpus.to(self.device)
        return self


class CharLSTMTask(CharLMTask):
    """Next-character prediction with a one-layer LSTM.

    ``embedding(embed_dim) -> LSTM(hidden_size) -> linear(vocab)``. Init: embedding ~ N(0, 1);
    linear weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's defaults), and the
    forget-gate bias +1 so early gradients flow through time (Gers et al., 2000).
    """

    name = "char_lstm"

    def __init__(
        self,
        embed_dim: int = 16,
        hidden_size: int = 32,
        seq_len: int = 32,
        batch_size: int = 16,
        modules: tuple[str, ...] | list[str] = DEFAULT_MODULES,
    ) -> None:
        positive_int("embed_dim", embed_dim)
        positive_int("hidden_size", hidden_size)
        super().__init__(seq_len, batch_size, modules)
        self.embed_dim = embed_dim
        self.hidden_size = hidden_size
        with torch.device("meta"):
            self.net = _LSTMNet(self.vocab_size, embed_dim, hidden_size)

    def _init_tensor(self, name: str, shape: torch.Size, generator: torch.Generator) -> Tensor:
        if name == "embed.weight":
            return torch.randn(shape, generator=generator)
        fan_in = self.embed_dim + self.hidden_size if name.startswith("gates") else self.hidden_size
        bound = 1.0 / math.sqrt(fan_in)
        value = (torch.rand(shape, generator=generator) * 2 - 1) * bound
        if name == "gates.bias":
            h = self.hidden_size
            value[h : 2 * h] += 1.0  # forget gate
        return value

    def config(self) -> dict:
        return {
            "name": self.name,
            "embed_dim": self.embed_dim,
            "hidden_size": self.hidden_size,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "modules": list(self.corpus.modules),
        }


class CharTransformerTask(CharLMTask):
    """Next-character prediction with a tiny causal (GPT-style, pre-LayerNorm) Transformer.

    Token and learned position embeddings, ``n_layers`` blocks of causal multi-head
    self-attention and a GELU MLP (width ``4 d_model``), final LayerNorm, linear head. No
    dropout. Init as GPT-2: weights ~ N(0, 0.02), residual output projections ~
    N(0, 0.02 / sqrt(2 n_layers)), biases 0, LayerNorm gains 1.
    """

    name = "char_transformer"

    def __init__(
        self,
        d_model: int = 32,
        n_heads: int = 2,
        n_layers: int = 1,
        seq_len: int = 32,
        batch_size: int = 16,
        modules: tuple[str, ...] | list[str] = DEFAULT_MODULES,
    ) -> None:
        positive_int("d_model", d_model)
        positive_int("n_heads", n_heads)
        positive_int("n_layers", n_layers)
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        super().__init__(seq_len, batch_size, modules)
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_layers = n_layers
        with torch.device("meta"):
            self.net = _TransformerNet(self.vocab_size, d_model, n_heads, n_layers, seq_len)

    def _init_tensor(self, name: str, shape: torch.Size, generator: torch.Generator) -> Tensor:
        if any(part.startswith("ln") for part in name.split(".")):  # LayerNorm
            return torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        if name.endswith("bias"):
            return torch.zeros(shape)
        std = 0.02
        if name.endswith(("attn.out.weight", "proj.weight")):
            std = 0.02 / math.sqrt(2 * self.n_layers)
        return torch.randn(shape, generator=generator) * std

    def config(self) -> dict:
        return {
            "name": self.name,
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "n_layers": self.n_layers,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "modules": list(self.corpus.modules),
        }


register_task(CharLSTMTask.name, CharLSTMTask)
register_task(CharTransformerTask.name, CharTransformerTask)
