"""The HierLoc model: an image branch and an entity branch meeting in one space.

Points live on geoopt's ``Lorentz(k=K)`` (hierloc.geometry.lorentz states the convention);
``geometry="euclidean"`` is the paper's ablation: the same networks, but points are
the tangent vectors themselves and distances are Euclidean (no log/exp maps).

Image branch (HIERLOC.md section 3): u = MLP_img(phi) (two linear layers, GELU and
Dropout after the first), delta = W u + b in R^d, z = alpha_img * delta (the zero
time coordinate is implicit: tangent vectors at the origin are stored by their d
space components), Z = exp_o(z).

Entity branch (section 4): each entity has frozen features [Img_i | Text_i | Coords_i]:
the mean backbone feature of its training images, a frozen text embedding of its
name (optional: present iff ``entity_text_feat`` is given, see hierloc.model.text) and a
trainable location encoding of its lat/lon (random Fourier features or spherical
harmonics, hierloc.model.location). f_e maps them to a tangent vector delta_i and, with the
per-entity anchor A_i, H_i = exp_o(log_o(A_i) + alpha_node * delta_i).

Cross-modal attention (section 5, ``attention=True``), image side only: for each level
l, z~_l = MHA_l(query=z, keys=values={h_j^l}), z* = z + MLP_fuse([z~_1 | ... | z~_L]),
Z* = exp_o(z*). Keys are restricted to the ``attn_keys`` entities of the level
nearest to z (see ``nearest_keys``): attending over 210k cities per image would cost
B x N_l x d per head and level with autograd; the nearest M are found without
autograd in chunks, and attention (with gradient) runs over the M gathered keys.

Curvature: K is stored as a log (buffer, or parameter with ``learn_curvature``) and
read through the ``curvature`` property, which clamps it to [K0/10, 10 K0]. With a
learnable K the anchors are stored as tangent vectors at the origin (a plain
parameter, optimised by AdamW): a point on the hyperboloid of one K is off the
hyperboloid of another, so a ManifoldParameter on a fixed-k manifold would go stale
as K moves. With a fixed K they are a geoopt ManifoldParameter on Lorentz(k=K),
optimised by RiemannianAdam (the paper's set-up).
"""

from __future__ import annotations

import math
from typing import Literal

import geoopt
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from hierloc.geometry import lorentz
from hierloc.model.location import LocationEncoder, SphericalHarmonicsEncoder
from hierloc.geometry.lorentz import check_finite
from hierloc.model.loss import pairwise_sq_dist

__all__ = ["ModelConfig", "HierLocModel", "FeatureNorm", "LocationEncoder", "CrossModalAttention",
           "nearest_keys", "check_finite"]

Geometry = Literal["lorentz", "euclidean"]
CoordEncoder = Literal["rff", "sh"]

#: A learnable K stays within this factor of its initial value, each way (see HierLocModel.curvature).
CURVATURE_RANGE_FACTOR = 10.0


