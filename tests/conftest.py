import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run_utils, ckpt_utils


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A 32-image shapes cache at 16 px, pixel space, the tiny text tower: the training tests' data."""
    import data as datalib
    out = str(tmp_path_factory.mktemp("cache") / "shapes16")
    return datalib.ensure_cache("shapes:32", 16, "none", "tiny", cache_dir=out, device="cpu")


@pytest.fixture(scope="session")
def cache32(tmp_path_factory):
    import data as datalib
    out = str(tmp_path_factory.mktemp("cache") / "shapes32")
    return datalib.ensure_cache("shapes:32", 32, "none", "tiny", cache_dir=out, device="cpu")
