import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|absl).*")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA (and Transformer Engine where noted); skipped without it")
    config.addinivalue_line("markers", "multirank: spawns gloo processes on loopback")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def megatron_single_process():
    """A world of one gloo process with megatron's parallel_state at TP=PP=CP=1."""
    from megatron.core import parallel_state

    from megatron_harpe.distributed import free_port, init_model_parallel, init_process_group

    if not torch.distributed.is_initialized():
        init_process_group(0, 1, free_port())
    init_model_parallel(1, 1, 1)
    yield
    parallel_state.destroy_model_parallel()
