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


MIXED_SIZES = [(32, 32), (64, 32), (32, 64), (40, 30), (30, 52), (50, 20)]  # (w, h): 1:1, 2:1, 1:2 and odd ones


def mixed_folder(root, n=48, seed=0):
    """An imagefolder of n random images of MIXED_SIZES (metadata.jsonl); every third image has two captions."""
    import json
    import numpy as np
    from PIL import Image
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(os.path.join(root, "metadata.jsonl"), "w") as f:
        for i in range(n):
            w, h = MIXED_SIZES[i % len(MIXED_SIZES)]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(root, f"{i}.png"))
            text = [f"a picture number {i}", f"image {i} seen from the left"] if i % 3 == 0 else f"a picture number {i}"
            f.write(json.dumps({"file_name": f"{i}.png", "text": text}) + "\n")
    return str(root)


@pytest.fixture(scope="session")
def mixed(tmp_path_factory):
    """mixed_folder's 48 images cached at 16 px in 5 aspect buckets (patch 4: sides multiples of 4), pixel space,
    the tiny text tower; buckets under 8 images (the tests' global micro-batch) merged."""
    import data as datalib
    root = tmp_path_factory.mktemp("mixed")
    return datalib.ensure_cache(mixed_folder(root / "images"), 16, "none", "tiny", cache_dir=str(root / "cache"),
                                aspect_buckets=5, patch=4, min_bucket=8)
