"""A plain PyTorch GPT of the `char_tiny` shape, timed the same way, for BENCHMARKS.md.

The issue's reference point is nanoGPT's CPU quick-start (4 layers, 4 heads, width 128, context
64, batch 12). This is an independent minimal model of that shape (pre-norm blocks, GELU MLP,
tied embeddings, fused causal attention, AdamW with weight decay, global-norm clipping at 1.0,
fp32), so the comparison is made on this machine rather than quoted. It is not part of `make
bench` (PyTorch is not a dependency): run it with any Python that has torch installed:

    python benchmarks/torch_reference.py --steps=300
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, context: int, width: int, heads: int, layers: int):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tokens(idx) + self.positions(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.norm(x) @ self.tokens.weight.T
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--window", type=int, default=25)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch, context, vocab = 12, 64, 104
    model = GPT(vocab, context, width=128, heads=4, layers=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    data = torch.randint(0, vocab, (args.steps, batch, context + 1))
    rates, start = [], time.perf_counter()
    for step in range(args.steps):
        x, y = data[step, :, :-1], data[step, :, 1:]
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % args.window == 0:
            now = time.perf_counter()
            rates.append(args.window * batch * context / (now - start))
            start = now
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads: median "
        f"{statistics.median(rates[1:]):,.0f} tokens/s over {len(rates) - 1} windows "
        f"(loss {loss.item():.3f})"
    )


if __name__ == "__main__":
    main()
