"""Rank layout from torchrun or Intel MPI/PMI variables, backend choice, core pinning."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.trainer

RANK_VARS = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "PMI_RANK", "PMI_SIZE",
             "MPI_LOCALRANKID", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_RANK",
             "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
             "OMPI_COMM_WORLD_LOCAL_SIZE"]


@pytest.fixture
def clean_env(monkeypatch):
    for name in RANK_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_no_variables_is_one_rank_without_a_process_group(clean_env):
    from amxtune_trainer import distributed

    info = distributed.detect()
    assert (info.rank, info.world_size, info.enabled, info.is_main) == (0, 1, False, True)
    distributed.init(info, "auto")  # no-op: nothing to join
    assert info.backend is None


def test_torchrun_variables(clean_env):
    from amxtune_trainer import distributed

    for name, value in {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                        "LOCAL_WORLD_SIZE": "4"}.items():
        clean_env.setenv(name, value)
    info = distributed.detect()
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (5, 8, 1, 4)


def test_intel_mpi_pmi_variables(clean_env):
    from amxtune_trainer import distributed

    for name, value in {"PMI_RANK": "6", "PMI_SIZE": "16", "MPI_LOCALRANKID": "2",
                        "MPI_LOCALNRANKS": "4"}.items():
        clean_env.setenv(name, value)
    info = distributed.detect()
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (6, 16, 2, 4)
    assert not info.is_main


def test_bad_rank_variables_are_user_errors(clean_env):
    from amxtune_trainer import distributed
    from amxtune_trainer.errors import UserError

    clean_env.setenv("RANK", "x")
    with pytest.raises(UserError, match="RANK"):
        distributed.detect()
    clean_env.setenv("RANK", "3")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="outside world size"):
        distributed.detect()


def test_ranks_without_a_rendezvous_address_fail_clearly(clean_env):
    from amxtune_trainer import distributed
    from amxtune_trainer.errors import UserError

    clean_env.delenv("MASTER_ADDR", raising=False)
    clean_env.delenv("MASTER_PORT", raising=False)
    with pytest.raises(UserError, match="MASTER_ADDR"):
        distributed.init(distributed.DistInfo(rank=1, world_size=2), "gloo")


def test_backend_ccl_only_when_importable(clean_env):
    from amxtune_trainer import distributed
    from amxtune_trainer.errors import UserError

    assert distributed.choose_backend("gloo") == "gloo"
    if distributed._ccl_available():
        assert distributed.choose_backend("ccl") == "ccl"
    else:
        with pytest.raises(UserError, match="oneccl_bindings_for_pytorch"):
            distributed.choose_backend("ccl")
        clean_env.setenv("CCL_ATL_TRANSPORT", "ofi")
        assert distributed.choose_backend("auto") == "gloo"


def test_local_ranks_take_disjoint_shares_of_the_cpu_set(clean_env):
    import torch

    from amxtune_trainer import distributed

    available = sorted(os.sched_getaffinity(0))
    threads = torch.get_num_threads()
    try:
        shares = []
        for local_rank in range(2):
            info = distributed.DistInfo(rank=local_rank, world_size=2, local_rank=local_rank,
                                        local_world_size=2)
            os.sched_setaffinity(0, available)
            clean_env.delenv("OMP_NUM_THREADS", raising=False)
            distributed.pin_cores(info)
            shares.append(set(info.cores))
            assert sorted(os.sched_getaffinity(0)) == sorted(info.cores)
            assert info.threads == len(info.cores) == torch.get_num_threads()
        if len(available) >= 2:
            assert not shares[0] & shares[1]
            assert shares[0] | shares[1] <= set(available)
    finally:
        os.sched_setaffinity(0, available)
        torch.set_num_threads(threads)
