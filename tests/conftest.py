"""Session-wide test settings: deterministic thread count, private caches."""
import os

import pytest

# Two cores here: tests pin torch to a fixed thread count so results and run times are
# reproducible across machines with more cores.
TEST_THREADS = int(os.environ.get("HEAR_BRAINSOUNDNET_TEST_THREADS", "2"))


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(TEST_THREADS)
