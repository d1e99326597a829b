"""The training part of benchmarks/gpu.py: steps/s of the real loop, FLOPs per step, TFLOP/s.

Data: benchmarks/train_step.synthetic_problem (a heavy-tailed hierarchy of the given sizes, random
d_img features for the images and for Img_i of every entity: any frozen feature costs the same).
Model: ModelConfig() (d 128, hidden 512, anchors). Every configuration (batch B, k =
entity_refresh_every) is one ``hierloc.train.loop.train`` call with a step budget, bf16 autocast on
CUDA (``amp``), logging every ``log_every`` steps (a multiple of k, so every interval holds whole
table cycles). The log function drains the device's queue and reads the clock at each logging
point; steps/s is taken from the first logging point to the last, so the first ``log_every``
steps (model transfer, cuDNN/cuBLAS selection, allocator growth, compilation if any) are
excluded, and so are the model build and the checkpoint written at the end.

FLOPs: torch.utils.flop_counter.FlopCounterMode around a second, short ``train`` call (2k steps,
torch.compile told to run eagerly so the counter sees the ops), read at its logging points: one
step = (count at step 2k - count at step k) / k, a whole table cycle averaged over its k steps.
The counter counts matrix products and convolutions/attention (not elementwise work), forward
and backward, as they are executed: the recomputation in the backward pass of the checkpointed
entity-MLP chunks (tables over 16,384 rows) and, where the loss streams, of its chunks is counted
(hardware FLOPs, above the model's: one more forward of the entity MLP per table backward). A step captured in a CUDA graph would hide its replays from the counter: a count of
0 is then reported as unknown, not as 0 TFLOP/s.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import guard, sync  # noqa: E402

from hierloc.model.model import ModelConfig  # noqa: E402
from hierloc.train.loop import TrainConfig, train  # noqa: E402

#: Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a piece of torch.cuda.get_device_name();
#: the first match wins. Other devices: no ratio.
PEAK_BF16_TFLOPS = (("H200 NVL", 835.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0),
                    ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0))


def peak_bf16_tflops(device_name: str | None) -> float | None:
    """The chip's dense bf16 peak from PEAK_BF16_TFLOPS, None for an unknown device (or no GPU)."""
    return next((p for key, p in PEAK_BF16_TFLOPS if device_name and key in device_name), None)


