"""Small flows written for these tests in each public convention flowdiag reads without a library.

- tuple (rosinality/glow-pytorch style): layers return `(out, logdet)`, a scalar for ActNorm and the
  1x1 conv, `None` for the additive coupling; steps and multi-scale blocks sum them; `Glow(x)` returns
  (log p of the split-off latents, total log-det, latents).
- accumulated (y0ast / chaiyujin style): `flowdiag.bench.threaded_glow` (the bench times the Monitor
  on it too), ActNorms inside the coupling networks, a split adding its prior to the running total,
  dequantization noise added to the input in place.
- transformer (apple/ml-tarflow style): a stack of autoregressive transformer blocks on patches,
  each returning `(z, logdet)` with the log-det a per-dimension mean (or per token, per element), the
  model returning the 3-tuple (z, outputs, summed log-dets); exp in float32 under bf16 autocast.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flowdiag.bench.threaded_glow import ThreadedGlow

__all__ = ["TarFlow", "ThreadedGlow", "TupleGlow", "threaded_glow", "tuple_glow"]


def _squeeze(x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def _gaussian_log_p(x: Tensor, mean: Tensor, log_sd: Tensor) -> Tensor:
    return -0.5 * math.log(2 * math.pi) - log_sd - 0.5 * (x - mean) ** 2 / torch.exp(2 * log_sd)


# --- tuple convention ----------------------------------------------------------------------------


class ActNorm(nn.Module):
    """z = scale · (x + loc); initialized on the first forward (unbiased std + 1e-6), a uint8 buffer flag."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.initialized.item() == 0:
            with torch.no_grad():
                flat = x.transpose(0, 1).reshape(x.shape[1], -1)
                self.loc.copy_(-flat.mean(1).view_as(self.loc))
                self.scale.copy_((1 / (flat.std(1) + 1e-6)).view_as(self.scale))
                self.initialized.fill_(1)
        logdet = x.shape[2] * x.shape[3] * torch.log(self.scale.abs()).sum()  # a scalar
        return self.scale * (x + self.loc), logdet

    def reverse(self, z: Tensor) -> Tensor:
        return z / self.scale - self.loc


