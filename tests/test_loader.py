"""loader.py: every sample once per epoch, disjoint DDP shards, exact resume, flips and caption drops that do not
depend on the batch split, and a flipped sample's caption that says "right" where the image's said "left"."""
import collections
import json
import os
import re

import numpy as np
import pytest
import torch

import data
import encoders
from loader import Loader


##### the loader

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("loader") / "cache")
    return data.LatentCache(data.build_cache("shapes:24", out, 8, "none", "tiny", text_states=True))


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _check_batch(c, loader, step, batch):
    """The batch holds exactly what plan(step) says: rows, flips, caption drops."""
    idx, flip, drop = loader.plan(step)[:3]
    assert np.array_equal(batch["latents"].numpy(), c.latents[idx, flip.astype(int)].astype(np.float32))
    tokens = np.where(drop[:, None], c.empty_tokens[None], c.tokens[idx])
    assert np.array_equal(batch["tokens"].numpy(), tokens)
    states = np.where(drop[:, None, None], c.empty_states[None], c.states[idx]).astype(np.float32)
    assert np.array_equal(batch["states"].numpy(), states)
    return idx, flip, drop


def test_loader_every_sample_once_per_epoch(cache):
    loader = Loader(cache, 4, seed=3, cond_drop=0.3)
    assert loader.batches_per_epoch == 6
    epochs = [[], []]
    for step, batch in enumerate(_take(loader, 12)):
        assert batch["latents"].shape == (4, 3, 8, 8) and batch["tokens"].dtype == torch.long
        epochs[step // 6] += list(_check_batch(cache, loader, step, batch)[0])
    assert sorted(epochs[0]) == list(range(24)) and sorted(epochs[1]) == list(range(24)) and epochs[0] != epochs[1]
    loader.close()


def test_loader_ranks_see_disjoint_halves_of_the_global_batch(cache):
    single = Loader(cache, 8, seed=1, cond_drop=0.5)
    ranks = [Loader(cache, 4, seed=1, rank=r, world_size=2, cond_drop=0.5) for r in range(2)]
    seen = [set(), set()]
    for step in range(3):  # one epoch
        parts = [next(r) for r in ranks]
        for r in range(2):
            seen[r] |= set(_check_batch(cache, ranks[r], step, parts[r])[0])
        whole = next(single)  # the two ranks together = the single-process global batch
        for k in whole:
            assert torch.equal(torch.cat([p[k] for p in parts]), whole[k])
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(24))


def test_loader_resume_continues_the_same_sequence(cache):
    a = Loader(cache, 5, seed=2, cond_drop=0.3, prefetch=3)
    _take(a, 7)
    sd = a.state_dict()
    assert sd["step"] == 7  # consumed, not prefetched
    expected = _take(a, 6)  # crosses an epoch boundary (4 batches per epoch)
    b = Loader(cache, 5, seed=2, cond_drop=0.3)
    b.load_state_dict(sd)
    for x, y in zip(expected, _take(b, 6)):
        assert all(torch.equal(x[k], y[k]) for k in x)
    sync = Loader(cache, 5, seed=2, cond_drop=0.3, prefetch=0)  # no background thread: the same batches
    sync.load_state_dict(sd)
    assert torch.equal(next(sync)["latents"], expected[0]["latents"])


def test_loader_flip_and_drop_do_not_depend_on_batch_size(cache):
    flags = []
    for batch_size, world_size in [(2, 1), (3, 2), (8, 1)]:
        per_sample = {}
        loaders = [Loader(cache, batch_size, seed=4, rank=r, world_size=world_size, cond_drop=0.5)
                   for r in range(world_size)]
        for loader in loaders:
            for step in range(loader.batches_per_epoch):
                idx, flip, drop = _check_batch(cache, loader, step, next(loader))
                per_sample.update({int(i): (bool(f), bool(d)) for i, f, d in zip(idx, flip, drop)})
            loader.close()
        flags.append(per_sample)
    assert flags[0] == flags[1] == flags[2] and len(flags[0]) == 24
    values = list(flags[0].values())
    assert 0 < sum(f for f, _ in values) < 24 and 0 < sum(d for _, d in values) < 24
    no_flip = Loader(cache, 4, seed=4, flip=False)
    assert not no_flip.plan(0)[1].any()
    assert torch.equal(next(no_flip)["latents"], torch.from_numpy(cache.latents[no_flip.plan(0)[0], 0]).float())



