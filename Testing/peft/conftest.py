"""peft tests run single-threaded: their tensors are tiny, and thread hand-offs dominate on a loaded 2-core box."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