class InvConv2dLU(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        q = torch.linalg.qr(torch.randn(channels, channels))[0]
        p, lower, upper = torch.linalg.lu(q)
        self.register_buffer("w_p", p)
        self.register_buffer("s_sign", torch.sign(torch.diagonal(upper)))
        self.w_l = nn.Parameter(lower)
        self.w_s = nn.Parameter(torch.diagonal(upper).abs().log())
        self.w_u = nn.Parameter(torch.triu(upper, 1))

    def weight(self) -> Tensor:
        eye = torch.eye(self.w_l.shape[0], dtype=self.w_l.dtype)
        upper = torch.triu(self.w_u, 1) + torch.diag(self.s_sign * torch.exp(self.w_s))
        return (self.w_p @ (torch.tril(self.w_l, -1) + eye) @ upper)[:, :, None, None]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return F.conv2d(x, self.weight()), x.shape[2] * x.shape[3] * self.w_s.sum()

    def reverse(self, z: Tensor) -> Tensor:
        return F.conv2d(z, torch.linalg.inv(self.weight()[:, :, 0, 0])[:, :, None, None])


class ZeroConv2d(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv.weight.data.zero_()
        self.conv.bias.data.zero_()
        self.scale = nn.Parameter(torch.zeros(1, cout, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) * torch.exp(self.scale * 3)


class AffineCoupling(nn.Module):
    def __init__(self, channels: int, hidden: int = 16, affine: bool = True) -> None:
        super().__init__()
        self.affine = affine
        out = channels if affine else channels // 2
        self.net = nn.Sequential(
            nn.Conv2d(channels // 2, hidden, 3, padding=1), nn.ReLU(), ZeroConv2d(hidden, out)
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        a, b = x.chunk(2, 1)
        if not self.affine:
            return torch.cat([a, b + self.net(a)], 1), None
        log_s, t = self.net(a).chunk(2, 1)
        s = torch.sigmoid(log_s + 2)
        return torch.cat([a, (b + t) * s], 1), torch.log(s).flatten(1).sum(1)

    def reverse(self, z: Tensor) -> Tensor:
        a, b = z.chunk(2, 1)
        if not self.affine:
            return torch.cat([a, b - self.net(a)], 1)
        log_s, t = self.net(a).chunk(2, 1)
        return torch.cat([a, b / torch.sigmoid(log_s + 2) - t], 1)


class Flow(nn.Module):
    """One step, no flow layer of its own: its ActNorm, 1x1 conv and coupling are."""

    def __init__(self, channels: int, affine: bool) -> None:
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.invconv = InvConv2dLU(channels)
        self.coupling = AffineCoupling(channels, affine=affine)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out, logdet = self.actnorm(x)
        out, det1 = self.invconv(out)
        out, det2 = self.coupling(out)
        logdet = logdet + det1
        return out, logdet if det2 is None else logdet + det2


class Block(nn.Module):
    def __init__(self, channels: int, steps: int, split: bool, affine: bool) -> None:
        super().__init__()
        self.flows = nn.ModuleList(Flow(4 * channels, affine) for _ in range(steps))
        self.split = split
        self.prior = (
            ZeroConv2d(2 * channels, 4 * channels) if split else ZeroConv2d(4 * channels, 8 * channels)
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        out, logdet = _squeeze(x), 0
        for flow in self.flows:
            out, det = flow(out)
            logdet = logdet + det
        if self.split:
            out, z_new = out.chunk(2, 1)
            mean, log_sd = self.prior(out).chunk(2, 1)
        else:
            z_new = out
            mean, log_sd = self.prior(torch.zeros_like(out)).chunk(2, 1)
        return out, logdet, _gaussian_log_p(z_new, mean, log_sd).flatten(1).sum(1), z_new


class TupleGlow(nn.Module):
    """`model(x) -> (log p of the latents, total log-det, latents)`, as rosinality's Glow."""

    def __init__(self, channels: int = 1, levels: int = 2, steps: int = 2, affine: bool = True) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        for level in range(levels):
            self.blocks.append(Block(channels, steps, split=level < levels - 1, affine=affine))
            channels *= 2

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        log_p, logdet, out, latents = 0, 0, x, []
        for block in self.blocks:
            out, det, block_log_p, z = block(out)
            latents.append(z)
            logdet, log_p = logdet + det, log_p + block_log_p
        return log_p, logdet, latents  # type: ignore[return-value]


# --- transformer convention (TarFlow style) ------------------------------------------------------


def _normed(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    """LayerNorm in its parameters' dtype (float32 under bf16 autocast), back in x's: TarFlow's way."""
    return norm(x.to(norm.weight.dtype)).type(x.dtype)


class Attention(nn.Module):
    def __init__(self, channels: int, heads: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        h = _normed(self.norm, x)
        q, k, v = self.qkv(h).reshape(b, t, 3 * self.heads, -1).transpose(1, 2).chunk(3, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class AttentionBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.attention = Attention(channels)
        self.norm = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(
            nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(x)
        return x + self.mlp(_normed(self.norm, x))


class MetaBlock(nn.Module):
    """One autoregressive affine flow over the tokens: z_t = (x_t - b(x_<t)) · exp(-a(x_<t)).

    `logdet`: "mean" (TarFlow's per-dimension mean, (B,)), "token" ((B, T)) or "element" ((B, T, D));
    `extra`: also return a third item, as blocks that return attention statistics do."""

    def __init__(
        self, dim: int, channels: int, tokens: int, flip: bool, logdet: str = "mean", extra: bool = False
    ) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, channels)
        self.pos = nn.Parameter(torch.randn(tokens, channels) * 0.02)
        self.layers = nn.ModuleList([AttentionBlock(channels)])
        self.proj_out = nn.Linear(channels, 2 * dim)
        self.flip, self.logdet, self.extra = flip, logdet, extra

    def _params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.proj_in(x) + self.pos
        for layer in self.layers:
            h = layer(h)
        h = self.proj_out(h)
        h = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)  # token t sees tokens before t only
        return h.chunk(2, dim=-1)  # type: ignore[return-value]

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        x = x.flip(1) if self.flip else x
        xa, xb = self._params(x)
        z = (x - xb) * (-xa.float()).exp().type(xa.dtype)
        z = z.flip(1) if self.flip else z
        logdet = {"mean": lambda: -xa.mean(dim=(1, 2)), "token": lambda: -xa.sum(-1), "element": lambda: -xa}
        out = (z, logdet[self.logdet]())
        return (*out, xa.detach().abs().amax()) if self.extra else out

    def reverse(self, z: Tensor) -> Tensor:
        z = z.flip(1) if self.flip else z
        x = torch.zeros_like(z)
        for t in range(z.shape[1]):  # token t's parameters depend on tokens before it only
            xa, xb = self._params(x)
            x = x.clone()
            x[:, t] = z[:, t] * xa[:, t].exp() + xb[:, t]
        return x.flip(1) if self.flip else x


class TarFlow(nn.Module):
    """Patches of an image, through `blocks` MetaBlocks; returns (z, outputs, summed log-dets)."""

    def __init__(
        self,
        channels: int = 1,
        size: int = 4,
        patch: int = 2,
        width: int = 16,
        blocks: int = 2,
        **options: object,
    ) -> None:
        super().__init__()
        self.patch = patch
        tokens, dim = (size // patch) ** 2, channels * patch * patch
        self.blocks = nn.ModuleList(
            MetaBlock(dim, width, tokens, flip=i % 2 == 1, **options)  # type: ignore[arg-type]
            for i in range(blocks)
        )

    def patchify(self, x: Tensor) -> Tensor:
        return F.unfold(x, self.patch, stride=self.patch).transpose(1, 2)  # (B, T, C·p·p)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        x = self.patchify(x)
        outputs, logdets = [], torch.zeros((), device=x.device)
        for block in self.blocks:
            x, logdet = block(x)[:2]
            logdets = logdets + (logdet if logdet.dim() <= 1 else logdet.flatten(1).sum(1))
            outputs.append(x)
        return x, outputs, logdets


# --- builders ------------------------------------------------------------------------------------


def randomized(model: nn.Module, scale: float = 0.1, seed: int = 1) -> nn.Module:
    """Zero-initialized last layers make every coupling the identity: give them small random weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 0 and torch.count_nonzero(parameter) == 0:
                parameter.copy_(scale * torch.randn(parameter.shape, generator=gen, dtype=parameter.dtype))
    return model


def tuple_glow(affine: bool = True, **options: int) -> TupleGlow:
    return randomized(TupleGlow(affine=affine, **options).double())  # type: ignore[return-value]


def threaded_glow(noise: bool = True, **options: int) -> ThreadedGlow:
    settings = {"channels": 1, "levels": 2, "steps": 2, "hidden": 8}
    settings.update(options)
    return randomized(ThreadedGlow(noise=noise, **settings).double())  # type: ignore[return-value]


def tarflow(**options: object) -> TarFlow:
    return randomized(TarFlow(**options).double(), scale=0.3)  # type: ignore[return-value,arg-type]