def log_interval(log_every: int, k: int) -> int:
    """``log_every`` rounded up to a multiple of k: every timed interval holds whole table cycles."""
    return k * -(-log_every // k)


def _config(batch: int, k: int, device: torch.device, steps: int, log_every: int, compile: str = "auto") -> TrainConfig:
    return TrainConfig(epochs=1, batch_size=batch, device=str(device), amp=True, entity_refresh_every=k,
                       max_steps=steps, log_every=log_every, warmup_steps=10, seed=0, compile=compile)


def timed_run(data, ents, batch: int, k: int, device: torch.device, log_every: int, intervals: int,
              out_dir: Path, compile: str = "auto") -> dict:
    """Steady-state steps/s of one configuration: ``train`` for log_every x (1 + intervals) steps,
    timed from the first logging point to the last (module docstring)."""
    if log_every % k:
        raise ValueError(f"log_every {log_every} must be a multiple of k = {k}")
    marks: list[tuple[int, float, float | None]] = []

    def log_fn(metrics: dict, step: int) -> None:
        if "train_loss" in metrics:  # the per-step metrics (an epoch's close has none)
            sync(device)
            marks.append((step, time.perf_counter(), metrics.get("steps_per_s")))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    res = train(data, ents, ModelConfig(), _config(batch, k, device, log_every * (1 + intervals), log_every, compile),
                out_dir, log_fn=log_fn)
    wall = time.perf_counter() - t0
    if len(marks) < 2:
        raise RuntimeError(f"batch {batch}, k={k}: {len(marks)} logging points, need 2 to time an interval")
    (s0, t_first, _), (s1, t_last, _) = marks[0], marks[-1]
    sps = (s1 - s0) / (t_last - t_first)
    return {"batch": batch, "refresh_every": k, "compile": compile, "steps_per_s": sps, "images_per_s": sps * batch,
            "timed_steps": s1 - s0, "warmup_steps": s0, "run_s": wall, "final_loss": res.final.get("epoch_loss"),
            "loop_steps_per_s": [m[2] for m in marks[1:]],
            "peak_gpu_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None}


def step_flops(data, ents, batch: int, k: int, device: torch.device, out_dir: Path) -> float:
    """FLOPs of one training step (forward and backward), averaged over the second k-step table
    cycle of a ``train`` call under FlopCounterMode (module docstring)."""
    seen: dict[int, int] = {}
    eager = (torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance")
             else contextlib.nullcontext())
    with eager, FlopCounterMode(display=False) as counter:
        def log_fn(metrics: dict, step: int) -> None:
            if "train_loss" in metrics:
                seen[step] = counter.get_total_flops()

        train(data, ents, ModelConfig(), _config(batch, k, device, 2 * k, k), out_dir, log_fn=log_fn)
    if k not in seen or 2 * k not in seen:
        raise RuntimeError(f"batch {batch}, k={k}: no FLOP count at steps {k} and {2 * k} (logged at {sorted(seen)})")
    return (seen[2 * k] - seen[k]) / k


def train_rates(levels: tuple[int, ...], d_img: int, batches: tuple[int, ...], refresh: tuple[int, ...],
                device: torch.device, *, log_every: int, intervals: int, work_dir: Path) -> dict:
    """Every (batch, k) configuration: steps/s, images/s, FLOPs per step and TFLOP/s against the
    device's bf16 peak; each configuration records its own failure in ``errors``."""
    from train_step import synthetic_problem  # benchmarks/train_step.py (imports the training internals)

    t0 = time.perf_counter()
    steps = max(max(log_interval(log_every, k) * (1 + intervals), 2 * k) for k in refresh)
    data, ents = synthetic_problem(list(levels), max(batches) * steps, d_img)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = peak_bf16_tflops(name)
    out: dict = {"levels": list(levels), "entities": int(sum(levels)), "d_img": d_img, "device": str(device),
                 "device_name": name, "amp_bf16": device.type == "cuda", "peak_bf16_tflops": peak,
                 "log_every": log_every, "build_s": time.perf_counter() - t0,
                 "flops_note": "matmul FLOPs of one step, forward + backward, as executed: the backward's "
                               "recomputation (checkpointed entity-MLP chunks; the loss's chunks where it "
                               "streams) is counted; a k-step table cycle / k", "configs": [], "errors": {}}
    for batch in batches:
        for k in refresh:
            key = f"batch {batch}, k={k}"
            run_dir, row = work_dir / f"b{batch}-k{k}", None
            with guard(out["errors"], key):
                row = timed_run(data, ents, batch, k, device, log_interval(log_every, k), intervals, run_dir)
                shutil.rmtree(run_dir)  # checkpoint and model (GBs at full size: the entity features)
                out["configs"].append(row)
            if row is None:  # the timed run failed: nothing to count FLOPs for
                continue
            with guard(out["errors"], f"{key}, FLOP count"):
                t_count = time.perf_counter()
                flops = step_flops(data, ents, batch, k, device, run_dir)
                row["flop_count_s"] = time.perf_counter() - t_count
                shutil.rmtree(run_dir)
                row["flops_per_step"] = flops if flops > 0 else None
                row["tflop_s"] = flops * row["steps_per_s"] / 1e12 if flops > 0 else None
                row["of_peak"] = row["tflop_s"] / peak if row["tflop_s"] and peak else None
    if device.type == "cuda":  # what torch.compile of the loss brings: the first configuration, eager
        batch, k = batches[0], refresh[0]
        with guard(out["errors"], f"batch {batch}, k={k}, eager"):
            row = timed_run(data, ents, batch, k, device, log_interval(log_every, k), intervals,
                            work_dir / "eager", compile="off")
            shutil.rmtree(work_dir / "eager")
            out["configs"].append(row)
    with guard(out["errors"], "host syncs"):
        out["host_syncs"] = host_syncs_per_step(data, ents, batches[0], refresh, device)
    return out


def host_syncs_per_step(data, ents, batch: int, refresh: tuple[int, ...], device: torch.device) -> dict:
    """Host syncs in the steps between two logging points, per k: counted by HostSyncs (it follows
    the tensors that live on the device; on the CPU too), and on CUDA by torch's own sync debug
    mode (a warning per synchronising call)."""
    import tempfile
    import warnings

    from hierloc.train.distributed import setup
    from hierloc.train.host_syncs import step_syncs
    from hierloc.train.loop import _Loop

    out = {}
    ctx, dev = setup(str(device))
    for k in refresh:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = _config(batch, k, dev, 10**6, 10**6)
            loop = _Loop(data, ents, ModelConfig(), cfg, Path(tmp) / "checkpoint.pt", None, None, None, ctx, dev)
            perm = torch.randperm(loop.n, generator=torch.Generator().manual_seed(0))
            steps = 2 * k + 2
            batches = [perm[b * batch : (b + 1) * batch] for b in range(steps)]
            for rows in batches[:2]:  # optimiser state, cuDNN/cuBLAS choices
                loop._step(rows, last_batch=False)
            found = step_syncs(loop, batches[2:])
            row = {"steps": steps - 2, "host_syncs": len(found), "where": sorted({s.where for s in found})}
            if dev.type == "cuda":
                sync(dev)
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        for rows in batches[2:]:
                            loop._step(rows, last_batch=False)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
                row["cuda_sync_warnings"] = sum("synchroniz" in str(w.message) for w in caught)
            out[f"k={k}"] = row
    return out
