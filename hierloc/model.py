"""The HierLoc model: an image branch and an entity branch meeting in one space.

Image branch (HIERLOC.md section 3): u = MLP_img(phi) (two linear layers, GELU and
Dropout after the first), delta = W u + b in R^d, Z = exp_o(alpha_img * delta).

Entity branch (section 4): each entity has frozen features [Img_i | Coords_i]
(mean backbone feature of its training images, and a trainable spherical
location encoding of its lat/lon); f_e maps them to a tangent vector delta_i and,
with the per-entity anchor A_i on the manifold,
H_i = exp_o(log_o(A_i) + alpha_node * delta_i).

The cross-modal attention of section 5 and the text feature Text_i are not in this
model yet (see README, "Model: what is and is not implemented").

``geometry="euclidean"`` is the paper's ablation: the same networks, but points
are the tangent vectors themselves and distances are Euclidean.
"""

from __future__ import annotations

import math
from typing import Literal

import geoopt
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from hierloc import lorentz
from hierloc.geo import latlon_to_unit

Geometry = Literal["lorentz", "euclidean"]


class ModelConfig(BaseModel):
    """Sizes and geometry of the model. Sizes are GAPs in the paper: see README."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dim: int = Field(128, ge=2, le=4096, description="d: hyperbolic dimension (points live in R^(d+1))")
    hidden: int = Field(512, ge=8, le=16384, description="width of the image and entity MLPs")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    geometry: Geometry = Field("lorentz", description="lorentz (HierLoc) or euclidean (ablation)")
    curvature: float = Field(1.0, gt=0.0, le=100.0, description="K of geoopt's Lorentz(k=K); curvature is -1/K")
    coord_freqs: int = Field(64, ge=1, le=1024, description="random Fourier frequencies per scale, location encoder")
    coord_scales: tuple[float, ...] = Field((1.0, 4.0, 16.0, 64.0), min_length=1)
    anchors: bool = Field(True, description="per-entity anchors A_i (the paper summary's variant)")

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


class FeatureNorm(nn.Module):
    """Standardise frozen backbone features with statistics of the training set."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float())
        # Constant feature dimensions would divide by zero: floor the std.
        self.register_buffer("std", std.float().clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


class LocationEncoder(nn.Module):
    """Trainable spherical location encoder: (lat, lon) degrees (..., 2) -> (..., out_dim).

    Random Fourier features of the unit vector at several fixed scales (fixed,
    seeded), followed by a trainable two-layer MLP.
    """

    def __init__(self, out_dim: int, freqs: int, scales: tuple[float, ...], seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        b = torch.cat([torch.randn(3, freqs, generator=g) * s for s in scales], dim=1)
        self.register_buffer("b", b)
        self.mlp = nn.Sequential(nn.Linear(2 * b.shape[1], out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, latlon_deg: torch.Tensor) -> torch.Tensor:
        xyz = latlon_to_unit(latlon_deg[..., 0], latlon_deg[..., 1])
        proj = xyz.float() @ self.b
        return self.mlp(torch.cat([proj.sin(), proj.cos()], dim=-1))


class HierLocModel(nn.Module):
    """Image and entity encoders into one Lorentz (or Euclidean) space.

    Args:
        cfg: ModelConfig.
        feat_mean, feat_std: (D,) statistics of training image features.
        entity_img_feat: (N, D) mean training-image feature per entity (Img_i).
        entity_latlon_deg: (N, 2) entity coordinates.
        level_sizes: entities per level, coarse to fine; rows of the entity
            tensors are ordered by level, then by index within the level.
        parent_index: (N,) row of each entity's parent (-1 for the top level).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        feat_mean: torch.Tensor,
        feat_std: torch.Tensor,
        entity_img_feat: torch.Tensor,
        entity_latlon_deg: torch.Tensor,
        level_sizes: list[int],
        parent_index: torch.Tensor,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        d_img = feat_mean.shape[0]
        n = sum(level_sizes)
        if entity_img_feat.shape != (n, d_img) or entity_latlon_deg.shape != (n, 2):
            raise ValueError(
                f"entity tensors must be ({n}, {d_img}) and ({n}, 2), got "
                f"{tuple(entity_img_feat.shape)} and {tuple(entity_latlon_deg.shape)}"
            )
        self.level_sizes = list(level_sizes)
        self.register_buffer("level_offsets", torch.tensor(np.cumsum([0, *level_sizes]), dtype=torch.long))
        self.register_buffer("parent_index", parent_index.long())
        self.register_buffer("entity_img_feat", entity_img_feat.float())
        self.register_buffer("entity_latlon_deg", entity_latlon_deg.float())
        self.register_buffer("curvature", torch.tensor(float(cfg.curvature)))
        self.norm = FeatureNorm(feat_mean, feat_std)

        h, d = cfg.hidden, cfg.dim
        self.img_mlp = nn.Sequential(nn.Linear(d_img, h), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(h, h))
        self.img_proj = nn.Linear(h, d)
        self.loc_enc = LocationEncoder(h, cfg.coord_freqs, cfg.coord_scales)
        self.ent_mlp = nn.Sequential(
            nn.Linear(d_img + h, h), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(h, d)
        )
        # Feature scales stored as logs (always positive), initialised so that the
        # tangent vectors start with norms of order 1 (MERU does the same).
        self.log_alpha_img = nn.Parameter(torch.tensor(-0.5 * math.log(d)))
        self.log_alpha_node = nn.Parameter(torch.tensor(-0.5 * math.log(d)))
        if cfg.anchors:
            v0 = 0.1 * torch.randn(n, d)
            if cfg.geometry == "lorentz":
                manifold = geoopt.Lorentz(k=float(cfg.curvature))
                self.anchors = geoopt.ManifoldParameter(
                    lorentz.expmap0(v0, k=self.curvature), manifold=manifold
                )
            else:
                self.anchors = nn.Parameter(v0)
        else:
            self.register_parameter("anchors", None)

    # --- encoders -------------------------------------------------------
    def image_tangent(self, phi: torch.Tensor) -> torch.Tensor:
        """Backbone features (B, D) -> tangent vectors at the origin (B, d)."""
        u = self.img_mlp(self.norm(phi))
        # alpha is clamped so a diverging scale cannot push points past float32 range.
        return self.log_alpha_img.clamp(max=math.log(10.0)).exp() * self.img_proj(u)

    def entity_tangent(self) -> torch.Tensor:
        """Tangent vectors of all entities (N, d), ordered as the entity table."""
        x = torch.cat([self.norm(self.entity_img_feat), self.loc_enc(self.entity_latlon_deg)], dim=-1)
        delta = self.log_alpha_node.clamp(max=math.log(10.0)).exp() * self.ent_mlp(x)
        if self.anchors is None:
            return delta
        base = lorentz.logmap0(self.anchors, k=self.curvature) if self.cfg.geometry == "lorentz" else self.anchors
        return base + delta

    def to_space(self, v: torch.Tensor) -> torch.Tensor:
        """Tangent vectors (..., d) -> points of the model's space."""
        return lorentz.expmap0(v, k=self.curvature) if self.cfg.geometry == "lorentz" else v.float()

    def encode_images(self, phi: torch.Tensor) -> torch.Tensor:
        return self.to_space(self.image_tangent(phi))

    def encode_entities(self) -> torch.Tensor:
        return self.to_space(self.entity_tangent())

    def sq_dist(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Squared distances between all images and entities: (B, .) x (N, .) -> (B, N)."""
        if self.cfg.geometry == "lorentz":
            return lorentz.pairwise_sq_dist(z, h, k=self.curvature)
        z, h = z.float(), h.float()
        return (z.pow(2).sum(-1, keepdim=True) - 2 * z @ h.T + h.pow(2).sum(-1)).clamp_min(0.0)

    def level_slice(self, level: int) -> slice:
        return slice(int(self.level_offsets[level]), int(self.level_offsets[level + 1]))
