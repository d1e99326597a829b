"""Model files, checkpoints and warm-start sources are data: a crafted pickle runs no code.

Each crafted file's payload would create a marker file when unpickled; the marker must
never appear, and the error must name the file.
"""

import os
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from hierloc.model.model import ModelConfig
from hierloc.model.io import load_model
from hierloc.train.loop import TrainConfig, train

FAST = dict(epochs=2, batch_size=64, warmup_steps=5, log_every=1)

pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Unpickling this calls os.system(touch <marker>): what a hostile model file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted_files(tmp_path: Path) -> dict[str, Path]:
    """A torch.save file (the zip format) and a raw pickle, each holding the payload in a dict
    shaped like a hierloc model file / checkpoint."""
    marker = tmp_path / "pwned"
    blob = {"format": 2, "digest": "x", "state_dict": {}, "model_config": {}, "level_sizes": [1],
            "payload": Payload(marker)}
    torch_file, raw_file = tmp_path / "torch_saved.pt", tmp_path / "raw.pkl"
    torch.save(blob, torch_file)
    raw_file.write_bytes(pickle.dumps(blob))
    return {"torch": torch_file, "raw": raw_file}


@pytest.mark.parametrize("kind", ["torch", "raw"])
def test_a_crafted_model_file_runs_no_code(tmp_path, kind):
    path = crafted_files(tmp_path)[kind]
    with pytest.raises(ValueError, match=rf"{path}: refused as a model file.*weights_only=True") as err:
        load_model(path)
    assert "weights_only` set to `False`" not in str(err.value)  # torch's advice to load it unsafely is left out
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("kind", ["torch", "raw"])
def test_a_crafted_warm_start_file_runs_no_code(tiny, tmp_path, kind):
    data, ents = tiny
    path = crafted_files(tmp_path)[kind]
    with pytest.raises(ValueError, match=rf"{path}: refused as a warm-start model file"):
        train(data, ents, ModelConfig(dim=8, hidden=32), TrainConfig(**FAST), tmp_path / "out", init_from=path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("kind", ["torch", "raw"])
def test_a_crafted_checkpoint_runs_no_code(tiny, tmp_path, kind):
    data, ents = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(crafted_files(tmp_path)[kind].read_bytes())
    with pytest.raises(ValueError, match=rf"{out / 'checkpoint.pt'}: refused as a training checkpoint"):
        train(data, ents, ModelConfig(dim=8, hidden=32), TrainConfig(**FAST), out)
    assert not (tmp_path / "pwned").exists()


def test_an_old_checkpoint_with_a_pickled_rng_state_resumes_without_unpickling_it(tiny, tmp_path, caplog):
    """Checkpoints of earlier versions held the RNG state as pickled bytes: the run resumes
    (everything else restored) with a fresh stream, and the bytes are never unpickled."""
    data, ents = tiny
    # device="cpu": the checkpoint's RNG entry is checked to hold the CPU state only; "auto" would pick
    # CUDA where present, and a CUDA run saves the CUDA generator's state too
    mcfg, cfg = ModelConfig(dim=8, hidden=32), TrainConfig(**FAST, checkpoint_every_steps=4, device="cpu")

    def crash(m, step):
        if step == 7 and "train_loss" in m:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(data, ents, mcfg, cfg, tmp_path / "b", log_fn=crash)
    ck_path = tmp_path / "b" / "checkpoint.pt"
    ck = torch.load(ck_path, weights_only=True)
    assert set(ck["rng"][0]) == {"cpu"} and ck["rng"][0]["cpu"].dtype == torch.uint8  # tensors, not a pickle
    ck["rng"] = [pickle.dumps(Payload(tmp_path / "pwned"))]
    torch.save(ck, ck_path)
    with caplog.at_level("WARNING"):
        resumed = train(data, ents, mcfg, cfg, tmp_path / "b")
    assert not (tmp_path / "pwned").exists()
    assert resumed.steps_run == resumed.steps - ck["step"] and "old pickled form" in caplog.text


def test_model_files_and_checkpoints_load_as_plain_data(tiny, tmp_path):
    data, ents = tiny
    res = train(data, ents, ModelConfig(dim=8, hidden=32), TrainConfig(**{**FAST, "epochs": 1}), tmp_path)
    blob = torch.load(res.model_path, weights_only=True)
    assert {"format", "model_config", "level_sizes", "state_dict", "tau"} <= set(blob)
    assert load_model(res.model_path).level_sizes == ents.level_sizes


def test_a_model_file_over_the_cap_is_not_read(tmp_path):
    from hierloc.model.io import MAX_MODEL_FILE_BYTES

    big = tmp_path / "model.pt"
    with open(big, "wb") as fh:  # sparse: no disk used
        fh.truncate(MAX_MODEL_FILE_BYTES + 1)
    with pytest.raises(ValueError, match=rf"{big}: {MAX_MODEL_FILE_BYTES + 1:,} bytes, over the "
                                         rf"{MAX_MODEL_FILE_BYTES:,}-byte cap on a model file"):
        load_model(big)


def test_special_files_are_refused_without_blocking(tmp_path):
    """A FIFO (no writer: reading it would wait forever) and a link to a device are refused."""
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    result: dict = {}

    def load() -> None:
        try:
            load_model(fifo)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            result["exc"] = exc
    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # release the blocked reader, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
        pytest.fail("loading a FIFO as a model file blocked")
    assert isinstance(result.get("exc"), ValueError) and f"{fifo}: not a regular file" in str(result["exc"])
    dev = tmp_path / "zero.pt"
    dev.symlink_to("/dev/zero")
    with pytest.raises(ValueError, match=rf"{dev}: not a regular file"):
        load_model(dev)
    with pytest.raises(ValueError, match=rf"{tmp_path}: not a regular file"):
        load_model(tmp_path)


def test_a_missing_model_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'gone.pt'}: no such file"):
        load_model(tmp_path / "gone.pt")


def test_rng_state_round_trip():
    from hierloc.train.distributed import DistContext, all_gather_rng_states, set_rng_state

    cpu = torch.device("cpu")
    (state,) = all_gather_rng_states(cpu, DistContext())
    a = torch.rand(5)
    set_rng_state(state, cpu)
    assert torch.equal(torch.rand(5), a)
    assert np.asarray(state["cpu"]).dtype == np.uint8


@pytest.mark.parametrize("spec", ["timm:resnet18", "open_clip:RN50"])
def test_backbone_weights_over_the_cap_are_not_read(tmp_path, spec):
    from hierloc.features.backbones import load_backbone
    from hierloc.model.io import MAX_WEIGHTS_FILE_BYTES

    big = tmp_path / "weights.pt"
    with open(big, "wb") as fh:  # sparse: no disk used
        fh.truncate(MAX_WEIGHTS_FILE_BYTES + 1)
    with pytest.raises(ValueError, match=rf"{big}: {MAX_WEIGHTS_FILE_BYTES + 1:,} bytes, over the "
                                         rf"{MAX_WEIGHTS_FILE_BYTES:,}-byte cap on a backbone weights file"):
        load_backbone(spec, str(big))
