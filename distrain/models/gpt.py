"""A small causal transformer language model (GPT-2 layout, pre-norm, tied embeddings)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.fc_out = nn.Linear(4 * d_model, d_model)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, seq_len: int, n_layer: int, n_head: int, d_model: int,
                 dropout: float = 0.0, activation_checkpointing: bool = False):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"model.d_model={d_model} is not divisible by model.n_head={n_head}")
        self.seq_len, self.d_model, self.activation_checkpointing = seq_len, d_model, activation_checkpointing
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok.weight
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "fc_out.weight")):  # GPT-2's scaled init of residual projections
                nn.init.normal_(p, std=0.02 / (2 * n_layer) ** 0.5)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(self.ln_f(x))

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6N for the weights plus attention (PaLM's appendix B)."""
        # ZeRO-3 leaves each rank an empty tensor in place of a parameter: ds_numel is its full size
        n = sum(getattr(p, "ds_numel", p.numel()) for p in self.parameters()) - self.seq_len * self.d_model
        return 6 * n + 12 * len(self.blocks) * self.d_model * self.seq_len


def gpt(vocab_size: int = 256, seq_len: int = 64, n_layer: int = 2, n_head: int = 2, d_model: int = 64,
        dropout: float = 0.0, activation_checkpointing: bool = False) -> nn.Module:
    return GPT(vocab_size, seq_len, n_layer, n_head, d_model, dropout, activation_checkpointing)
