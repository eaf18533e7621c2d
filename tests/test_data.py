"""data.py: preprocessing, buckets, the resumable cache (CPU, small files); readers: test_sources.py."""
import io, json, os, subprocess, sys, tarfile

import numpy as np
import pytest
from PIL import Image

import data
from run_utils import old_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG = " ".join(f"word{i}" for i in range(500))


def _png(arr, mode=None):
    b = io.BytesIO()
    Image.fromarray(arr, mode).save(b, "PNG")
    return b.getvalue()


def _write(path, payload):
    with open(path, "wb") as f:
        f.write(payload)


def _keys(cache_path):
    return [json.loads(l)["key"] for l in open(os.path.join(cache_path, "captions.jsonl"))]


def _tar(path, samples):  # samples: list of (key, {ext: bytes})
    with tarfile.open(path, "w") as tf:
        for key, files in samples:
            for ext, payload in files.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(payload)
                tf.addfile(ti, io.BytesIO(payload))


def _file_bytes(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


##### bad input

def test_bad_input_zoo(tmp_path):
    d = tmp_path / "zoo"
    d.mkdir()
    R = 32
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    jpeg = jpeg.getvalue()
    half = np.zeros((R, R), np.uint8)
    half[:, R // 2:] = 255  # right half opaque
    rgba = np.zeros((R, R, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, half
    pal = Image.fromarray((half > 0).astype(np.uint8), "P")
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal_png = io.BytesIO()
    pal.save(pal_png, "PNG", transparency=0)
    gray16 = np.zeros((R, R), np.uint16)
    gray16[:, : R // 2] = 65535
    cmyk = io.BytesIO()
    Image.new("CMYK", (R, R), (0, 0, 0, 0)).save(cmyk, "JPEG")
    good = {"rgb.jpg": jpeg, "rgba.png": _png(rgba), "palette.png": pal_png.getvalue(), "gray16.png": _png(gray16),
            "gray.png": _png(np.full((R, R), 128, np.uint8)), "cmyk.jpg": cmyk.getvalue(),
            "la.png": _png(np.stack([np.zeros((R, R), np.uint8), half], -1), "LA"),
            "upscaled.png": _png(np.full((20, 20, 3), 200, np.uint8)),
            "nonutf8.png": _png(np.zeros((R, R, 3), np.uint8)),
            "long.png": _png(np.zeros((R, R, 3), np.uint8))}
    bad = {"truncated.jpg": jpeg[: len(jpeg) // 2], "zero.jpg": b"", "text.jpg": b"hello, I am not a JPEG\n",
           "tiny.png": _png(np.zeros((8, 8, 3), np.uint8)), "nocaption.png": _png(np.zeros((R, R, 3), np.uint8)),
           "emptycaption.png": _png(np.zeros((R, R, 3), np.uint8))}
    for name, payload in {**good, **bad}.items():
        _write(d / name, payload)
        stem = os.path.splitext(name)[0]
        caption = {"nonutf8": b"caf\xe9 au lait \xff", "long": LONG.encode(), "emptycaption": b"  \n"}.get(
            stem, f"a {stem} image".encode())
        if stem != "nocaption":
            _write(d / f"{stem}.txt", caption)
    c = data.LatentCache(data.ensure_cache(str(d), R, "none", "tiny", cache_dir=str(tmp_path / "cache")))
    m = c.manifest
    assert m["skipped"] == {"decode_error": 1, "empty_file": 1, "not_an_image": 1, "too_small": 1,
                            "missing_caption": 1, "empty_caption": 1}
    assert m["fixed"] == {"non_utf8_caption": 1, "caption_truncated": 1}
    keys = _keys(c.path)
    assert sorted(keys) == sorted(good) and len(c) == len(good) == m["count"]
    lat = {k: c.latents[i, 0].astype(np.float32) for i, k in enumerate(keys)}  # (3, R, R) in [-1, 1]
    white = np.ones(3)
    left, right = (slice(None), slice(None), slice(0, R // 2)), (slice(None), slice(None), slice(R // 2, None))
    # alpha over white
    assert (lat["rgba.png"][left] == 1).all() and np.allclose(lat["rgba.png"][right].mean((1, 2)), [1, -1, -1])
    assert (lat["palette.png"][left] == 1).all() and np.allclose(lat["palette.png"][right].mean((1, 2)), [-1, -1, 1])
    assert (lat["la.png"][left] == 1).all() and (lat["la.png"][right] == -1).all()
    # 16-bit rescaled, not clipped
    assert (lat["gray16.png"][left] == 1).all() and (lat["gray16.png"][right] == -1).all()
    assert np.allclose(lat["gray.png"], 128 / 127.5 - 1, atol=1e-3)
    assert np.allclose(lat["upscaled.png"], 200 / 127.5 - 1, atol=1e-3)
    assert np.allclose(lat["cmyk.jpg"].mean((1, 2)), white, atol=0.02)
    texts = dict(zip(keys, c.captions()))
    assert "\ufffd" in texts["nonutf8.png"] and texts["nonutf8.png"].startswith("caf")
    long_tokens = c.tokens[keys.index("long.png")]
    assert (long_tokens != 0).all() and long_tokens[-1] == long_tokens.max()  # truncated, EOT kept last


##### the resumable cache

def test_kill_and_resume_gives_the_identical_cache(tmp_path, monkeypatch):
    kw = dict(resolution=16, vae="none", text_encoder="tiny", text_states=True, batch_size=4, chunk_size=8)
    once = data.build_cache("shapes:40", str(tmp_path / "once"), **kw)
    calls = []

    def crash(f, payload):  # 7 files x 2 batches = 14 appends per chunk: die inside the third chunk
        calls.append(1)
        if len(calls) == 31:
            raise KeyboardInterrupt("killed")
        f.write(payload)

    monkeypatch.setattr(data, "_append", crash)
    out = str(tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        data.build_cache("shapes:40", out, **kw)
    progress = json.load(open(os.path.join(out, "progress.json")))
    assert progress["items"] == 16 and progress["count"] == 16
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    # uncommitted rows on disk
    assert os.path.getsize(os.path.join(out, "latents.npy")) > progress["sizes"]["latents.npy"]
    with pytest.raises(data.DataError, match="not a finished cache"):
        data.LatentCache(out)
    monkeypatch.undo()
    data.build_cache("shapes:40", out, **kw)
    assert _file_bytes(out) == _file_bytes(once)  # byte for byte: no row missing or duplicated
    c = data.LatentCache(out)
    assert len(c) == 40 and _keys(out) == [f"shape{i}" for i in range(40)] and c.states.shape == (40, 77, 64)


def _kill_in_third_chunk(monkeypatch):
    """The build dies inside its third chunk's commit, after two of its appends (uncommitted rows left on disk)."""
    real_commit, commits, appends = data._commit_chunk, [], []

    def crash(f, payload):
        appends.append(1)
        if len(appends) > 2:
            raise KeyboardInterrupt("killed")
        f.write(payload)

    def commit(*a, **k):
        commits.append(1)
        if len(commits) == 3:
            monkeypatch.setattr(data, "_append", crash)
        return real_commit(*a, **k)
    monkeypatch.setattr(data, "_commit_chunk", commit)


def test_a_killed_bucketed_build_resumes_with_its_buckets(tmp_path, monkeypatch):
    """The first pass's bucket plan (progress.json's `into`) is committed with the first chunk; a rerun reuses it
    and gives the cache of one uninterrupted build, byte for byte."""
    from conftest import mixed_folder
    src = mixed_folder(tmp_path / "im", n=42)
    kw = dict(resolution=16, vae="none", text_encoder="tiny", batch_size=4, chunk_size=8, aspect_buckets=5, patch=4,
              min_bucket=8)
    once = data.build_cache(src, str(tmp_path / "once"), **kw)
    _kill_in_third_chunk(monkeypatch)
    out = str(tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        data.build_cache(src, out, **kw)
    progress = json.load(open(os.path.join(out, "progress.json")))
    assert progress["items"] == 16 and progress["into"] and progress["min_bucket"] == 8
    monkeypatch.undo()
    monkeypatch.setattr(data, "plan_buckets", lambda *a: pytest.fail("the first pass ran again"))
    data.build_cache(src, out, **kw)
    assert _file_bytes(out) == _file_bytes(once)


def test_a_build_killed_before_buckets_and_captions_existed_continues(tmp_path, monkeypatch):
    """A progress.json of the code before this layout (no bucket.npy / ncaptions.npy): its committed images get
    those rows (one square bucket, one caption each), and the build continues to the cache of one whole build."""
    kw = dict(resolution=16, vae="none", text_encoder="tiny", batch_size=4, chunk_size=8)
    once = data.build_cache("shapes:24", str(tmp_path / "once"), **kw)
    _kill_in_third_chunk(monkeypatch)
    out = str(tmp_path / "old")
    with pytest.raises(KeyboardInterrupt):
        data.build_cache("shapes:24", out, **kw)
    monkeypatch.undo()
    prog = json.load(open(os.path.join(out, "progress.json")))
    assert prog["count"] == 16
    for name in ("bucket.npy", "ncaptions.npy"):  # as the old code left it
        os.remove(os.path.join(out, name))
        del prog["sizes"][name]
    json.dump(prog, open(os.path.join(out, "progress.json"), "w"))
    data.build_cache("shapes:24", out, **kw)
    assert _file_bytes(out) == _file_bytes(once)



@pytest.mark.slow
@pytest.mark.skipif(data.fcntl is None, reason="the build lock is POSIX flock")
def test_a_second_build_of_one_cache_waits_for_the_first(tmp_path):
    """Two runs started together once interleaved their appends into a wrong cache without an error: while one
    process holds the build lock, another builder of the same folder writes nothing; once it is released, the
    waiting builder finishes a cache byte-for-byte equal to a lone build."""
    import fcntl
    once = data.build_cache("shapes:24", str(tmp_path / "once"), 16, "none", "tiny")
    out = tmp_path / "shared"
    out.mkdir()
    holder = open(out / ".lock", "a")
    fcntl.flock(holder, fcntl.LOCK_EX)  # this test is "the first build", still running
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "data.py"), "--data", "shapes:24", "--out", str(out),
                          "--resolution", "16", "--vae", "none", "--text_encoder", "tiny", "--aspect_buckets", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = ""  # it imports torch, checks the folder, then says it waits (however busy the CPU)
        for line in p.stdout:  # (warnings printed before it are skipped)
            first += line
            if "another process is building this cache" in line:
                break
        assert "another process is building this cache" in first, first
        with pytest.raises(subprocess.TimeoutExpired):
            p.wait(timeout=3)  # and it does wait
        assert sorted(os.listdir(out)) == [".lock"]  # nothing written while the lock is held
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        holder.close()
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, first + log
    assert _file_bytes(str(out)) == _file_bytes(once)

def files_of(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_cache_of_other_settings_is_never_thrown_away(tmp_path):
    """An explicit cache_dir that holds a finished cache of other settings, or whose source changed since, is an
    error that leaves every byte as it was (rebuilding would throw away hours of VAE encoding)."""
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(src / f"{i}.png")
        (src / f"{i}.txt").write_text(f"caption {i}")
    out = tmp_path / "c"
    data.ensure_cache(str(src), 16, "none", "tiny", cache_dir=str(out))
    before = files_of(out)
    with pytest.raises(data.DataError, match="other settings.*resolution"):
        data.ensure_cache(str(src), 8, "none", "tiny", cache_dir=str(out))
    os.utime(src / "0.png", (1, 1))  # the source changed since the build
    with pytest.raises(data.DataError, match="fingerprint"):
        data.ensure_cache(str(src), 16, "none", "tiny", cache_dir=str(out))
    assert files_of(out) == before


##### aspect buckets, several captions, long captions

def _cover_crop(img, W, H):
    """The issue's rule written out: scale to cover (W, H), the middle W x H kept; an image of the bucket's own aspect
    ratio is a plain resize (nothing is cut)."""
    w, h = img.size
    s = max(W / w, H / h)
    size = (max(W, round(w * s)), max(H, round(h * s)))
    if w * H == h * W:
        assert size == (W, H)
    left, top = (size[0] - W) // 2, (size[1] - H) // 2
    img = img.convert("RGB").resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(img.crop((left, top, left + W, top + H)))


@pytest.mark.parametrize("resolution, aspect, multiple, want", [
    (32, 2, 2, (46, 22)), (32, 0.5, 2, (22, 46)), (64, 2, 2, (90, 46)),  # issue 24's pixel-space, patch-2 buckets
    (256, 2, 16, (368, 176)), (256, 1, 16, (256, 256)), (40, 2, 4, (56, 28)),  # sd-vae-ft-mse x patch 2; 40 px demo
    (40, 1, 16, (48, 48)),   # 40 / 16 = 2.5: halves round up
    (8, 0.25, 16, (16, 16)),  # never below one multiple
])
def test_bucket_size_against_hand_computed_values(resolution, aspect, multiple, want):
    """W = sqrt(R^2 a), H = sqrt(R^2 / a), each to the nearest multiple: e.g. 32 px, a = 2: 45.25 -> 46, 22.63 -> 22."""
    assert data.bucket_size(resolution, aspect, multiple) == want


def test_bucket_sizes_are_the_aspect_ratios_evenly_in_log():
    sizes = data.bucket_sizes(256, 5, 2.0, 16)
    assert sizes == [(176, 368), (208, 304), (256, 256), (304, 208), (368, 176)]  # 256 * 2^(+-1/2, +-1/4, 0), / 16
    assert all(W % 16 == 0 and H % 16 == 0 and 0.85 < W * H / 256 ** 2 < 1.15 for W, H in sizes)
    assert data.bucket_sizes(16, 9, 2.0, 4) == [(12, 24), (12, 20), (16, 16), (20, 12), (24, 12)]  # kept once


def test_small_buckets_merge_into_their_nearest_neighbour():
    sizes = [(12, 24), (12, 20), (16, 16), (20, 12), (24, 12)]
    assert data.merge_small(sizes, [8, 8, 8, 8, 16], 8) == [0, 1, 2, 3, 4]
    assert data.merge_small(sizes, [8, 3, 8, 8, 16], 8) == [0, 0, 2, 3, 4]  # 1 joins 0 (nearer in log than 2)
    assert data.merge_small(sizes, [0, 0, 8, 2, 16], 8) == [2, 2, 2, 4, 4]  # empty ones point at the nearest kept
    assert data.merge_small(sizes, [1, 1, 1, 1, 1], 8) == [1, 1, 1, 1, 1]  # smallest first, ties to the lower index
    assert data.merge_small(sizes, [0, 0, 0, 0, 0], 8) == [0, 1, 2, 3, 4]  # nothing usable: the build says so


def test_each_image_goes_to_its_nearest_bucket_covered_and_centre_cropped(mixed):
    from conftest import MIXED_SIZES
    c = data.LatentCache(mixed)
    m = c.manifest
    assert [b["size"] for b in m["buckets"]] == [[12, 24], [12, 20], [16, 16], [20, 12], [24, 12]]
    assert [b["count"] for b in m["buckets"]] == [len(x) for x in c.members] == [8, 8, 8, 8, 16]
    assert m["count"] == 48 and m["captions"] == 64 and m["aspect_buckets"] == 5 and m["merged"] == {}
    images = os.path.join(os.path.dirname(mixed), "images")
    for i in range(48):
        w, h = MIXED_SIZES[i % len(MIXED_SIZES)]
        b = int(np.argmin([abs(np.log(w / h) - np.log(W / H)) for W, H in c.sizes]))  # nearest in log aspect
        assert c.bucket[i] == b, (i, w, h)
        W, H = c.sizes[b]
        want = _cover_crop(Image.open(os.path.join(images, f"{i}.png")), W, H)  # (H, W, 3)
        got = c.bucket_latents[b][c.row[i], 0]  # (3, H, W) in [-1, 1]: vae "none" caches the pixels
        assert np.abs((got.astype(np.float32) + 1) * 127.5 - want.transpose(2, 0, 1)).max() < 0.6
        assert np.array_equal(c.bucket_latents[b][c.row[i], 1], got[:, :, ::-1])  # the mirrored image


def test_a_bucket_smaller_than_min_bucket_is_merged_and_said(tmp_path, capsys):
    from conftest import mixed_folder
    out = data.build_cache(mixed_folder(tmp_path / "im", n=42), str(tmp_path / "c"), 16, "none", "tiny",
                           aspect_buckets=5, patch=4, min_bucket=8)  # 7 images a size: (40, 30) and (30, 52) short
    m = data.LatentCache(out).manifest
    assert sum(b["count"] for b in m["buckets"]) == 42 and all(b["count"] >= 8 for b in m["buckets"])
    assert m["merged"] and "merged into" in capsys.readouterr().out


def test_an_image_too_small_for_its_bucket_is_skipped_and_counted(tmp_path):
    folder = tmp_path / "im"
    folder.mkdir()
    for name, (w, h) in {"ok": (24, 12), "small": (11, 6), "tall": (12, 24)}.items():  # 11 x 6: a 2.2x upscale
        _write(folder / f"{name}.png", _png(np.zeros((h, w, 3), np.uint8))), _write(folder / f"{name}.txt", b"x")
    c = data.LatentCache(data.build_cache(str(folder), str(tmp_path / "c"), 16, "none", "tiny", aspect_buckets=3,
                                          patch=4))
    assert c.manifest["count"] == 2 and c.manifest["skipped"] == {"too_small": 1}
    assert c.sizes == [(12, 24), (24, 12)] and c.latent_shapes == [(3, 24, 12), (3, 12, 24)]


@pytest.mark.parametrize("chunks", [2, 3])
def test_text_chunks_cache_the_tokens_of_every_chunk(tmp_path, chunks):
    from encoders import load_text_encoder
    te = load_text_encoder("tiny", chunks=chunks)
    folder = tmp_path / "im"
    folder.mkdir()
    texts = {"short": "a red fox", "long": LONG}  # LONG: 500 words, past every chunk
    for name, text in texts.items():
        _write(folder / f"{name}.png", _png(np.zeros((16, 16, 3), np.uint8))), _write(folder / f"{name}.txt",
                                                                                    text.encode())
    c = data.LatentCache(data.build_cache(str(folder), str(tmp_path / "c"), 16, "none", "tiny", text_chunks=chunks,
                                          text_states=True))
    assert c.tokens.shape == (2, 77 * chunks) and c.manifest["context_length"] == 77 * chunks
    order = [json.loads(l)["text"] for l in open(os.path.join(c.path, "captions.jsonl"))]
    ref = te.tokenize(order)
    assert np.array_equal(c.tokens, ref.numpy()) and c.manifest["fixed"] == {"caption_truncated": 1}
    states, pooled = te.encode(ref)
    assert np.allclose(c.states.astype(np.float32), states.numpy(), atol=2e-2)
    assert c.empty_tokens.shape == (77 * chunks,)


def test_a_cache_of_other_layout_settings_is_an_error_that_keeps_it(tmp_path):
    from conftest import mixed_folder
    src, out = mixed_folder(tmp_path / "im", n=12), str(tmp_path / "c")
    data.build_cache(src, out, 16, "none", "tiny", aspect_buckets=3, patch=4)
    before = _file_bytes(out)
    for layout in (dict(), dict(aspect_buckets=5, patch=4), dict(aspect_buckets=3, patch=2), dict(text_chunks=2)):
        with pytest.raises(data.DataError, match="other settings"):
            data.build_cache(src, out, 16, "none", "tiny", **layout)
        with pytest.raises(data.DataError, match="does not match"):
            data.ensure_cache(out, 16, "none", "tiny", **layout)
    assert _file_bytes(out) == before
    assert data.ensure_cache(out, 16, "none", "tiny", aspect_buckets=3, patch=4) == out


def test_a_cache_from_before_buckets_and_captions_still_loads(tmp_path):
    out = data.build_cache("shapes:12", str(tmp_path / "c"), 16, "none", "tiny")
    new = data.LatentCache(out)
    old_layout(out)
    old = data.LatentCache(out)
    assert old.sizes == [(16, 16)] and np.array_equal(old.latents, new.latents)
    assert list(old.caption_start) == list(range(12)) and list(old.row) == list(range(12))
    assert data.ensure_cache(out, 16, "none", "tiny") == out  # and it is still the cache these settings ask for


def test_layout_keys_are_checked_with_exit_code_2(tmp_path, capsys):
    for argv, needle in ((["--aspect_buckets", "1"], "aspect_buckets 1"), (["--aspect_buckets", "-2"], "aspect_bu"),
                         (["--max_aspect", "0.5"], "max_aspect 0.5"), (["--text_chunks", "4"], "must be 1..3"),
                         (["--patch", "0"], "--patch 0"), (["--min_bucket", "0"], "--min_bucket 0")):
        with pytest.raises(SystemExit) as e:
            data.main(["--data", "shapes:4", "--out", str(tmp_path / "c"), "--vae", "none", "--text_encoder", "tiny",
                       *argv])
        assert e.value.code == 2 and needle in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "c")
