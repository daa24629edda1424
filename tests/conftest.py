"""Session-wide test settings: deterministic thread count, private caches."""
import os

import pytest

# Two cores here: tests pin torch to a fixed thread count so results and run times are
# reproducible across machines with more cores.
TEST_THREADS = int(os.environ.get("HEAR_BRAINSOUNDNET_TEST_THREADS", "2"))


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(TEST_THREADS)


# ---- Local Hugging Face Hub (tests/hub_server.py) -------------------------------------------
# No test may reach huggingface.co. huggingface_hub reads these variables when it is imported,
# so they are set here, before any test imports it: the default endpoint is a closed loopback
# port (an accidental request fails at once), and telemetry is off (it would fetch a registry
# from the endpoint on the first request). Subprocesses inherit them.
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_UPDATE_CHECK", "1")


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """A running :class:`tests.hub_server.HubServer`; huggingface_hub (in this process and in
    subprocesses started with ``os.environ``) points at it, with a private cache under tmp_path."""
    from tests.hub_server import HubServer

    with HubServer() as server:
        server.use(monkeypatch, tmp_path / "hf-cache")
        yield server
