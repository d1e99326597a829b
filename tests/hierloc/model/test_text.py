"""Text_i: entity texts from the hierarchy, and the open_clip text tower (tiny, random init, offline)."""

import numpy as np
import pytest
import torch

from hierloc.model.text import build_text_tower, encode_texts, entity_texts

TINY_TEXT = {"width": 32, "layers": 1, "heads": 2, "context_length": 24, "embed_dim": 16}


def test_entity_texts_name_the_whole_path_and_skip_empty_names():
    names = ["France", "Ile-de-France", "", "Paris", None]
    parent = [-1, 0, 1, 2, 1]
    texts = entity_texts(names, parent, template="{}")
    assert texts == ["France", "Ile-de-France, France", "Ile-de-France, France", "Paris, Ile-de-France, France",
                     "Ile-de-France, France"]
    assert entity_texts(["Paris", "France"], [1, -1])[0] == "A Street View photo in Paris, France."


def test_entity_texts_reject_bad_parents():
    with pytest.raises(ValueError, match="row 1: parent 5 is not a row"):
        entity_texts(["a", "b"], [-1, 5])
    with pytest.raises(ValueError, match="entity row 0: parent_index has a cycle"):
        entity_texts(["a", "b"], [1, 0])
    with pytest.raises(ValueError, match="one row per name"):
        entity_texts(["a", "b"], [-1])


def test_encode_texts_is_normalised_deterministic_and_tells_names_apart():
    texts = entity_texts(["FR", "Ile-de-France", "Paris", "Lyon"], [-1, 0, 1, 1])
    a = encode_texts(texts, "open_clip:ViT-B-32", text_cfg=TINY_TEXT, batch_size=3)
    b = encode_texts(texts, "open_clip:ViT-B-32", text_cfg=TINY_TEXT)
    assert a.shape == (4, 16) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # same seed, same features; batching does not matter
    assert np.abs(a[2] - a[3]).max() > 1e-3
    assert encode_texts([], "open_clip:ViT-B-32", text_cfg=TINY_TEXT).shape == (0, 16)


def test_encode_texts_reads_the_text_tower_of_a_local_checkpoint(tmp_path):
    import open_clip

    torch.manual_seed(3)
    tcfg = {k: v for k, v in TINY_TEXT.items() if k != "embed_dim"}
    clip = open_clip.CLIP(16, {"layers": 1, "width": 32, "patch_size": 16, "image_size": 32, "head_width": 16}, tcfg)
    torch.save({"state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}}, tmp_path / "w.pt")
    texts = ["A Street View photo in Paris, France.", "A Street View photo in Lyon, France."]
    got = encode_texts(texts, "open_clip:ViT-B-32", pretrained=tmp_path / "w.pt", text_cfg=TINY_TEXT)
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=24)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(clip.eval().encode_text(tok(texts)), dim=-1).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_bad_specs_and_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="use 'open_clip:<arch>'"):
        build_text_tower("hf:bert")
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        build_text_tower("open_clip:NoSuchNet")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_text_tower("open_clip:ViT-B-32", tmp_path / "missing.pt", TINY_TEXT)
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an open_clip checkpoint of this text tower"):
        build_text_tower("open_clip:ViT-B-32", tmp_path / "other.pt", TINY_TEXT)