##### flips and captions: a mirrored image says "right" where the image said "left"

def swap_left_right(caption):
    """The reference: the caption of the mirrored image, by word."""
    return re.sub(r"\b(left|right)\b", lambda m: {"left": "right", "right": "left"}[m[1]], caption)


@pytest.fixture(scope="module")
def scene_cache(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("scenes") / "cache")
    return data.LatentCache(data.build_cache("scenes:96", out, 32, "none", "tiny"))


def _epoch_tokens(loader):
    """(sample index, flipped, dropped, tokens) of every sample of the loader's first epoch."""
    rows = []
    for step in range(loader.batches_per_epoch):
        idx, flip, drop = loader.plan(step)[:3]
        rows += zip(idx, flip, drop, next(loader)["tokens"])
    loader.close()
    return rows


def test_flipped_samples_get_the_mirrored_caption_tokens(scene_cache):
    te = encoders.load_text_encoder("tiny")
    m, captions = scene_cache.manifest, scene_cache.captions()
    ids = lambda word: te.token_ids(word)[1:-1]  # one BPE token each: "left</w>", "right</w>"
    assert m["mirror_tokens"] == [ids("left") + ids("right")]
    mirrored = [i for i, t in enumerate(captions) if swap_left_right(t) != t]
    assert m["mirror_captions"] == len(mirrored) > 0
    seen = collections.Counter()
    for i, flip, drop, tokens in _epoch_tokens(Loader(scene_cache, 8, seed=1, cond_drop=0.2)):
        text = "" if drop else swap_left_right(captions[i]) if flip else captions[i]
        assert torch.equal(tokens, te.tokenize([text])[0]), (captions[i], flip, drop)
        seen[(i in mirrored and not drop, bool(flip))] += 1
    assert seen[(True, True)] and seen[(True, False)]  # mirrored captions both flipped and not were checked


def test_a_cache_without_mirror_tokens_loads_as_before(scene_cache, tmp_path):
    """A cache built before the manifest kept mirror_tokens: the loader hands out its token rows unchanged."""
    old = tmp_path / "old"
    old.mkdir()
    for name in os.listdir(scene_cache.path):
        os.link(os.path.join(scene_cache.path, name), old / name)
    manifest = {k: v for k, v in scene_cache.manifest.items() if k not in ("mirror_tokens", "mirror_captions")}
    os.remove(old / "manifest.json")
    (old / "manifest.json").write_text(json.dumps(manifest))
    rows = _epoch_tokens(Loader(data.LatentCache(str(old)), 8, seed=1))
    assert any(flip for _, flip, _, _ in rows)
    for i, flip, drop, tokens in rows:
        assert np.array_equal(tokens.numpy(), scene_cache.tokens[i])


def test_text_states_cannot_be_mirrored_a_warning_once(tmp_path):
    c = data.LatentCache(data.build_cache("scenes:32", str(tmp_path / "c"), 32, "none", "tiny", text_states=True))
    assert c.manifest["mirror_captions"] > 0
    with pytest.warns(UserWarning, match="text states cannot be mirrored") as caught:
        loaders = [Loader(c, 8, seed=1), Loader(c, 8, seed=1)]
    assert len(caught) == 1  # once per cache and process, not per loader
    rows = _epoch_tokens(loaders[0])
    assert all(np.array_equal(tokens.numpy(), c.tokens[i]) for i, _, _, tokens in rows)  # as stored
    loaders[1].close()


##### aspect buckets and several captions

def test_bucketed_batches_each_from_one_bucket_every_sample_once_per_epoch(mixed):
    c = data.LatentCache(mixed)
    loader = Loader(c, 4, seed=5, cond_drop=0.2, prefetch=2, flip=False)  # (flips: the tests above)
    assert loader.batches_per_epoch == 2 + 2 + 2 + 2 + 4  # 8, 8, 8, 8, 16 images in 4s
    epochs = [[], []]
    for step in range(2 * loader.batches_per_epoch):
        batch = next(loader)
        idx, flip, drop, caption, b = loader.plan(step)
        assert set(c.bucket[idx]) == {b} and batch["latents"].shape[2:] == c.latent_shapes[b][1:]
        assert np.array_equal(batch["latents"].numpy(), c.bucket_latents[b][c.row[idx], flip.astype(int)])
        assert np.all((caption >= c.caption_start[idx]) & (caption < c.caption_start[idx] + c.ncaptions[idx]))
        want = np.where(drop[:, None], c.empty_tokens[None], c.tokens[caption])
        assert np.array_equal(batch["tokens"].numpy(), want)
        epochs[step // loader.batches_per_epoch] += list(idx)
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(48)) and epochs[0] != epochs[1]
    shapes = [tuple(next(loader)["latents"].shape[2:]) for _ in range(loader.batches_per_epoch)]
    assert len(set(shapes)) == 5 and shapes != sorted(shapes)  # buckets interleave, in an order drawn per epoch
    loader.close()


