"""The stenosis grading network: slice-wise ResNet18 tokens from several volumes, one transformer.

This is the model of the reference paper (multi-view multimodal grading, section 2.1). Each slice
of each MRI volume around one intervertebral disc (IVD) is encoded by a single-channel 2D ResNet18
trained from scratch and shared by every view and sequence. Three embeddings, each a linear layer
on a one-hot code, are added to every slice embedding: slice order (position along the volume's
slice axis, ``max_slices`` = 9 positions), view (sagittal or axial) and IVD level (L1-L2..L5-S1).
A learnable class token is prepended to the flattened ``(B, M*S, d)`` slice tokens and the lot
goes through three transformer encoder layers with two heads; the class token's output feeds six
linear heads: five conditions by three grades, and the level (the auxiliary task).

Missing volumes and padded slices are never encoded: only the present slices are gathered and run
through the ResNet (so batch-norm statistics see only real slices) and the other tokens are
masked out of attention with ``src_key_padding_mask``. The class token is never masked.

Choices the paper leaves open:
- Feed-forward width ``4 * d`` (2048 at the paper's d = 512), the usual transformer ratio; at the
  paper width it equals PyTorch's default, and it scales with the narrower CPU configurations.
- Dropout 0.1 in the transformer layers (PyTorch's and ViT/BERT's default); none in the ResNet.
- Pre-norm layers (``norm_first=True``) plus a final LayerNorm on the class token output, as in
  ViT: the transformer is trained from scratch jointly with the CNN, and pre-norm trains stably
  without a learning-rate warm-up (Xiong et al. 2020). GELU activation, as in ViT.
- ResNet initialisation as torchvision's (Kaiming normal, fan-out); class token truncated
  normal with std 0.02, as in ViT.

The ablation of the paper's Table 2 (unimodal rows: "attention-aggregated slice embeddings as a
direct input to the classification layers") is ``GraderConfig(aggregate="attention")``: the same
tokens (with the added embeddings) are pooled by a learned score, ``Linear(d, 1)`` softmaxed over
the present slices, and the pooled vector goes to the same heads; there is no class token, no
transformer and no final norm.
"""

from __future__ import annotations

from collections.abc import Sequence

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.data.pathology import CONDITIONS, GRADES, LEVELS

__all__ = ["CONDITIONS", "GRADES", "LEVELS", "VIEWS", "GraderConfig", "ResNet18Encoder", "Grader"]

VIEWS: tuple[str, ...] = ("sagittal", "axial")  # index = the ``views`` code


