"""The one device resolver, for feature extraction (no rank) and training (a rank's GPU)."""

import torch

from hierloc.device import resolve_device


def test_auto_is_cuda_when_present():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want


def test_a_rank_takes_its_own_gpu_and_explicit_specs_pass_through():
    assert resolve_device("cuda", 1) == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda")  # extraction: the current CUDA device
    assert resolve_device("cuda:2", 1) == torch.device("cuda", 2)
    assert resolve_device("cpu", 0) == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_large_frees_go_back_to_the_os_on_glibc():
    import platform

    from hierloc.device import return_large_frees

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert return_large_frees(1 << 20) is True
    else:
        assert return_large_frees(1 << 20) in (True, False)


def test_memory_based_choices_keep_the_cpu_constants():
    """On the CPU the loss threshold and the entity chunk stay the tuned constants (the CPU path as it
    was); a GPU derives them from its free memory (tests/hierloc/test_cuda.py checks that side)."""
    from hierloc.device import entity_chunk_rows, free_device_bytes, plain_loss_max_elems

    cpu = torch.device("cpu")
    assert free_device_bytes(cpu) is None
    assert plain_loss_max_elems(cpu, 1 << 24) == 1 << 24
    assert entity_chunk_rows(cpu, 244_000, 3_600, 16_384) == 16_384