def test_bucketed_ranks_draw_the_same_bucket_and_together_make_the_global_batch(mixed):
    c = data.LatentCache(mixed)
    single = Loader(c, 8, seed=2, cond_drop=0.3, prefetch=0)
    ranks = [Loader(c, 4, seed=2, rank=r, world_size=2, cond_drop=0.3, prefetch=0) for r in range(2)]
    assert single.batches_per_epoch == ranks[0].batches_per_epoch == 6
    for step in range(9):  # an epoch and a half
        parts, whole = [next(r) for r in ranks], next(single)
        assert ranks[0].plan(step)[4] == ranks[1].plan(step)[4] == single.plan(step)[4]
        for k in whole:
            assert torch.equal(torch.cat([p[k] for p in parts]), whole[k])


def test_bucketed_resume_mid_epoch_is_exact(mixed):
    a = Loader(mixed, 4, seed=7, cond_drop=0.3, prefetch=3)
    _take(a, 5)
    sd = a.state_dict()
    expected = _take(a, 12)  # across the epoch boundary (12 batches per epoch)
    b = Loader(mixed, 4, seed=7, cond_drop=0.3, prefetch=1)
    b.load_state_dict(sd)
    for x, y in zip(expected, _take(b, 12)):
        assert all(torch.equal(x[k], y[k]) for k in x)
    a.close(), b.close()


def test_each_caption_of_an_image_is_drawn_per_epoch_whatever_the_batch(mixed):
    c = data.LatentCache(mixed)
    picks = collections.defaultdict(collections.Counter)  # image -> caption row -> epochs it was drawn
    for batch_size, world in ((4, 1), (8, 1), (4, 2)):
        seen = {}
        for rank in range(world):
            loader = Loader(c, batch_size, seed=3, rank=rank, world_size=world, prefetch=0)
            for step in range(loader.batches_per_epoch * 20):
                idx, _, _, caption, _ = loader.plan(step)
                for i, cap in zip(idx, caption):
                    seen[step // loader.batches_per_epoch, int(i)] = int(cap)
        if batch_size == 4 and world == 1:
            first = seen
            for (_, i), cap in seen.items():
                picks[i][cap] += 1
        assert seen == first  # a sample's caption is a function of (seed, epoch, index): no batch split changes it
    several = [i for i in range(48) if c.ncaptions[i] > 1]
    assert several and all(len(picks[i]) == 2 and min(picks[i].values()) >= 3 for i in several)  # both, ~10 of 20


def test_a_bucket_smaller_than_the_global_batch_is_left_out_with_a_warning(mixed):
    with pytest.warns(UserWarning, match="left out"):
        loader = Loader(mixed, 12, seed=0, prefetch=0)
    assert loader.left_out == {"12x24": 8, "12x20": 8, "16x16": 8, "20x12": 8}
    assert loader.batches_per_epoch == 1 and loader.plan(0)[4] == 4


def test_bucketed_accumulation_splits_one_step_of_one_bucket(mixed):
    """accum 2 x micro-batch 4 reads, step by step, the images of micro-batch 8 x accum 1, in train_step's row order."""
    c = data.LatentCache(mixed)
    one, two = Loader(c, 8, seed=4, prefetch=0), Loader(c, 4, seed=4, prefetch=0, accum=2)
    assert two.batches_per_epoch == 2 * one.batches_per_epoch == 12
    for step in range(9):
        whole, parts = next(one), [next(two), next(two)]
        assert two.plan(2 * step)[4] == two.plan(2 * step + 1)[4] == one.plan(step)[4]
        for k in whole:
            assert torch.equal(torch.cat([p[k] for p in parts]), whole[k])
