"""Text_i: a frozen text embedding of each entity's name (HIERLOC.md section 4).

Two steps, both run once before training (the result is a buffer of the model,
``entity_text_feat``, like the mean image feature Img_i):

1. ``entity_texts(names, parent_index)``: one string per entity, its name followed by
   its ancestors' names, fine to coarse, comma-separated, empty names (placeholder
   sub-regions) skipped, put into ``template``. The default template is StreetCLIP's
   prompt: "A Street View photo in Paris, Ile-de-France, France." Naming the parents
   disambiguates the many places that share a name (there are dozens of Springfields).
2. ``encode_texts(texts, spec="open_clip:<arch>", pretrained=...)``: the open_clip text
   tower of ``arch`` (tokenizer, transformer, final norm, projection) only, no image
   tower; random init without ``pretrained`` (nothing is downloaded), else the text
   weights of a local open_clip checkpoint file. Returns L2-normalised float32 rows.

Random-init text features carry no meaning beyond telling names apart; the feature is
useful with real CLIP weights (a local file), which is how the paper uses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.nn import functional as F

from hierloc.model.io import MAX_WEIGHTS_FILE_BYTES, load_plain

#: StreetCLIP's prompt (Haas et al. 2023), with the whole path of names in the braces.
DEFAULT_TEMPLATE = "A Street View photo in {}."


def entity_texts(
    names: Sequence[str], parent_index: Sequence[int] | np.ndarray, *, template: str = DEFAULT_TEMPLATE,
    sep: str = ", ",
) -> list[str]:
    """One text per entity: ``template`` filled with "name, parent name, ..., top name".

    names (N,) entity names in table order (None/NaN/"" are skipped); parent_index (N,)
    row of each entity's parent, -1 at the top. A cycle in parent_index raises
    ValueError naming the row.
    """
    parent = np.asarray(parent_index, dtype=np.int64)
    n = len(names)
    if parent.shape != (n,):
        raise ValueError(f"parent_index must have one row per name ({n}), got shape {parent.shape}")
    if ((parent < -1) | (parent >= n)).any():
        bad = int(np.flatnonzero((parent < -1) | (parent >= n))[0])
        raise ValueError(f"entity row {bad}: parent {int(parent[bad])} is not a row of the table (0..{n - 1}) or -1")
    clean = [name.strip() if isinstance(name, str) else "" for name in names]
    out = []
    for row in range(n):
        path, r, steps = [], row, 0
        while r >= 0:
            if clean[r]:
                path.append(clean[r])
            r, steps = int(parent[r]), steps + 1
            if steps > n:
                raise ValueError(f"entity row {row}: parent_index has a cycle; every chain must end at -1")
        out.append(template.format(sep.join(path)))
    return out


def _text_weights(pretrained: str | Path, tower: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The text-tower tensors of an open_clip checkpoint file, renamed to ``tower``'s keys."""
    blob = load_plain(pretrained, what="text encoder weights file", max_bytes=MAX_WEIGHTS_FILE_BYTES)
    if isinstance(blob, dict) and "state_dict" in blob:
        blob = blob["state_dict"]
    sd = {k.removeprefix("module."): v for k, v in blob.items()}
    want = tower.state_dict().keys()
    out = {}
    for key in want:
        for src in (key, f"text.{key}"):  # CLIP keeps the text tower at the top level; CustomTextCLIP under text.
            if src in sd:
                out[key] = sd[src]
                break
    missing = [k for k in want if k not in out and not k.endswith("attn_mask")]
    if missing:
        raise ValueError(f"{pretrained}: not an open_clip checkpoint of this text tower: missing {missing[:5]} "
                         f"({len(missing)} keys); pass the weights file of the same architecture")
    return out


def build_text_tower(spec: str, pretrained: str | Path | None = None, text_cfg: dict | None = None):
    """(text tower module in eval mode, tokenizer) for ``spec`` = "open_clip:<arch>".

    text_cfg overrides fields of the architecture's text config (e.g. a tiny
    ``{"width": 32, "layers": 1, "heads": 2}`` for tests); ``pretrained`` is a local
    open_clip checkpoint file (never a download).
    """
    kind, _, arch = spec.partition(":")
    if kind != "open_clip" or not arch:
        raise ValueError(f"unknown text encoder spec {spec!r}: use 'open_clip:<arch>'")
    import open_clip
    from open_clip.model import CLIPTextCfg, _build_text_tower

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"text encoder {spec}: unknown open_clip architecture {arch!r} (open_clip.list_models())")
    tcfg = {**cfg["text_cfg"], **(text_cfg or {})}
    if "hf_model_name" in tcfg or "hf_tokenizer_name" in tcfg:
        raise ValueError(f"text encoder {spec}: Hugging Face text towers need a hub download; pick a CLIP-BPE arch")
    embed_dim = int(tcfg.pop("embed_dim", cfg["embed_dim"]))
    tower = _build_text_tower(embed_dim, CLIPTextCfg(**tcfg), quick_gelu=bool(cfg.get("quick_gelu", False)))
    if pretrained is not None:
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"text encoder {spec}: weights file {pretrained} does not exist "
                                    "(only local files are read; nothing is downloaded)")
        tower.load_state_dict(_text_weights(pretrained, tower), strict=False)
    tokenizer = open_clip.get_tokenizer(arch, context_length=int(tcfg.get("context_length", 77)))
    return tower.eval().requires_grad_(False), tokenizer


@torch.no_grad()
def encode_texts(
    texts: Sequence[str],
    spec: str = "open_clip:ViT-B-32",
    pretrained: str | Path | None = None,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    text_cfg: dict | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Texts -> L2-normalised text embeddings (N, D_txt) float32, in input order.

    ``seed`` fixes the random init when ``pretrained`` is None, so the same texts
    give the same features in every run.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower, tokenizer = build_text_tower(spec, pretrained, text_cfg)
    tower = tower.to(device)
    out = []
    for s in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[s : s + batch_size])).to(device)
        out.append(F.normalize(tower(tokens).float(), dim=-1).cpu())
    if not out:
        return np.zeros((0, int(tower.output_dim if hasattr(tower, "output_dim") else 0)), np.float32)
    return torch.cat(out).numpy().astype(np.float32)
