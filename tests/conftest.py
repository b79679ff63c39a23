import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

# tests/test_decode_kernel.py runs the Triton decode kernel in Triton's interpreter on CPU tensors. The
# flag must be set before triton.language is first imported (its library functions are built then), so
# it is set here, before any test module can import triton; `import torch` does not.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: on a shared 2-core machine, intra-op threads cost 3-4x the time.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and counters emptied before and after: tests that count compiled graphs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture
def no_novels(monkeypatch):
    """As on a machine without Debian's r-cran-janeaustenr: the real ``texts.novels`` (earlier patches undone),
    with no R library to find."""
    from kvpolicy.evaluation import texts

    monkeypatch.undo()
    monkeypatch.setattr(texts, "_R_LIBRARIES", ())
    monkeypatch.setenv("R_LIBS", "/nonexistent")
    monkeypatch.delenv("R_LIBS_USER", raising=False)
    texts.novels.cache_clear()
    yield
    texts.novels.cache_clear()
