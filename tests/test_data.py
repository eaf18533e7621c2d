"""data.py: sources, preprocessing, the frozen encoders, the resumable cache and the loader (CPU, small files)."""
import collections, io, json, os, re, subprocess, sys, tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import data

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


##### sources

def test_each_source_form_gives_the_same_cache(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    sizes = [(40, 24), (24, 40), (16, 16), (33, 20), (64, 64)]  # (w, h); resolution 16
    images = [_png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    captions = [f"caption number {i}" for i in range(len(images))]
    folder, meta, shards = tmp_path / "txt", tmp_path / "meta", tmp_path / "tars"
    for d in (folder, meta, shards):
        d.mkdir()
    with open(meta / "metadata.jsonl", "w") as f:
        for i, (img, cap) in enumerate(zip(images, captions)):
            _write(folder / f"img{i}.png", img), _write(folder / f"img{i}.txt", cap.encode())
            _write(meta / f"img{i}.png", img)
            f.write(json.dumps({"file_name": f"img{i}.png", "text": cap}) + "\n")
    samples = [(f"{i:06d}", {"png": img, "txt": cap.encode(), "json": b"{}"})
               for i, (img, cap) in enumerate(zip(images, captions))]
    _tar(shards / "00000.tar", samples[:3]), _tar(shards / "00001.tar", samples[3:])
    sources = [str(folder), str(meta), str(shards), str(shards / "*.tar")]
    kinds = [data.source_kind(s) for s in sources]
    assert kinds == ["captioned_images", "imagefolder", "webdataset", "webdataset"]
    caches = [data.LatentCache(data.ensure_cache(s, 16, "none", "tiny", cache_dir=str(tmp_path / f"c{i}")))
              for i, s in enumerate(sources)]
    ref = caches[0]
    assert len(ref) == 5 and ref.latents.shape == (5, 2, 3, 16, 16) and ref.captions() == captions
    for c in caches[1:]:
        assert np.array_equal(c.latents, ref.latents) and np.array_equal(c.tokens, ref.tokens)
        assert c.captions() == captions
    # vae "none" end to end: a 16x16 image is cached as its exact pixels in [-1, 1], index 1 as its mirror image
    pixels = np.asarray(Image.open(io.BytesIO(images[2]))).astype(np.float32).transpose(2, 0, 1) / 127.5 - 1
    assert np.array_equal(ref.latents[2, 0], pixels.astype(np.float16))
    assert np.array_equal(ref.latents[2, 1], pixels[:, :, ::-1].astype(np.float16))
    # an existing cache is a source too: returned as is when its settings match, a clear error when not
    assert data.ensure_cache(ref.path, 16, "none", "tiny") == ref.path
    with pytest.raises(data.DataError, match="resolution"):
        data.ensure_cache(ref.path, 32, "none", "tiny")
    # default location cache/<slug>; a finished cache is reused without loading any encoder
    monkeypatch.chdir(tmp_path)
    path = data.ensure_cache(str(folder), 16, "none", "tiny")
    assert path.startswith("cache" + os.sep) and np.array_equal(data.LatentCache(path).latents, ref.latents)
    monkeypatch.setattr(data, "load_text_encoder", lambda *a, **k: pytest.fail("rebuilt a finished cache"))
    assert data.ensure_cache(str(folder), 16, "none", "tiny") == path


def test_shapes_are_deterministic_and_match_their_captions():
    for i in range(30):
        caption, img = data.shape_sample(i, 7, 32)
        caption2, img2 = data.shape_sample(i, 7, 32)
        assert caption == caption2 and np.array_equal(np.asarray(img), np.asarray(img2))
        article, color, kind, _, _, background, _ = caption.split()
        assert article == ("an" if color == "orange" else "a"), caption
        assert caption == data.shapes_caption(color, kind, background) and kind in data.SHAPE_KINDS
        a = np.asarray(img)
        bg = (a == data.SHAPE_BACKGROUNDS[background]).all(-1)
        fg = (a == data.SHAPE_COLORS[color]).all(-1)
        assert (bg | fg).all()  # flat colours: the probe in evaluate.py reads them back
        ys, xs = np.nonzero(fg)
        w, h = np.ptp(xs) + 1, np.ptp(ys) + 1
        # square bounding box: not clipped by the border
        assert abs(w - h) <= 1 and 0.35 * 32 - 1 <= w <= 0.70 * 32 + 1, (w, h)
    assert [data.shape_sample(i, 0, 16)[0] for i in range(10)] != [data.shape_sample(i, 1, 16)[0] for i in range(10)]
    assert data._shapes_args("shapes") == (data.SHAPES_DEFAULT_COUNT, 0)
    assert data._shapes_args("shapes:5000") == (5000, 0)



def test_scenes_source_builds_the_scene_samples(tmp_path):
    """"scenes:N[:SEED]" is a built-in source beside shapes: its cache holds scenes.scene_sample(i, SEED, R) as they
    are (vae none: the exact pixels), keyed scene<i>, and its fingerprint names the renderer's version."""
    import scenes
    c = data.LatentCache(data.ensure_cache("scenes:6:3", 32, "none", "tiny", cache_dir=str(tmp_path / "c")))
    want = [scenes.scene_sample(i, 3, 32) for i in range(6)]
    assert _keys(c.path) == [f"scene{i}" for i in range(6)] and c.captions() == [t for t, _ in want]
    pixels = np.stack([np.asarray(im) for _, im in want]).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
    assert np.array_equal(c.latents[:, 0], pixels.astype(np.float16))
    assert data._scenes_args("scenes") == (data.SCENES_DEFAULT_COUNT, 0) and data.source_kind("scenes:5") == "scenes"
    assert data.source_fingerprint("scenes:6:3") != data.source_fingerprint("scenes:6:4")
    before = data.source_fingerprint("scenes:6:3")
    data.SCENES_VERSION, old = "scenes-v2", data.SCENES_VERSION
    try:
        assert data.source_fingerprint("scenes:6:3") != before  # a new renderer never reuses an old cache
    finally:
        data.SCENES_VERSION = old


@pytest.mark.parametrize("source, want", [("scenes:0", "count must be >= 1, got 0"),
                                          ("scenes:-3", "count must be >= 1, got -3")])
def test_scenes_count_below_one_is_a_one_line_error(tmp_path, capsys, source, want):
    with pytest.raises(data.DataError, match=want):
        data.ensure_cache(source, 32, "none", "tiny", cache_dir=str(tmp_path / "c"))
    assert data.main(["--data", source, "--out", str(tmp_path / "o"), "--resolution", "32", "--vae", "none",
                      "--text_encoder", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and want in err[0] and not (tmp_path / "o").exists()
    # and a resolution the scenes reader cannot read is refused before anything is rendered
    with pytest.raises(data.DataError, match=">= 32 px"):
        data.ensure_cache("scenes:4", 16, "none", "tiny", cache_dir=str(tmp_path / "small"))


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


def test_bad_metadata_and_shards(tmp_path):
    img = _png(np.zeros((16, 16, 3), np.uint8))
    meta = tmp_path / "meta"
    meta.mkdir()
    _write(meta / "good.png", img)
    lines = [json.dumps({"file_name": "good.png", "text": "fine"}), "{not json",
             json.dumps({"file_name": "gone.png", "text": "x"}),
             json.dumps({"file_name": "good.png"})]
    _write(meta / "metadata.jsonl", "\n".join(lines).encode())
    m = data.LatentCache(data.ensure_cache(str(meta), 16, "none", "tiny", cache_dir=str(tmp_path / "c1"))).manifest
    assert m["count"] == 1 and m["skipped"] == {"bad_metadata": 1, "missing_file": 1, "missing_caption": 1}
    shards = tmp_path / "shards"
    shards.mkdir()
    _tar(shards / "a.tar", [("k0", {"png": img, "txt": b"zero"}), ("k1", {"txt": b"no image"}),
                            ("k2", {"jpg": img, "txt": b"two"})])
    _write(shards / "b.tar", os.urandom(3000))
    _tar(tmp_path / "full.tar", [("k3", {"png": img, "txt": b"three"}), ("k4", {"png": img, "txt": b"four"})])
    full = open(tmp_path / "full.tar", "rb").read()
    _write(shards / "c.tar", full[: 3 * 512 + len(img) + 512 + 512 + len(img) // 2])  # cut inside k4's image
    c = data.LatentCache(data.ensure_cache(str(shards), 16, "none", "tiny", cache_dir=str(tmp_path / "c2")))
    assert c.captions() == ["zero", "two", "three"]
    # k1 has no image; b.tar is noise; c.tar ends inside k4.png, so k4 lost its caption and the shard is flagged
    assert c.manifest["skipped"] == {"missing_image": 1, "unreadable_shard": 1, "missing_caption": 1,
                                     "truncated_shard": 1}


def test_empty_or_unreadable_source_is_an_error_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    _write(tmp_path / "junk" / "a.jpg", b"not an image")
    _write(tmp_path / "junk" / "a.txt", b"caption")
    for src in [str(tmp_path / n) for n in ("empty", "missing", "nothing*.tar", "junk")]:
        with pytest.raises(data.DataError):
            data.ensure_cache(src, 16, "none", "tiny", cache_dir=str(tmp_path / "out"))
    # the CLI (`python data.py ...` is sys.exit(main())) maps DataError to exit code 2 with a one-line reason
    assert data.main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--vae", "none",
                      "--text_encoder", "tiny"]) == 2
    assert "error:" in capsys.readouterr().err


##### the resumable cache

def test_kill_and_resume_gives_the_identical_cache(tmp_path, monkeypatch):
    kw = dict(resolution=16, vae="none", text_encoder="tiny", text_states=True, batch_size=4, chunk_size=8)
    once = data.build_cache("shapes:40", str(tmp_path / "once"), **kw)
    calls = []

    def crash(f, payload):  # 5 files x 2 batches = 10 appends per chunk: die inside the third chunk
        calls.append(1)
        if len(calls) == 23:
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
                          "--resolution", "16", "--vae", "none", "--text_encoder", "tiny"],
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

##### the frozen encoders

def test_tokenize_is_77_ids_for_empty_short_and_long_captions():
    import open_clip
    te = data.load_text_encoder("tiny")
    captions = ["", "a red circle on a white background", LONG]
    tokens = te.tokenize(captions)
    assert tokens.shape == (3, 77) and tokens.dtype == torch.long
    # open_clip's own tokenizer is the reference
    assert torch.equal(tokens, open_clip.get_tokenizer("ViT-L-14")(captions))
    assert tokens[0, :2].tolist() == [te.sot, te.eot] and (tokens[0, 2:] == 0).all()
    assert (tokens[2] != 0).all() and tokens[2, -1] == te.eot


def test_public_token_helpers_pack_like_open_clips_tokenizer():
    import open_clip
    te = data.load_text_encoder("tiny")
    fits, over = " ".join(["a"] * 75), " ".join(["a"] * 76)  # 77 and 78 ids with start and end of text
    captions = ["", "a red circle on a white background", "caf\u00e9 au lait", fits, over, LONG]
    ids = [te.token_ids(c) for c in captions]
    assert all(i[0] == te.sot and i[-1] == te.eot for i in ids)
    # untruncated: the cache counts the captions over 77 ids in manifest["fixed"]
    assert [len(i) for i in ids[:1] + ids[3:5]] == [2, 77, 78] and len(ids[5]) > 77
    packed = te.pack(ids)
    assert packed.shape == (len(captions), 77) and packed.dtype == torch.long
    assert torch.equal(packed, te.tokenize(captions))
    reference = open_clip.get_tokenizer("ViT-L-14")  # open_clip's own tokenizer, the one "tiny" uses
    assert torch.equal(packed, reference(captions))


def test_tiny_text_tower_distinct_and_identical_across_processes(tmp_path):
    rng_before = torch.get_rng_state()
    te = data.load_text_encoder("tiny")
    assert torch.equal(torch.get_rng_state(), rng_before)  # fixed weights without touching the caller's RNG
    assert (te.dim, te.pooled_dim, te.context_length) == (64, 64, 77)
    captions = ["a red circle on a white background", "a blue square on a black background", ""]
    tokens = te.tokenize(captions)
    states, pooled = te.encode(tokens)
    assert states.shape == (3, 77, 64) and pooled.shape == (3, 64) and states.dtype == torch.float32
    assert torch.allclose(pooled, te.model.encode_text(tokens), atol=1e-6)  # open_clip's encode_text is the reference
    assert (states[0, 1:] - states[1, 1:]).abs().max() > 1e-2 and (pooled[0] - pooled[1]).abs().max() > 1e-2
    # another process (the CLI, with cached text states) gets bit-identical states
    out = tmp_path / "cli"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "--data", "shapes:6", "--out", str(out),
                        "--resolution", "8", "--vae", "none", "--text_encoder", "tiny", "--text_states",
                        "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "bytes" in p.stdout and "per caption" in p.stdout  # the disk cost of text states is printed
    c = data.LatentCache(str(out))
    s, pl = te(c.captions())
    assert np.array_equal(c.states, s.half().numpy()) and np.array_equal(c.pooled, pl.half().numpy())
    assert np.array_equal(c.empty_states, te([""])[0][0].half().numpy())


def test_local_open_clip_folder(tmp_path):
    import open_clip
    cfg = dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=16, width=32, layers=1, head_width=32),
               text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    torch.manual_seed(3)
    model = open_clip.model.CLIP(**cfg).eval()
    (tmp_path / "clip").mkdir()
    json.dump({"model_cfg": cfg}, open(tmp_path / "clip" / "open_clip_config.json", "w"))
    torch.save(model.state_dict(), tmp_path / "clip" / "open_clip_pytorch_model.bin")
    te = data.load_text_encoder(str(tmp_path / "clip"))
    tokens = te.tokenize(["a green triangle", "x"])
    states, pooled = te.encode(tokens)
    assert states.shape == (2, 77, 32) and te.model.visual is None
    assert torch.allclose(pooled, model.encode_text(tokens), atol=1e-6)


def test_vae_wrapper_round_trips_shapes_and_scaling(tmp_path):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    ref = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                        norm_num_groups=4, sample_size=16, scaling_factor=0.5).eval()
    ref.save_pretrained(tmp_path / "vae")
    vae = data.load_vae(str(tmp_path / "vae"))  # same class and code path as stabilityai/sd-vae-ft-mse
    assert (vae.channels, vae.factor, vae.scaling_factor) == (4, 2, 0.5)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = vae.encode(x)
    with torch.no_grad():
        assert z.shape == (2, 4, 8, 8) and torch.allclose(z, ref.encode(x).latent_dist.mean * 0.5, atol=1e-6)
        y = vae.decode(z)
        assert y.shape == x.shape and torch.allclose(y, ref.decode(z / 0.5).sample.clamp(-1, 1), atol=1e-6)
    # through the cache: both flips encoded by the VAE, stored as float16
    c = data.LatentCache(data.build_cache("shapes:3", str(tmp_path / "c"), 16, vae, "tiny"))
    imgs = torch.stack([torch.from_numpy(np.array(data.shape_sample(i, 0, 16)[1])) for i in range(3)])
    imgs = imgs.permute(0, 3, 1, 2).float() / 127.5 - 1
    assert c.manifest["scaling_factor"] == 0.5 and c.latents.shape == (3, 2, 4, 8, 8)
    assert np.allclose(c.latents[:, 0], vae.encode(imgs).numpy(), atol=2e-3)
    assert np.allclose(c.latents[:, 1], vae.encode(imgs.flip(-1)).numpy(), atol=2e-3)
    none = data.load_vae("none")
    assert (none.channels, none.factor, none.scaling_factor) == (3, 1, 1.0)
    assert torch.equal(none.encode(x), x) and torch.equal(none.decode(none.encode(x)), x)


##### the loader

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("loader") / "cache")
    return data.LatentCache(data.build_cache("shapes:24", out, 8, "none", "tiny", text_states=True))


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _check_batch(c, loader, step, batch):
    """The batch holds exactly what plan(step) says: rows, flips, caption drops."""
    idx, flip, drop = loader.plan(step)
    assert np.array_equal(batch["latents"].numpy(), c.latents[idx, flip.astype(int)].astype(np.float32))
    tokens = np.where(drop[:, None], c.empty_tokens[None], c.tokens[idx])
    assert np.array_equal(batch["tokens"].numpy(), tokens)
    states = np.where(drop[:, None, None], c.empty_states[None], c.states[idx]).astype(np.float32)
    assert np.array_equal(batch["states"].numpy(), states)
    return idx, flip, drop