class ModelConfig(BaseModel):
    """Sizes and geometry of the model. Sizes are GAPs in the paper: see docs/method.md.

    Defaults reproduce the models saved before attention, spherical harmonics and a
    learnable curvature existed, so old model files load unchanged.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    dim: int = Field(128, ge=2, le=4096, description="d: hyperbolic dimension (points live in R^(d+1))")
    hidden: int = Field(512, ge=8, le=16384, description="width of the image and entity MLPs")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    geometry: Geometry = Field("lorentz", description="lorentz (HierLoc) or euclidean (ablation)")
    curvature: float = Field(1.0, gt=0.0, le=100.0, description="K of geoopt's Lorentz(k=K) (initial K if learnt); curvature is -1/K")
    learn_curvature: bool = Field(False, description="learn K (stored as log K, clamped to [K/10, 10K]); lorentz only")
    coord_encoder: CoordEncoder = Field("rff", description="location encoder: random Fourier features or spherical harmonics")
    coord_freqs: int = Field(64, ge=1, le=1024, description="random Fourier frequencies per scale (rff)")
    coord_scales: tuple[float, ...] = Field((1.0, 4.0, 16.0, 64.0), min_length=1, description="rff scales")
    sh_degree: int = Field(10, ge=0, le=64, description="highest spherical-harmonics degree L, (L+1)^2 functions (sh)")
    anchors: bool = Field(True, description="per-entity anchors A_i (the paper summary's variant)")
    attention: bool = Field(False, description="cross-modal attention of the image over each level's entities")
    attn_heads: int = Field(8, ge=1, le=64, description="heads per level (the paper: 8); must divide dim")
    attn_keys: int = Field(64, ge=1, le=100_000, description="M: nearest entities per level attended to")

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.attention and self.dim % self.attn_heads:
            raise ValueError(f"attn_heads={self.attn_heads} must divide dim={self.dim}")
        if self.learn_curvature and self.geometry != "lorentz":
            raise ValueError("learn_curvature needs geometry='lorentz' (Euclidean space has no curvature)")
        return self

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


@torch.no_grad()
def nearest_keys(z: torch.Tensor, keys: torch.Tensor, m: int, *, chunk_elems: int = 1 << 22) -> torch.Tensor:
    """Rows of the ``m`` keys nearest to each query in Euclidean distance: (B, d) x (N, d) -> (B, min(m, N)).

    Queries and keys are tangent vectors at the origin, where the attention acts, so
    nearness is |z - h|^2, ranked as the largest 2 z.h - |h|^2. No autograd (the
    selection is discrete); the keys are scanned in chunks of ``chunk_elems / B``
    rows with a running top-m, so memory stays O(B * (m + chunk)) for any N.
    """
    n = keys.shape[0]
    if m >= n:
        return torch.arange(n, device=z.device).expand(z.shape[0], n)
    with torch.autocast(device_type=z.device.type, enabled=False):
        z, keys = z.detach().float(), keys.detach().float()
        neg_sq_norm = -keys.pow(2).sum(-1)
        chunk = max(m, chunk_elems // max(1, z.shape[0]))
        cand_s, cand_i = [], []
        for s in range(0, n, chunk):
            score = torch.addmm(neg_sq_norm[s : s + chunk], z, keys[s : s + chunk].T, alpha=2.0)  # (B, C)
            top = score.topk(min(m, score.shape[1]), dim=1, sorted=False)
            cand_s.append(top.values)
            cand_i.append(top.indices + s)
        if len(cand_s) == 1:
            return cand_i[0]
        # The m best of the union of each chunk's m best are the m best overall.
        best = torch.cat(cand_s, dim=1).topk(m, dim=1, sorted=False).indices
        return torch.cat(cand_i, dim=1).gather(1, best)


class CrossModalAttention(nn.Module):
    """Image-side attention over each level's entities (HIERLOC.md section 5).

    forward(z (B, d), level_keys [(N_l, d)] * L) -> update (B, d), so that z* = z + update.
    One nn.MultiheadAttention (``heads`` heads) per level over the ``keys`` nearest
    entity tangents (all of them where N_l <= keys), then MLP_fuse over the
    concatenated per-level outputs. The last layer of MLP_fuse starts at zero: a model
    with attention starts as the one without (z* = z) and learns how much to use.
    """

    def __init__(self, dim: int, n_levels: int, heads: int, keys: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.n_keys = int(keys)
        self.attn = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(n_levels))
        self.fuse = nn.Sequential(nn.Linear(n_levels * dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        nn.init.zeros_(self.fuse[-1].weight)
        nn.init.zeros_(self.fuse[-1].bias)

    def forward(self, z: torch.Tensor, level_keys: list[torch.Tensor]) -> torch.Tensor:
        if len(level_keys) != len(self.attn):
            raise ValueError(f"expected keys for {len(self.attn)} levels, got {len(level_keys)}")
        outs = []
        for attn, keys in zip(self.attn, level_keys):
            kv = keys[nearest_keys(z, keys, self.n_keys)].to(z.dtype)  # (B, M, d), with gradient
            out, _ = attn(z[:, None, :], kv, kv, need_weights=False)
            outs.append(out[:, 0])
        return self.fuse(torch.cat(outs, dim=-1))


#: Entity rows per activation-checkpointed chunk of f_e when training (HierLocModel.entity_tangent).
ENTITY_CHUNK = 16_384


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
        entity_text_feat: (N, D_txt) frozen text embedding per entity (Text_i,
            hierloc.model.text.encode_texts: L2-normalised rows), or None for a model
            without text. Stored as a buffer; fed to f_e times sqrt(D_txt) so its
            entries have unit RMS like the standardised image features.
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
        entity_text_feat: torch.Tensor | None = None,
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
        if entity_text_feat is not None and (entity_text_feat.ndim != 2 or entity_text_feat.shape[0] != n):
            raise ValueError(f"entity_text_feat must be ({n}, D_txt), one row per entity; got {tuple(entity_text_feat.shape)}")
        self.level_sizes = list(level_sizes)
        self.register_buffer("level_offsets", torch.tensor(np.cumsum([0, *level_sizes]), dtype=torch.long))
        self.register_buffer("parent_index", parent_index.long())
        self.register_buffer("entity_img_feat", entity_img_feat.float())
        self.register_buffer("entity_latlon_deg", entity_latlon_deg.float())
        self.register_buffer("entity_text_feat", None if entity_text_feat is None else entity_text_feat.float())
        log_k = torch.tensor(math.log(cfg.curvature))
        if cfg.learn_curvature:
            self.log_curvature = nn.Parameter(log_k)
        else:
            self.register_buffer("log_curvature", log_k)
        self.norm = FeatureNorm(feat_mean, feat_std)

        h, d = cfg.hidden, cfg.dim
        d_txt = 0 if entity_text_feat is None else entity_text_feat.shape[1]
        self.img_mlp = nn.Sequential(nn.Linear(d_img, h), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(h, h))
        self.img_proj = nn.Linear(h, d)
        if cfg.coord_encoder == "sh":
            self.loc_enc: nn.Module = SphericalHarmonicsEncoder(h, cfg.sh_degree)
        else:
            self.loc_enc = LocationEncoder(h, cfg.coord_freqs, cfg.coord_scales)
        self.ent_mlp = nn.Sequential(
            nn.Linear(d_img + d_txt + h, h), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(h, d)
        )
        # Feature scales stored as logs (always positive), initialised so that the
        # tangent vectors start with norms of order 1 (MERU does the same).
        self.log_alpha_img = nn.Parameter(torch.tensor(-0.5 * math.log(d)))
        self.log_alpha_node = nn.Parameter(torch.tensor(-0.5 * math.log(d)))
        if cfg.anchors:
            v0 = 0.1 * torch.randn(n, d)
            if cfg.geometry == "lorentz" and not cfg.learn_curvature:
                manifold = geoopt.Lorentz(k=float(cfg.curvature))
                self.anchors = geoopt.ManifoldParameter(lorentz.expmap0(v0, k=cfg.curvature), manifold=manifold)
            else:  # Euclidean ablation, or tangent vectors at the origin when K is learnt (module docstring)
                self.anchors = nn.Parameter(v0)
        else:
            self.register_parameter("anchors", None)
        self.attn = (
            CrossModalAttention(d, len(level_sizes), cfg.attn_heads, cfg.attn_keys, h, cfg.dropout)
            if cfg.attention else None
        )
        self._ent_cache: tuple[tuple, torch.Tensor] | None = None
        self.entity_chunk: int | None = ENTITY_CHUNK  # rows per checkpointed f_e chunk (entity_tangent)

    # --- scalars ----------------------------------------------------------
    @property
    def curvature(self) -> torch.Tensor:
        """K of Lorentz(k=K), a 0-d tensor (with gradient when learnt).

        Clamped to [K0/10, 10 K0] (K0 = cfg.curvature): a smaller K puts the sinh cap
        (lorentz.MAX_TANGENT_NORM * sqrt(K)) within reach of ordinary tangent norms, so
        points saturate and distances stop carrying information; a larger K flattens
        the space until it is Euclidean at the scale of the data. The clamp also keeps
        a diverging step from producing K = 0 or inf.
        """
        k0 = math.log(self.cfg.curvature)
        f = math.log(CURVATURE_RANGE_FACTOR)
        return self.log_curvature.clamp(k0 - f, k0 + f).exp()

    @property
    def alpha_img(self) -> torch.Tensor:
        # alpha is clamped so a diverging scale cannot push points past float32 range.
        return self.log_alpha_img.clamp(max=math.log(10.0)).exp()

    @property
    def alpha_node(self) -> torch.Tensor:
        # Same clamp as alpha_img.
        return self.log_alpha_node.clamp(max=math.log(10.0)).exp()

    def scalar_tensors(self) -> dict[str, torch.Tensor]:
        """The learnt scalars as detached 0-d tensors where the model is (no host read: the training
        step's finite checks record them on the device)."""
        return {"curvature": self.curvature.detach(), "alpha_img": self.alpha_img.detach(),
                "alpha_node": self.alpha_node.detach()}

    def scalars(self) -> dict[str, float]:
        """The learnt scalars as floats, for logs and diagnostics."""
        return {k: float(v) for k, v in self.scalar_tensors().items()}

    # --- encoders -------------------------------------------------------
    def base_image_tangent(self, phi: torch.Tensor) -> torch.Tensor:
        """Backbone features (B, D) -> tangent vectors at the origin (B, d), before attention."""
        return self.alpha_img * self.img_proj(self.img_mlp(self.norm(phi)))

    def image_tangent(self, phi: torch.Tensor, ent_tangent: torch.Tensor | None = None) -> torch.Tensor:
        """Backbone features (B, D) -> tangent vectors z* (B, d) (z without attention).

        ent_tangent: (N, d) the entity tangents the attention reads as keys (e.g. the
        table the training step already computed); None computes them (cached when
        the model is in eval mode and autograd is off). Ignored without attention.
        """
        z = self.base_image_tangent(phi)
        if self.attn is None:
            return z
        if ent_tangent is None:
            ent_tangent = self.cached_entity_tangent()
        keys = [ent_tangent[self.level_slice(lvl)] for lvl in range(len(self.level_sizes))]
        return z + self.attn(z, keys)

    def anchor_tangent(self) -> torch.Tensor | None:
        """log_o(A_i) for all entities (N, d), or None without anchors."""
        if self.anchors is None:
            return None
        if isinstance(self.anchors, geoopt.ManifoldParameter):
            # The points live on Lorentz(k=K0), K0 = cfg.curvature (fixed K: curvature == K0).
            return lorentz.logmap0(self.anchors, k=self.cfg.curvature)
        return self.anchors

    def entity_text_input(self) -> torch.Tensor | None:
        """Text_i as f_e sees it (N, D_txt): unit rows times sqrt(D_txt), or None."""
        t = self.entity_text_feat
        return None if t is None else t * math.sqrt(t.shape[1])

    def _entity_delta(self, start: int, stop: int) -> torch.Tensor:
        """f_e of the entity rows start..stop-1 (before the anchors): (stop - start, d)."""
        parts = [self.norm(self.entity_img_feat[start:stop])]
        text = self.entity_text_input()
        if text is not None:
            parts.append(text[start:stop])
        parts.append(self.loc_enc(self.entity_latlon_deg[start:stop]))
        return self.alpha_node * self.ent_mlp(torch.cat(parts, dim=-1))

    def entity_tangent(self) -> torch.Tensor:
        """Tangent vectors of all entities (N, d), ordered as the entity table.

        With autograd on a table of more than ENTITY_CHUNK rows, f_e runs chunk by chunk under
        activation checkpointing: only a chunk's activations live at once (recomputed in the
        backward pass), so a step's memory does not grow with the table's (N x hidden) activations
        (OSV-5M: 244k entities). Smaller tables run in one piece, as before. ``entity_chunk``
        (default ENTITY_CHUNK; 0 or None: never) is set by the training loop from the device's free
        memory (hierloc.device.entity_chunk_rows): a GPU with room for the whole table's activations
        skips the recomputation."""
        n, chunk = self.entity_img_feat.shape[0], self.entity_chunk
        if torch.is_grad_enabled() and chunk and n > chunk:
            from torch.utils.checkpoint import checkpoint

            delta = torch.cat([checkpoint(self._entity_delta, s, min(s + chunk, n), use_reentrant=False)
                               for s in range(0, n, chunk)])
        else:
            delta = self._entity_delta(0, n)
        base = self.anchor_tangent()
        return delta if base is None else base + delta

    def cached_entity_tangent(self) -> torch.Tensor:
        """entity_tangent(), cached in eval mode without autograd (inference calls it per batch).

        The cache key is every parameter's and buffer's identity, storage and version
        counter, so an optimiser step, load_state_dict or .to() invalidates it.
        """
        if self.training or torch.is_grad_enabled():
            return self.entity_tangent()
        key = tuple((id(t), t.data_ptr(), t._version) for t in (*self.parameters(), *self.buffers()))
        if self._ent_cache is None or self._ent_cache[0] != key:
            self._ent_cache = (key, self.entity_tangent())
        return self._ent_cache[1]

    def to_space(self, v: torch.Tensor) -> torch.Tensor:
        """Tangent vectors (..., d) -> points of the model's space."""
        return lorentz.expmap0(v, k=self.curvature) if self.cfg.geometry == "lorentz" else v.float()

    def encode_images(self, phi: torch.Tensor, ent_tangent: torch.Tensor | None = None) -> torch.Tensor:
        """Backbone features (B, D) -> points Z* (B, d+1) (Lorentz) or (B, d) (Euclidean)."""
        return self.to_space(self.image_tangent(phi, ent_tangent))

    def encode_entities(self) -> torch.Tensor:
        """All entity points (N, d+1) (Lorentz) or (N, d) (Euclidean)."""
        return self.to_space(self.entity_tangent())

    def sq_dist(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Squared distances between all images and entities: (B, .) x (N, .) -> (B, N)."""
        return pairwise_sq_dist(z, h, geometry=self.cfg.geometry, k=self.curvature)

    def level_slice(self, level: int) -> slice:
        """Rows of ``level`` in the entity table, from the Python sizes (reading the
        ``level_offsets`` buffer would be a host sync per call on a GPU)."""
        start = sum(self.level_sizes[:level])
        return slice(start, start + self.level_sizes[level])