@dataclass(frozen=True)
class GraderConfig:
    """Grader hyper-parameters; defaults are the paper's (embedding dim 8 * width = 512).

    ``ff`` is the transformer feed-forward width, ``None`` meaning ``4 * embed_dim``.
    """

    width: int = 64
    max_slices: int = 9
    layers: int = 3
    heads: int = 2
    ff: int | None = None
    dropout: float = 0.1
    aggregate: Literal["transformer", "attention"] = "transformer"

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"width must be positive, got {self.width}")
        if self.max_slices < 1:
            raise ValueError(f"max_slices must be positive, got {self.max_slices}")
        if self.layers < 1 or self.heads < 1 or self.embed_dim % self.heads:
            raise ValueError(f"layers ({self.layers}) and heads ({self.heads}) must be positive, "
                             f"heads must divide embed_dim {self.embed_dim}")
        if self.ff is not None and self.ff < 1:
            raise ValueError(f"ff must be positive or None, got {self.ff}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.aggregate not in ("transformer", "attention"):
            raise ValueError(f"aggregate must be 'transformer' or 'attention', got {self.aggregate!r}")

    @property
    def embed_dim(self) -> int:
        """Slice embedding size d: the ResNet's last stage width, 8 * width."""
        return 8 * self.width

    @property
    def feedforward(self) -> int:
        """Transformer feed-forward width."""
        return self.ff if self.ff is not None else 4 * self.embed_dim


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with batch norm and an identity/projection skip."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, cin, H, W) -> (N, cout, H / stride, W / stride)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class ResNet18Encoder(nn.Module):
    """Single-channel ResNet18 (layers [2, 2, 2, 2], widths w..8w) without its classifier."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages: list[nn.Module] = []
        cin = width
        for i, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.stages = nn.Sequential(*stages)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Slices (N, 1, H, W), H and W >= 32 -> embeddings (N, 8 * width) by global average pool."""
        return self.stages(self.stem(x)).mean(dim=(2, 3))


class Grader(nn.Module):
    """Grades the five stenosis conditions of one IVD from any set of its volumes (see module doc)."""

    def __init__(self, config: GraderConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or GraderConfig()
        d = config.embed_dim
        self.encoder = ResNet18Encoder(config.width)
        self.slice_embed = nn.Linear(config.max_slices, d)
        self.view_embed = nn.Linear(len(VIEWS), d)
        self.level_embed = nn.Linear(len(LEVELS), d)
        self.cls: nn.Parameter | None = None
        self.transformer: nn.TransformerEncoder | None = None
        self.norm: nn.LayerNorm | None = None
        self.pool_score: nn.Linear | None = None
        if config.aggregate == "transformer":
            self.cls = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, 1, d), std=0.02))
            layer = nn.TransformerEncoderLayer(
                d, config.heads, config.feedforward, config.dropout,
                activation="gelu", batch_first=True, norm_first=True,
            )
            self.transformer = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(d)
        else:
            self.pool_score = nn.Linear(d, 1)
        self.heads = nn.ModuleDict({name: nn.Linear(d, len(GRADES)) for name in CONDITIONS})
        self.heads["level"] = nn.Linear(d, len(LEVELS))

    def parameter_count(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward(
        self,
        volumes: torch.Tensor,
        present: torch.Tensor,
        views: torch.Tensor,
        levels: torch.Tensor,
        slice_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Logits per head: each condition (B, 3) in GRADES order and "level" (B, 5).

        ``volumes`` (B, M, S, H, W) float, S <= max_slices; ``present`` (B, M) bool; ``views``
        (B, M) long, 0 sagittal / 1 axial; ``levels`` (B,) long, index into LEVELS; ``slice_mask``
        (B, M, S) bool, False for padding slices (default all real). Every sample needs at least
        one present, real slice.
        """
        tokens, valid = self.tokens(volumes, present, views, levels, slice_mask)
        aggregate = self._transform if self.config.aggregate == "transformer" else self._pool
        pooled = aggregate(tokens, valid)  # (B, d)
        return {name: head(pooled) for name, head in self.heads.items()}

    def tokens(
        self,
        volumes: torch.Tensor,
        present: torch.Tensor,
        views: torch.Tensor,
        levels: torch.Tensor,
        slice_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Slice tokens (B, M*S, d) with the added embeddings, and their validity (B, M*S) bool.

        Only valid slices go through the encoder; invalid tokens hold just the added embeddings.
        """
        valid = self._validity(volumes, present, views, levels, slice_mask)
        b, m, s, h, w = volumes.shape
        index = valid.flatten().nonzero().squeeze(1)
        slices = volumes.reshape(b * m * s, 1, h, w).index_select(0, index)
        embedded = self.encoder(slices)  # (N, d)
        tokens = embedded.new_zeros(b * m * s, embedded.shape[1]).index_copy(0, index, embedded)
        tokens = tokens.view(b, m, s, -1)
        dtype = self.slice_embed.weight.dtype
        positions = torch.arange(s, device=volumes.device)
        order = self.slice_embed(F.one_hot(positions, self.config.max_slices).to(dtype))
        view = self.view_embed(F.one_hot(views, len(VIEWS)).to(dtype))
        level = self.level_embed(F.one_hot(levels, len(LEVELS)).to(dtype))
        tokens = tokens + order[None, None] + view[:, :, None] + level[:, None, None]
        return tokens.reshape(b, m * s, -1), valid.reshape(b, m * s)

    def _validity(
        self,
        volumes: torch.Tensor,
        present: torch.Tensor,
        views: torch.Tensor,
        levels: torch.Tensor,
        slice_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Check input shapes; (B, M, S) bool of the slices to encode."""
        if volumes.dim() != 5:
            raise ValueError(f"volumes must be (B, M, S, H, W), got shape {tuple(volumes.shape)}")
        b, m, s = volumes.shape[:3]
        if s > self.config.max_slices:
            raise ValueError(f"volumes has {s} slices, more than max_slices {self.config.max_slices}")
        if present.shape != (b, m) or views.shape != (b, m) or levels.shape != (b,):
            raise ValueError(f"present and views must be (B, M) = {(b, m)} and levels (B,), got "
                             f"{tuple(present.shape)}, {tuple(views.shape)}, {tuple(levels.shape)}")
        valid = present.bool()[:, :, None].expand(b, m, s)
        if slice_mask is not None:
            if slice_mask.shape != (b, m, s):
                raise ValueError(f"slice_mask must be (B, M, S) = {(b, m, s)}, got {tuple(slice_mask.shape)}")
            valid = valid & slice_mask.bool()
        if not bool(valid.flatten(1).any(1).all()):
            raise ValueError("every sample needs at least one present slice (present, slice_mask)")
        return valid

    def _transform(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Class token output (B, d) of the transformer over [CLS, tokens], invalid tokens masked."""
        assert self.cls is not None and self.transformer is not None and self.norm is not None
        b = tokens.shape[0]
        x = torch.cat([self.cls.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
        ignore = torch.cat([valid.new_zeros(b, 1), ~valid], dim=1)  # (B, 1 + M*S), True = masked
        return self.norm(self.transformer(x, src_key_padding_mask=ignore)[:, 0])

    def _pool(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Attention-weighted mean (B, d) of the valid tokens (the Table 2 unimodal ablation)."""
        assert self.pool_score is not None
        score = self.pool_score(tokens).squeeze(-1).float().masked_fill(~valid, float("-inf"))
        weight = score.softmax(dim=1).to(tokens.dtype)
        return torch.einsum("bl,bld->bd", weight, tokens)


SLOT_VIEWS = (0, 0, 1)  # input slots T1 sagittal, T2/STIR sagittal, T2 axial -> view 0 sagittal, 1 axial


def prepare_inputs(volumes: np.ndarray, present: np.ndarray, levels: np.ndarray, slots: Sequence[int], size: tuple[int, int], device: torch.device) -> dict[str, torch.Tensor]:
    """The model's inputs from slot arrays (discs, 3, S, H, W): the chosen slots, slices resized to
    ``size`` on the device, presence, views and levels. Training and inference both use it."""
    chosen = list(slots)
    vol = torch.from_numpy(np.ascontiguousarray(volumes[:, chosen], dtype=np.float32)).to(device)
    b, m, s, h, w = vol.shape
    if (h, w) != tuple(size):
        vol = torch.nn.functional.interpolate(vol.reshape(b * m, s, h, w), size=tuple(size), mode="bilinear", align_corners=False).reshape(b, m, s, *size)
    return {
        "volumes": vol,
        "present": torch.from_numpy(np.ascontiguousarray(present[:, chosen])).to(device),
        "views": torch.tensor([[SLOT_VIEWS[k] for k in chosen]] * b, device=device),
        "levels": torch.as_tensor(np.asarray(levels, dtype=np.int64), device=device),
    }
