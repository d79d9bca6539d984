"""MemoryMamba: a memory-augmented 2D state-space backbone for defect images.

Wang, Hu, Zhou, "MemoryMamba: Memory-Augmented State Space Model for Defect
Recognition", arXiv 2405.03673 (2024); code: github.com/Mamba-Hub-CV/MemoryMamba.

Architecture (VMamba layout, channels-last (B, H, W, C) inside)::

    image [0,1] -> normalise -> patch embedding (conv 4x4 stride 4, LayerNorm)
      -> 4 stages of Mem-SSM blocks, patch merging between them
         (2x2 neighbourhood concat -> LayerNorm -> Linear 4C -> 2C)
      -> LayerNorm -> global average pool -> MLP head -> logits (softmax at export)

Mem-SSM block (the paper's equations; our reading where the text leaves a choice)::

    Z   = Linear(LN(X))                                           (B, H, W, C)
    coarse memory (CMN, global):  q_c = MLP(Pool(DWConv(Z)))      one query per image
                                  a_c = softmax(q_c K_c^T / sqrt(d)),  m_c = a_c V_c  (c slots)
    fine memory (FMN, local):     q_f = MLP(DWConv(Z))            one query per position
                                  a_f = softmax(q_f K_f^T / sqrt(d)),  m_f = a_f V_f  (f slots)
    fusion:  s_c = sim(Pool(Z), m_c),  s_f = sim(Pool(Z), Pool(m_f))
             Z'  = Z + s_c * Expand(m_c) + s_f * m_f              (sim: cosine | l1 | l2)
    X   = X + LN(SS2D(Z'))                                        (4-direction selective scan)
    X   = X + MLP(LN(X))                                          (the block's closing Linear layers)

Ablations (paper Table 6): ``use_coarse=false`` (w/o CMN), ``use_fine=false`` (w/o FMN),
``use_fusion=false`` (w/o fusion: memories are added to Z unweighted).

Losses: L = CE + lambda_c * L_c + lambda_f * L_f, averaged over blocks:

* L_c, contrastive on the coarse query vectors (paper): for pairs of items in the batch
  with cosine distance d = 1 - cos(q_i, q_j), same class: d^2, different classes:
  max(0, margin - d)^2; the two kinds are averaged separately and added, so a batch
  dominated by one class still pushes the others apart.
* L_f, InfoNCE between the pooled Z and the pooled fine memory read-out (paper:
  mutual-information maximisation; negatives are the other items of the batch),
  symmetric, on L2-normalised vectors at ``temperature``.

Where the published code differs, and what we follow:

* its coarse and fine memories are identical modules (1x1 conv -> pool -> key matmul);
  we follow the paper (global vs. per-position queries through conv -> MLP);
* its InfoNCE compares two depthwise-separable projections (before/after the memory) at
  temperature 0.5 with no normalisation, scales every block's loss by 0.05 and clamps it to
  [0, 3], and it has no contrastive loss; we keep its temperature 0.5 (``temperature``)
  and use the paper's two losses with weights ``lambda_c``/``lambda_f``;
* its fusion multiplies a 1x1 conv of concat(Z, memory) by the similarity and adds
  0.1x of it; we follow the paper (similarity-weighted memory vectors added to Z);
* its memories sit inside SS2D (after the depthwise conv); ours sit before the SS2D
  module of edgediag.nn.mamba, on the block's own input projection, as in the paper's
  block diagram.

Training from scratch (no pretrained weights here): the LayerNorm after SS2D starts with
zero gain, so every block starts as the identity (at unit gain the network stays at chance),
and the edge variants embed patches with a BatchNorm conv stem (``stem="convbn"``), without
which the blocks memorise a small training set instead of generalising.

``memorymamba_t`` reproduces the released model size (49.68 M parameters with 10 classes,
50.44 M with 1000); README.md derives the block internals from it.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn import functional as F

from edgediag.errors import UserError
from edgediag.models import register_model
from edgediag.models.image_cnn.model import BasicBlock, ImageClassifier, ImageClassifierConfig
from edgediag.nn.depth import present, remove_blocks
from edgediag.nn.depthwise import depthwise_conv_cl
from edgediag.nn.mamba import SS2D


@dataclasses.dataclass
class MemoryMambaConfig(ImageClassifierConfig):
    image_size: int = 224
    depths: list[int] = dataclasses.field(default_factory=lambda: [2, 2, 5, 2])
    dims: list[int] = dataclasses.field(default_factory=lambda: [96, 192, 384, 768])
    patch_size: int = 4  # side of the patches the stem embeds (paper: 4)
    # patch: one conv patch x patch, stride patch (paper) | conv: two conv 3x3 stride 2 with
    # LayerNorm (released code; patch 4) | convbn: log2(patch) conv 3x3 stride 2 with
    # BatchNorm + ReLU (the stem that generalises from scratch, see ConvBNStem)
    stem: str = "patch"
    # convbn only: residual BasicBlocks after each strided conv of the stem but the first
    # (at half the input size they would cost 4x the others); 0 = strided convs alone
    stem_blocks: int = 0
    stem_width: int = 0  # convbn only: width of the stem's inner convs; 0 = dims[0] // 2
    d_state: int = 1  # SSM state size (the released tiny model uses 1)
    ssm_expand: float = 2.0  # SS2D inner width = ssm_expand * C
    d_conv: int = 3
    mlp_ratio: float = 4.0  # the block's closing MLP: C -> ratio*C -> C (0 = none)
    mem_mlp_ratio: float = 2.0  # query MLPs of the memories: C -> ratio*C -> key dim
    mem_key_dim: int = 0  # 0 = the block's width C
    coarse_slots: int = 12  # c: memory size of the coarse-grained network
    fine_slots: int = 12  # f: memory size of the fine-grained network
    use_coarse: bool = True  # False = ablation "w/o CMN"
    use_fine: bool = True  # False = ablation "w/o FMN"
    use_fusion: bool = True  # False = ablation "w/o fusion" (unweighted addition)
    similarity: str = "cosine"  # cosine | l1 | l2 (paper's ablation)
    head_hidden: int = 0  # hidden width of the MLP head; 0 = one linear layer (released model)
    head_dropout: float = 0.0
    drop_path: float = 0.2  # stochastic depth, linearly increasing over the blocks
    lambda_c: float = 0.1  # weight of the coarse contrastive loss
    lambda_f: float = 0.1  # weight of the fine InfoNCE loss
    margin: float = 0.5  # contrastive margin on the cosine distance
    temperature: float = 0.5  # InfoNCE temperature (the released code's 0.5)
    scan_backend: str = "auto"  # see edgediag.ops.selective_scan
    # Depth pruning (--remove-blocks): Mem-SSM blocks removed, by module path.
    removed_blocks: list[str] = dataclasses.field(default_factory=list)


# --- building blocks -----------------------------------------------------------------
class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample while training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out or dim))


class MemoryNetwork(nn.Module):
    """conv -> MLP -> query vectors -> softmax attention over memory slots -> memory vectors.

    ``local=False`` (coarse): one query per image from the pooled features, m (B, C).
    ``local=True`` (fine): one query per position, m (B, H, W, C).
    """

    def __init__(self, dim: int, slots: int, key_dim: int, hidden: int, local: bool):
        super().__init__()
        self.local = local
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)  # depthwise: local context per channel
        self.query = Mlp(dim, hidden, key_dim)
        self.keys = nn.Parameter(torch.randn(slots, key_dim) * key_dim ** -0.5)
        # Small values: at initialisation the memories barely perturb Z (a near-identity block).
        self.values = nn.Parameter(torch.randn(slots, dim) * 0.02)
        self.scale = key_dim ** -0.5

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = depthwise_conv_cl(self.conv, z)
        if not self.local:
            feats = feats.mean(dim=(1, 2))
        q = self.query(feats)
        attn = torch.softmax((q @ self.keys.t()) * self.scale, dim=-1)
        return attn @ self.values, q


def similarity(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """Similarity of (B, C) vectors -> (B,). Distances map to (0, 1] as 1 / (1 + d), with
    d the mean absolute (l1) or root-mean-square (l2) difference, so the weights do not
    grow with the width C."""
    if kind == "cosine":
        return F.cosine_similarity(a, b, dim=-1, eps=1e-6)
    if kind == "l1":
        return 1.0 / (1.0 + (a - b).abs().mean(dim=-1))
    return 1.0 / (1.0 + (a - b).pow(2).mean(dim=-1).add(1e-12).sqrt())


class MemSSMBlock(nn.Module):
    """One Mem-SSM block; ``forward`` returns (X, aux) with the vectors the losses need."""

    def __init__(self, dim: int, cfg: MemoryMambaConfig, drop_path: float):
        super().__init__()
        self.similarity = cfg.similarity
        self.use_fusion = cfg.use_fusion
        key_dim = cfg.mem_key_dim or dim
        hidden = max(1, int(round(cfg.mem_mlp_ratio * dim)))
        self.norm = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, dim)
        self.coarse = MemoryNetwork(dim, cfg.coarse_slots, key_dim, hidden, local=False) if cfg.use_coarse else None
        self.fine = MemoryNetwork(dim, cfg.fine_slots, key_dim, hidden, local=True) if cfg.use_fine else None
        self.ssm = SS2D(dim, d_state=cfg.d_state, d_conv=cfg.d_conv, d_inner=int(round(cfg.ssm_expand * dim)),
                        scan_backend=cfg.scan_backend)
        self.ssm_norm = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path)
        self.mlp = None
        if cfg.mlp_ratio > 0:
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = Mlp(dim, int(round(cfg.mlp_ratio * dim)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = self.in_proj(self.norm(x))
        pooled = z.mean(dim=(1, 2))
        aux = {"z": pooled}
        fused = z
        if self.coarse is not None:
            m_c, aux["q_c"] = self.coarse(z)
            w_c = similarity(pooled, m_c, self.similarity)[:, None] if self.use_fusion else 1.0
            fused = fused + (w_c * m_c)[:, None, None, :]
        if self.fine is not None:
            m_f, _ = self.fine(z)
            aux["m_f"] = m_f.mean(dim=(1, 2))
            w_f = similarity(pooled, aux["m_f"], self.similarity)[:, None, None, None] if self.use_fusion else 1.0
            fused = fused + w_f * m_f
        x = x + self.drop_path(self.ssm_norm(self.ssm(fused)))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, aux


class ConvStem(nn.Module):
    """The released code's patch embedding ("v2"): two overlapping 3x3 convs of stride 2
    (LayerNorm + GELU between) instead of one 4x4 patchify conv: a locality prior that
    helps when training from scratch on a few hundred images."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1)
        self.norm1 = nn.LayerNorm(dim // 2)
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(self.conv1(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv2(F.gelu(h))


class ConvBNStem(nn.Sequential):
    """log2(patch) conv 3x3 stride 2 -> BatchNorm -> ReLU layers (the convolutional stem of
    Xiao et al., "Early Convolutions Help Transformers See Better", 2021), widths ``width``
    (default C/2) ... C.

    From scratch on a few hundred defect images it is what lets the Mem-SSM stack
    generalise instead of memorising. Synthetic defects at 64 px, 3000 steps: test accuracy
    0.47 against 0.17 for the patch stem and 0.19 for the released LayerNorm-GELU conv stem,
    at the same 0.86-0.92 training accuracy. Magnetic tiles: macro-F1 0.53 against 0.14
    (README.md). A plausible reason, not measured: BatchNorm keeps each
    position's contrast against the image (a pit, a scratch), which per-token LayerNorm on
    narrow maps normalises away. It folds into the convs at export.

    With ``blocks``, residual BasicBlocks (``image_cnn``'s) follow every strided conv but the
    first (at 1/2 of the image they would cost 4x the rest): texture features at 1/4 and 1/8
    before the scan. NEU-like set, nano at 64 px, 60 epochs: test accuracy 0.889 without,
    0.973 with one block each at width 40; 0.936 at width 16, 0.958 with a block at 1/2 too.
    """

    def __init__(self, in_chans: int, dim: int, patch: int, blocks: int = 0, width: int = 0):
        layers, c = [], in_chans
        n = int(math.log2(patch))
        for i in range(n):
            out = dim if i == n - 1 else (width or dim // 2)
            layers += [nn.Conv2d(c, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            layers += [BasicBlock(out, out, 1) for _ in range(blocks if i > 0 else 0)]
            c = out
        super().__init__(*layers)


class PatchMerging(nn.Module):
    """VMamba's downsampling: 2x2 neighbours concatenated -> LayerNorm -> Linear 4C -> 2C."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


# --- the model -----------------------------------------------------------------------
_EDGE = {"stem": "convbn", "d_state": 1, "mem_mlp_ratio": 1.0, "coarse_slots": 4, "fine_slots": 4, "lambda_c": 0.1, "lambda_f": 0.1}


@register_model("memorymamba", variants={
    # The published configuration (released code, vssm_tiny): 224 px, 96 -> 768.
    "memorymamba_t": {},
    # Edge variants, trained from scratch on a CPU in minutes. Memory size 4 is the
    # paper's best coarse memory size (Aluminum).
    # nano downsamples 8x: a quarter of the scan length of the paper's 4x. 64 px (8x8
    # tokens; 128 px until issue 24): 4x fewer pixels per step, test accuracy on the
    # NEU-like set 0.91 (64 px, 100 epochs) against 0.86 (128 px, 40 epochs) in less time
    # (README.md "Training throughput"). Both take the BatchNorm conv stem, without which
    # they do not generalise from scratch. nano's stem also has a residual block at 16x16
    # (40 channels) and at 8x8: 0.973 on the NEU-like set in 60 epochs, where the plain stem
    # stayed at 0.90 whatever the recipe (issue 24). Label smoothing 0.1: 0.982 / 0.987 /
    # 0.969 on three seeds against 0.978 / 0.976 / 0.964 without.
    "memorymamba_nano": {**_EDGE, "image_size": 64, "patch_size": 8, "depths": [1, 1, 2, 1],
                         "dims": [32, 64, 128, 256], "mlp_ratio": 2.0, "drop_path": 0.05,
                         "stem_blocks": 1, "stem_width": 40, "label_smoothing": 0.1},
    "memorymamba_micro": {**_EDGE, "image_size": 160, "depths": [1, 2, 3, 1], "dims": [32, 64, 128, 256],
                          "mlp_ratio": 4.0, "drop_path": 0.1},
})
class MemoryMamba(ImageClassifier):
    """MemoryMamba classifier (see the module docstring for the equations and losses)."""

    Config = MemoryMambaConfig
    # The paper fine-tunes ImageNet weights with Adam, lr 2e-5, weight decay 0.01, 10 epochs,
    # 5 % warm-up then linear decay, batch 64. Nothing can be downloaded here, so training
    # is from scratch: a 50x larger learning rate with AdamW, stronger weight decay and
    # thousands of steps (at a tenth of them every model here stayed at always-Free).
    # Batches of 64 (16 until issue 24, then 32): on two cores an item costs 0.78x what it
    # does in batches of 32, and lr 2e-3 keeps lr/batch as it was. 70 epochs of the 1,080
    # NEU-like training images: 1,120 steps (the stem's residual blocks learn faster than the
    # plain stem, which needed 100 epochs and stayed at 0.90). README.md has the runs.
    train_defaults = {"epochs": 70, "batch_size": 64, "lr": 2e-3, "weight_decay": 0.05, "optimizer": "adamw",
                      "warmup": 0.05, "schedule": "linear", "grad_clip": 1.0}
    # prune's defaults (README.md "Pruning"): at batch 1 its time is mostly per-operator
    # cost, so four of the five Mem-SSM blocks go first (three until the stem's residual
    # blocks, which it keeps: eager x1.82 with three, x2.41 with four), then channels to half
    # the parameters (widths multiples of 8: the scan's channel lanes for d_state 1); 6 epochs
    # with distillation
    prune_recipe = {"ratio": 0.5, "round_to": 8, "remove_blocks": 4, "finetune_epochs": 6, "distill": 1.0}

    def __init__(self, config: MemoryMambaConfig):
        super().__init__(config)
        c = config
        if not c.dims or len(c.dims) != len(c.depths) or min(c.depths) < 1:
            raise UserError("memorymamba: dims and depths need the same (non-zero) length, depths >= 1")
        if c.similarity not in ("cosine", "l1", "l2"):
            raise UserError(f"memorymamba: similarity must be cosine, l1 or l2, not {c.similarity!r}")
        stride = c.patch_size * 2 ** (len(c.dims) - 1)
        if c.image_size % stride:
            raise UserError(f"memorymamba: image_size {c.image_size} must be a multiple of {stride} "
                            f"(patch {c.patch_size}, {len(c.dims) - 1} patch mergings)")
        if (c.use_coarse and c.coarse_slots < 1) or (c.use_fine and c.fine_slots < 1):
            raise UserError("memorymamba: memory sizes (coarse_slots, fine_slots) must be >= 1")
        if c.stem_blocks < 0 or c.stem_width < 0 or ((c.stem_blocks or c.stem_width) and c.stem != "convbn"):
            raise UserError(f"memorymamba: stem_blocks and stem_width are for stem 'convbn' and must be >= 0 "
                            f"(got {c.stem_blocks}, {c.stem_width} with stem {c.stem!r})")
        if c.stem == "patch":
            self.patch_embed = nn.Conv2d(c.in_chans, c.dims[0], c.patch_size, stride=c.patch_size)
        elif c.stem == "conv" and c.patch_size == 4:
            self.patch_embed = ConvStem(c.in_chans, c.dims[0])
        elif c.stem == "convbn" and c.patch_size >= 2 and c.patch_size & (c.patch_size - 1) == 0:
            self.patch_embed = ConvBNStem(c.in_chans, c.dims[0], c.patch_size, c.stem_blocks, c.stem_width)
        else:
            raise UserError(f"memorymamba: stem must be patch, conv (patch_size 4) or convbn (patch_size a "
                            f"power of two), not {c.stem!r} with patch_size {c.patch_size}")
        self.embed_norm = nn.LayerNorm(c.dims[0])
        n_blocks = sum(c.depths)
        rates = [c.drop_path * i / max(1, n_blocks - 1) for i in range(n_blocks)]  # linear in depth
        self.stages = nn.ModuleList()
        self.merges = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(c.dims, c.depths)):
            start = sum(c.depths[:i])
            self.stages.append(nn.ModuleList(MemSSMBlock(dim, c, rates[start + j]) for j in range(depth)))
            self.merges.append(PatchMerging(dim, c.dims[i + 1]) if i + 1 < len(c.dims) else nn.Identity())
        self.norm = nn.LayerNorm(c.dims[-1])
        head = [nn.Dropout(c.head_dropout)] if c.head_dropout else []
        if c.head_hidden:
            head += [nn.Linear(c.dims[-1], c.head_hidden), nn.GELU(), nn.Linear(c.head_hidden, c.n_classes)]
        else:
            head += [nn.Linear(c.dims[-1], c.n_classes)]
        self.head = nn.Sequential(*head)
        self.apply(self._init_weights)
        for blocks in self.stages:
            for block in blocks:
                # Zero-init residual: the paper's LayerNorm after SS2D would otherwise add a
                # unit-variance branch in every block from the first step, burying the input
                # signal under random features; with a zero gain each block starts as the
                # identity (as ResNets zero their last BatchNorm). From scratch this is the
                # difference between learning and staying at chance (README.md).
                nn.init.zeros_(block.ssm_norm.weight)
        remove_blocks(self, c.removed_blocks)
        self.apply_pruned_widths()

    def pruning_fixed_layers(self) -> list[nn.Module]:
        """Every layer that writes the residual stream (its width is each stage's ``dims``
        entry) and the head: structured pruning keeps the stream and prunes inside the
        blocks - SS2D's inner channels, the MLP and memory-network hidden units. (The
        stream runs channels-last through LayerNorms, memory read-outs and 2x2 patch
        merging, which torch-pruning's index mapping does not follow.)"""
        fixed: list[nn.Module] = [self.patch_embed, self.embed_norm, self.norm, self.head]
        for blocks, merge in zip(self.stages, self.merges):
            fixed.append(merge)
            for _, b in present(blocks):
                fixed += [b.norm, b.in_proj, b.ssm, b.ssm_norm]
                fixed += [m for m in (b.coarse, b.fine) if m is not None]
                if b.mlp is not None:
                    fixed += [b.norm2, b.mlp[2]]
        return fixed

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # VMamba's initialisation of linear layers; SS2D's own parameters (dt, A, D) keep theirs.
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """[0, 1] images -> (logits, per-block auxiliary vectors for the memory losses)."""
        h = self.patch_embed(self.normalize(x)).permute(0, 2, 3, 1)
        h = self.embed_norm(h)
        aux = []
        for blocks, merge in zip(self.stages, self.merges):
            for _, block in present(blocks):
                h, a = block(h)
                aux.append(a)
            h = merge(h)
        return self.head(self.norm(h).mean(dim=(1, 2))), aux

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]

    def removable_blocks(self) -> list[str]:
        """Every Mem-SSM block (residual: X + SS2D branch + MLP branch); a stage may lose all
        of its blocks and keep its patch merging."""
        return [f"stages.{i}.{j}" for i, blocks in enumerate(self.stages) for j, _ in present(blocks)]

    # --- losses --------------------------------------------------------------------
    def coarse_contrastive(self, q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Pull the coarse queries of one class together, push other classes' apart to at
        least ``margin`` cosine distance."""
        qn = F.normalize(q.float(), dim=-1)
        dist = 1.0 - qn @ qn.t()
        same = (y[:, None] == y[None, :]).float()
        off_diag = 1.0 - torch.eye(len(y), device=q.device)
        pos, neg = same * off_diag, (1.0 - same)
        pull = (pos * dist.pow(2)).sum() / pos.sum().clamp(min=1)
        push = (neg * F.relu(self.config.margin - dist).pow(2)).sum() / neg.sum().clamp(min=1)
        return pull + push

    def fine_infonce(self, z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE: each item's pooled Z must pick its own fine memory read-out
        among the batch's (the other items are the negatives)."""
        a, b = F.normalize(z.float(), dim=-1), F.normalize(m.float(), dim=-1)
        logits = a @ b.t() / self.config.temperature
        target = torch.arange(len(a), device=a.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))

    def training_step(self, batch: dict, phase: str = "main") -> dict[str, torch.Tensor]:
        x = batch["x"]
        y = torch.as_tensor(batch["y"], device=x.device)
        logits, aux = self.forward_features(x)
        ce = self.classification_loss(logits, y)
        zero = logits.new_zeros(())
        l_c = torch.stack([self.coarse_contrastive(a["q_c"], y) for a in aux]).mean() \
            if self.config.use_coarse and aux else zero
        l_f = torch.stack([self.fine_infonce(a["z"], a["m_f"]) for a in aux]).mean() \
            if self.config.use_fine and aux and len(y) > 1 else zero
        loss = ce + self.config.lambda_c * l_c + self.config.lambda_f * l_f
        return {"loss": loss, "ce": ce.detach(), "l_coarse": l_c.detach(), "l_fine": l_f.detach(),
                "acc": (logits.argmax(-1) == y).float().mean()}
