"""AEGAN-AD's networks: the DCGAN autoencoder generator, the WGAN critic and its gradient penalty.

Published sizes with ``channels=32`` and LayerNorm: generator 10.78 M parameters,
discriminator 3.30 M (see the family README for the layer list).
"""

from __future__ import annotations

import torch
from torch import nn

WINDOW = 128  # frames per window = mel bins: the conv pyramid maps 128x128 to 4x4
N_DOWN = 5  # stride-2 blocks: 128 -> 4


def _norm(kind: str, channels: int, size: int) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm([channels, size, size])
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class ConvPyramid(nn.Module):
    """(N, 1, 128, 128) -> (N, 16·channels, 4, 4): five Conv2d 4x4/s2/p1 + norm + LeakyReLU."""

    def __init__(self, channels: int, norm: str):
        super().__init__()
        layers, c_in, size = [], 1, WINDOW
        for i in range(N_DOWN):
            c_out, size = channels * 2 ** i, size // 2
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=norm == "none"), _norm(norm, c_out, size),
                       nn.LeakyReLU(0.2)]
            c_in = c_out
        self.net = nn.Sequential(*layers)
        self.out_channels = c_in

    def forward(self, x):
        return self.net(x)


class Generator(nn.Module):
    """Autoencoder: encoder (pyramid + 4x4 conv to latent x 1 x 1), mirrored decoder."""

    def __init__(self, channels: int, latent_dim: int, norm: str):
        super().__init__()
        pyramid = ConvPyramid(channels, norm)
        self.encoder = nn.Sequential(pyramid, nn.Conv2d(pyramid.out_channels, latent_dim, 4, 1, 0,
                                                        bias=norm == "none"))
        layers, c_in, size = [], latent_dim, 1
        for i in reversed(range(N_DOWN)):
            c_out = channels * 2 ** i
            first = i == N_DOWN - 1  # latent 1x1 -> 4x4, then doubling
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 1 if first else 2, 0 if first else 1, bias=norm == "none"),
                       _norm(norm, c_out, 4 if first else size * 2), nn.ReLU()]
            size = 4 if first else size * 2
            c_in = c_out
        layers += [nn.ConvTranspose2d(c_in, 1, 4, 2, 1, bias=norm == "none"), nn.Tanh()]
        self.decoder = nn.Sequential(*layers)

    def encode(self, x):
        return self.encoder(x)

    def forward(self, x):
        return self.decoder(self.encoder(x))


class Discriminator(nn.Module):
    """WGAN critic: pyramid -> depthwise 4x4 conv (512-d embedding) -> LayerNorm -> LeakyReLU -> Linear."""

    def __init__(self, channels: int, norm: str):
        super().__init__()
        self.pyramid = ConvPyramid(channels, norm)
        dim = self.pyramid.out_channels
        self.depthwise = nn.Conv2d(dim, dim, 4, 1, 0, groups=dim, bias=norm == "none")
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.LeakyReLU(0.2), nn.Linear(dim, 1))
        self.embedding_dim = dim

    def embed(self, x):
        return self.depthwise(self.pyramid(x)).flatten(1)

    def forward(self, x):
        return self.head(self.embed(x)).squeeze(1)


def dcgan_init(module: nn.Module) -> None:
    """DCGAN initialisation (N(0, 0.02) convs, N(1, 0.02) norm scales), as GAN code does."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
    """WGAN-GP: mean over samples of (||grad_x critic(x_hat)||_2 - 1)^2 at the interpolates
    x_hat = eps·real + (1 - eps)·fake, eps ~ U(0, 1) per sample (or given, shape (N,))."""
    real, fake = real.detach(), fake.detach()
    if eps is None:
        eps = torch.rand(real.shape[0], device=real.device, dtype=real.dtype)
    eps = eps.view(-1, *([1] * (real.dim() - 1)))
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    out = critic(x_hat)
    # create_graph: the penalty is itself differentiated when the critic steps.
    grad, = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
