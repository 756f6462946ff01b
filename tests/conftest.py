import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run on the device machine (see README, 'GPU tests')")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: tiny models gain nothing from more, and on a shared 2-core
    machine a second busy process makes torch's thread pool spin (tens of times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def harness():
    """One temporary Prefect server for the session's flow tests (test_flows, test_fanout)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def interpreter(monkeypatch):
    """Work around Triton 3.6 interpreter bugs for the duration of one test."""
    import numpy as np
    from triton.runtime import interpreter as interp

    major, minor = (int(x) for x in np.__version__.split(".")[:2])
    if (major, minor) >= (2, 4):
        # triton-lang/triton#9171 (fixed after 3.6): numpy >= 2.4 refuses int() of the interpreter's
        # (1,)-shaped scalars, e.g. a loop bound computed from tl.program_id
        original = interp._patch_lang_tensor

        def patched(tensor, scope):
            original(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        monkeypatch.setattr(interp, "_patch_lang_tensor", patched)
