"""sources.py: every source form reads the same images and captions (as the cache they build shows), several
captions per image, the built-in sets' names, bad metadata and shards, sources that are not there."""
import io, json, os

import numpy as np
import pytest
from PIL import Image

import data
import sources
import toys
from test_data import LONG, _file_bytes, _keys, _png, _tar, _write  # noqa: F401 (the cache tests' helpers)


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


def test_scenes_source_builds_the_scene_samples(tmp_path):
    """"scenes:N[:SEED]" is a built-in source beside shapes: its cache holds toys.scene_sample(i, SEED, R) as they
    are (vae none: the exact pixels), keyed scene<i>, and its fingerprint names the renderer's version."""
    c = data.LatentCache(data.ensure_cache("scenes:6:3", 32, "none", "tiny", cache_dir=str(tmp_path / "c")))
    want = [toys.scene_sample(i, 3, 32) for i in range(6)]
    assert _keys(c.path) == [f"scene{i}" for i in range(6)] and c.captions() == [t for t, _ in want]
    pixels = np.stack([np.asarray(im) for _, im in want]).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
    assert np.array_equal(c.latents[:, 0], pixels.astype(np.float16))
    assert sources.builtin_set("scenes") == ("scenes", toys.SCENES_DEFAULT_COUNT, 0)
    assert data.source_kind("scenes:5") == "scenes"
    assert data.source_fingerprint("scenes:6:3") != data.source_fingerprint("scenes:6:4")
    before = data.source_fingerprint("scenes:6:3")
    toys.VERSIONS["scenes"], old = "scenes-v2", toys.VERSIONS["scenes"]
    try:
        assert data.source_fingerprint("scenes:6:3") != before  # a new renderer never reuses an old cache
    finally:
        toys.VERSIONS["scenes"] = old


@pytest.mark.parametrize("source, want", [("scenes:0", "count must be >= 1, got 0"),
                                          ("scenes:-3", "count must be >= 1, got -3")])
def test_scenes_count_below_one_is_a_one_line_error(tmp_path, capsys, source, want):
    with pytest.raises(data.DataError, match=want):
        data.ensure_cache(source, 32, "none", "tiny", cache_dir=str(tmp_path / "c"))
    with pytest.raises(SystemExit) as e:
        data.main(["--data", source, "--out", str(tmp_path / "o"), "--resolution", "32", "--vae", "none",
                   "--text_encoder", "tiny"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and want in err[0] and not (tmp_path / "o").exists()
    # and a resolution the scenes reader cannot read is refused before anything is rendered
    with pytest.raises(data.DataError, match=">= 32 px"):
        data.ensure_cache("scenes:4", 16, "none", "tiny", cache_dir=str(tmp_path / "small"))


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
    with pytest.raises(SystemExit) as e:
        data.main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--vae", "none",
                   "--text_encoder", "tiny"])
    assert e.value.code == 2 and "data.py: error:" in capsys.readouterr().err


def test_a_data_folder_with_a_stray_manifest_is_data_not_a_cache(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(src / "a.png")
    (src / "a.txt").write_text("a black square")
    (src / "manifest.json").write_text('{"made by": "another tool"}')
    assert data.source_kind(str(src)) == "captioned_images"


def test_several_captions_from_every_source_form(tmp_path):
    from encoders import load_text_encoder
    te = load_text_encoder("tiny")
    img = _png(np.full((16, 16, 3), 90, np.uint8))
    want = [["one caption"], ["first of two", "second of two"], ["a", "b", "c"]]
    meta, txt, tars = tmp_path / "meta", tmp_path / "txt", tmp_path / "tars"
    for d in (meta, txt, tars):
        d.mkdir()
    with open(meta / "metadata.jsonl", "w") as f:
        for i, caps in enumerate(want):
            _write(meta / f"{i}.png", img), _write(txt / f"{i}.png", img)
            f.write(json.dumps({"file_name": f"{i}.png", "text": caps if len(caps) > 1 else caps[0]}) + "\n")
            _write(txt / f"{i}.txt", ("\n\n".join(caps) + "\n").encode())  # blank lines are not captions
    _tar(tars / "0.tar", [(f"{i:03d}", {"png": img, "txt": "\n".join(caps).encode()})
                          for i, caps in enumerate(want[:2])]
         + [("002", {"png": img, "json": json.dumps({"text": want[2]}).encode()})])
    for src in (meta, txt, tars):
        c = data.LatentCache(data.build_cache(str(src), str(tmp_path / f"c_{src.name}"), 16, "none", te))
        assert c.manifest["count"] == 3 and c.manifest["captions"] == 6 and list(c.ncaptions) == [1, 2, 3]
        assert c.captions() == ["one caption", ["first of two", "second of two"], ["a", "b", "c"]]
        assert np.array_equal(c.tokens, te.tokenize([t for caps in want for t in caps]).numpy())
        assert list(c.caption_start) == [0, 1, 3]