def test_loader_every_sample_once_per_epoch(cache):
    loader = data.Loader(cache, 4, seed=3, cond_drop=0.3)
    assert loader.batches_per_epoch == 6
    epochs = [[], []]
    for step, batch in enumerate(_take(loader, 12)):
        assert batch["latents"].shape == (4, 3, 8, 8) and batch["tokens"].dtype == torch.long
        epochs[step // 6] += list(_check_batch(cache, loader, step, batch)[0])
    assert sorted(epochs[0]) == list(range(24)) and sorted(epochs[1]) == list(range(24)) and epochs[0] != epochs[1]
    loader.close()


def test_loader_ranks_see_disjoint_halves_of_the_global_batch(cache):
    single = data.Loader(cache, 8, seed=1, cond_drop=0.5)
    ranks = [data.Loader(cache, 4, seed=1, rank=r, world_size=2, cond_drop=0.5) for r in range(2)]
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
    a = data.Loader(cache, 5, seed=2, cond_drop=0.3, prefetch=3)
    _take(a, 7)
    sd = a.state_dict()
    assert sd["step"] == 7  # consumed, not prefetched
    expected = _take(a, 6)  # crosses an epoch boundary (4 batches per epoch)
    b = data.Loader(cache, 5, seed=2, cond_drop=0.3)
    b.load_state_dict(sd)
    for x, y in zip(expected, _take(b, 6)):
        assert all(torch.equal(x[k], y[k]) for k in x)
    sync = data.Loader(cache, 5, seed=2, cond_drop=0.3, prefetch=0)  # no background thread: the same batches
    sync.load_state_dict(sd)
    assert torch.equal(next(sync)["latents"], expected[0]["latents"])


def test_loader_flip_and_drop_do_not_depend_on_batch_size(cache):
    flags = []
    for batch_size, world_size in [(2, 1), (3, 2), (8, 1)]:
        per_sample = {}
        loaders = [data.Loader(cache, batch_size, seed=4, rank=r, world_size=world_size, cond_drop=0.5)
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
    no_flip = data.Loader(cache, 4, seed=4, flip=False)
    assert not no_flip.plan(0)[1].any()
    assert torch.equal(next(no_flip)["latents"], torch.from_numpy(cache.latents[no_flip.plan(0)[0], 0]).float())


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


def test_a_data_folder_with_a_stray_manifest_is_data_not_a_cache(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(src / "a.png")
    (src / "a.txt").write_text("a black square")
    (src / "manifest.json").write_text('{"made by": "another tool"}')
    assert data.source_kind(str(src)) == "captioned_images"


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
        idx, flip, drop = loader.plan(step)
        rows += zip(idx, flip, drop, next(loader)["tokens"])
    loader.close()
    return rows


def test_flipped_samples_get_the_mirrored_caption_tokens(scene_cache):
    te = data.load_text_encoder("tiny")
    m, captions = scene_cache.manifest, scene_cache.captions()
    ids = lambda word: te.token_ids(word)[1:-1]  # one BPE token each: "left</w>", "right</w>"
    assert m["mirror_tokens"] == [ids("left") + ids("right")]
    mirrored = [i for i, t in enumerate(captions) if swap_left_right(t) != t]
    assert m["mirror_captions"] == len(mirrored) > 0
    seen = collections.Counter()
    for i, flip, drop, tokens in _epoch_tokens(data.Loader(scene_cache, 8, seed=1, cond_drop=0.2)):
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
    rows = _epoch_tokens(data.Loader(data.LatentCache(str(old)), 8, seed=1))
    assert any(flip for _, flip, _, _ in rows)
    for i, flip, drop, tokens in rows:
        assert np.array_equal(tokens.numpy(), scene_cache.tokens[i])


def test_text_states_cannot_be_mirrored_a_warning_once(tmp_path):
    c = data.LatentCache(data.build_cache("scenes:32", str(tmp_path / "c"), 32, "none", "tiny", text_states=True))
    assert c.manifest["mirror_captions"] > 0
    with pytest.warns(UserWarning, match="text states cannot be mirrored") as caught:
        loaders = [data.Loader(c, 8, seed=1), data.Loader(c, 8, seed=1)]
    assert len(caught) == 1  # once per cache and process, not per loader
    rows = _epoch_tokens(loaders[0])
    assert all(np.array_equal(tokens.numpy(), c.tokens[i]) for i, _, _, tokens in rows)  # as stored
    loaders[1].close()
