"""encoders.py: the frozen VAE and text towers against diffusers / open_clip, the tiny tower across processes, the
evaluation networks (TF-Inception through torch-fidelity, the CLIP score), and one CLIP load per run (CPU)."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import data
import encoders
import toys
from ckpt_utils import tiny_clip_scorer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG = " ".join(f"word{i}" for i in range(500))

#################################################################################
#                          The VAE and the text towers                          #
#################################################################################

def test_tokenize_is_77_ids_for_empty_short_and_long_captions():
    te = encoders.load_text_encoder("tiny")
    captions = ["", "a red circle on a white background", LONG]
    tokens = te.tokenize(captions)
    assert tokens.shape == (3, 77) and tokens.dtype == torch.long
    # open_clip's own tokenizer is the reference
    assert torch.equal(tokens, open_clip.get_tokenizer("ViT-L-14")(captions))
    assert tokens[0, :2].tolist() == [te.sot, te.eot] and (tokens[0, 2:] == 0).all()
    assert (tokens[2] != 0).all() and tokens[2, -1] == te.eot


def test_public_token_helpers_pack_like_open_clips_tokenizer():
    te = encoders.load_text_encoder("tiny")
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


def chunk_reference(bpe, chunks, sot, eot):
    """The chunked packing written out by hand: `chunks` rows of [SOT, 75 BPE ids, EOT] padded with 0 to 77."""
    rows = []
    for k in range(chunks):
        row = [sot] + bpe[75 * k:75 * (k + 1)] + [eot]
        rows += row + [0] * (77 - len(row))
    return rows


def test_text_chunks_pack_a_long_caption_into_75_token_windows():
    """A 200-token caption with text_chunks 1 / 2 / 3 against the packing written out by hand from open_clip's
    tokenizer; a short caption's unreached chunks are the empty caption's; truncated() says when pack drops ids."""
    tok = open_clip.get_tokenizer("ViT-L-14")
    sot, eot = tok.sot_token_id, tok.eot_token_id
    bpe = tok.encode(LONG)[:200]
    short = tok.encode("a red circle on a white background")
    for chunks in (1, 2, 3):
        te = encoders.load_text_encoder("tiny", chunks=chunks)
        assert (te.chunks, te.context_length) == (chunks, 77 * chunks)
        packed = te.pack([[sot] + bpe + [eot], [sot] + short + [eot], [sot, eot]])
        assert packed.shape == (3, 77 * chunks) and packed.dtype == torch.long
        assert packed[0].tolist() == chunk_reference(bpe, chunks, sot, eot)
        assert packed[1].tolist() == chunk_reference(short, chunks, sot, eot)
        assert packed[2].tolist() == chunk_reference([], chunks, sot, eot)
        assert packed[1, 77:].tolist() == ([sot, eot] + [0] * 75) * (chunks - 1)  # unreached: the empty caption's
        assert packed[0, -77:].tolist().count(eot) == 1 and packed[0, -1] == (eot if chunks < 3 else 0)
        # truncated: more BPE ids than 75 x chunks, i.e. len(token_ids) > 77 for one chunk as before
        assert te.truncated([sot] + bpe + [eot]) == (chunks < 3)
        every = tok.encode(LONG)  # > 225 ids
        fits, over = [sot] + every[:75 * chunks] + [eot], [sot] + every[:75 * chunks + 1] + [eot]
        assert not te.truncated(fits) and te.truncated(over) and torch.equal(te.pack([fits]), te.pack([over]))
        assert not te.truncated([sot, eot])
        assert torch.equal(te.tokenize([LONG]), te.pack([te.token_ids(LONG)]))


def test_one_text_chunk_packs_bitwise_as_before():
    """text_chunks=1 is the 77-token packing of before (first 76 ids, then EOT) and open_clip's own tokenizer, on
    random captions of 0 to ~150 tokens."""
    te = encoders.load_text_encoder("tiny")
    rng = np.random.default_rng(0)
    words = ["red", "circle", "a", "on", "the", "caf\u00e9", "background", "x1y2", "left", "of", "zebra", ","]
    captions = [" ".join(rng.choice(words, int(n))) for n in rng.integers(0, 120, 40)]
    ids = [te.token_ids(c) for c in captions]
    assert min(map(len, ids)) == 2 and max(map(len, ids)) > 100  # empty, short and over-long captions
    before = torch.zeros(len(ids), 77, dtype=torch.long)
    for i, row in enumerate(ids):  # encoders.pack as it was written for 77 tokens
        row = row if len(row) <= 77 else row[:76] + [te.eot]
        before[i, :len(row)] = torch.tensor(row)
    assert torch.equal(te.pack(ids), before) and torch.equal(before, open_clip.get_tokenizer("ViT-L-14")(captions))
    assert [te.truncated(i) for i in ids] == [len(i) > 77 for i in ids]


def tower_states(model, tokens):
    """open_clip's own encode_text on (N, 77) tokens -> (states after ln_final (N, 77, dim), pooled (N, P)): the
    states are caught with a hook on ln_final, so the reference is open_clip's forward, not encoders.py's."""
    caught = []
    hook = model.ln_final.register_forward_hook(lambda m, i, o: caught.append(o))
    with torch.no_grad():
        pooled = model.encode_text(tokens)
    hook.remove()
    return caught[0], pooled


def test_text_chunks_states_are_the_tower_run_on_each_chunk_alone():
    """Each 77-token chunk's states equal open_clip's tower run on that chunk alone (built by hand from its
    tokenizer), the pooled embedding is the first chunk's, and a caption under 76 tokens gives exactly the states
    and pooled embedding of the one-chunk tower (the later chunks are the empty caption's)."""
    tok = open_clip.get_tokenizer("ViT-L-14")
    sot, eot = tok.sot_token_id, tok.eot_token_id
    te1, te3 = encoders.load_text_encoder("tiny"), encoders.load_text_encoder("tiny", chunks=3)
    captions = [LONG, "a red circle on a white background", ""]
    states, pooled = te3(captions)
    assert states.shape == (3, 231, 64) and pooled.shape == (3, 64) and states.dtype == pooled.dtype == torch.float32
    for i, caption in enumerate(captions):
        bpe = tok.encode(caption)
        chunks = torch.tensor(chunk_reference(bpe, 3, sot, eot)).view(3, 77)
        for k in range(3):
            ref_states, ref_pooled = tower_states(te3.model, chunks[k:k + 1])
            torch.testing.assert_close(states[i, 77 * k:77 * (k + 1)], ref_states[0], rtol=1e-5, atol=1e-5)
            if k == 0:
                torch.testing.assert_close(pooled[i], ref_pooled[0], rtol=1e-5, atol=1e-5)
    # under 76 tokens: the one-chunk tower's states and pooled embedding, bit for bit
    short = captions[1:] + ["a blue square on a black background"]
    s1, p1 = te1(short)
    for te in (encoders.load_text_encoder("tiny", chunks=2), te3):
        s, p = te(short)
        assert s.shape == (3, 77 * te.chunks, 64)
        assert torch.equal(s[:, :77], s1) and torch.equal(p, p1)
    # encode takes fewer chunks than the encoder has (k = 1..chunks), and nothing else
    s, p = te3.encode(te1.tokenize(short))
    assert torch.equal(s, s1) and torch.equal(p, p1)
    for width in (76, 100, 77 * 4):
        with pytest.raises(ValueError, match="expected"):
            te3.encode(torch.zeros(1, width, dtype=torch.long))


@pytest.mark.parametrize("chunks", [0, 4, -1, 1.5, True, "2"])
def test_text_chunks_outside_1_to_3_is_a_value_error(chunks):
    with pytest.raises(ValueError, match="text_chunks must be 1..3"):
        encoders.load_text_encoder("tiny", chunks=chunks)
    with pytest.raises(ValueError, match="text_chunks must be 1..3"):
        encoders.TextEncoder("tiny", *encoders.open_clip_model("tiny"), chunks=chunks)


@pytest.mark.slow
def test_tiny_text_tower_distinct_and_identical_across_processes(tmp_path):
    rng_before = torch.get_rng_state()
    te = encoders.load_text_encoder("tiny")
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
    cfg = dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=16, width=32, layers=1, head_width=32),
               text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    torch.manual_seed(3)
    model = open_clip.model.CLIP(**cfg).eval()
    (tmp_path / "clip").mkdir()
    json.dump({"model_cfg": cfg}, open(tmp_path / "clip" / "open_clip_config.json", "w"))
    torch.save(model.state_dict(), tmp_path / "clip" / "open_clip_pytorch_model.bin")
    te = encoders.load_text_encoder(str(tmp_path / "clip"))
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
    vae = encoders.load_vae(str(tmp_path / "vae"))  # same class and code path as stabilityai/sd-vae-ft-mse
    assert (vae.channels, vae.factor, vae.scaling_factor) == (4, 2, 0.5)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = vae.encode(x)
    with torch.no_grad():
        assert z.shape == (2, 4, 8, 8) and torch.allclose(z, ref.encode(x).latent_dist.mean * 0.5, atol=1e-6)
        y = vae.decode(z)
        assert y.shape == x.shape and torch.allclose(y, ref.decode(z / 0.5).sample.clamp(-1, 1), atol=1e-6)
    # through the cache: both flips encoded by the VAE, stored as float16
    c = data.LatentCache(data.build_cache("shapes:3", str(tmp_path / "c"), 16, vae, "tiny"))
    imgs = torch.stack([torch.from_numpy(np.array(toys.shape_sample(i, 0, 16)[1])) for i in range(3)])
    imgs = imgs.permute(0, 3, 1, 2).float() / 127.5 - 1
    assert c.manifest["scaling_factor"] == 0.5 and c.latents.shape == (3, 2, 4, 8, 8)
    assert np.allclose(c.latents[:, 0], vae.encode(imgs).numpy(), atol=2e-3)
    assert np.allclose(c.latents[:, 1], vae.encode(imgs.flip(-1)).numpy(), atol=2e-3)
    none = encoders.load_vae("none")
    assert (none.channels, none.factor, none.scaling_factor) == (3, 1, 1.0)
    assert torch.equal(none.encode(x), x) and torch.equal(none.decode(none.encode(x)), x)


def test_a_network_that_cannot_be_loaded_is_a_load_error_and_exit_2(tmp_path, capsys):
    """LoadError is the one exception for inputs that cannot be had: data.DataError is one, so the callers' single
    `except LoadError` (data.py's CLI here) turns a missing encoder into a one-line error and exit code 2."""
    assert issubclass(data.DataError, encoders.LoadError)
    with pytest.raises(encoders.LoadError, match="cannot load the text encoder 'NoSuchArch/tag'"):
        encoders.load_text_encoder("NoSuchArch/tag")
    with pytest.raises(SystemExit) as e:
        data.main(["--data", "shapes:4", "--out", str(tmp_path / "o"), "--resolution", "8", "--vae", "none",
                   "--text_encoder", "NoSuchArch/tag"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("data.py: error: cannot load the text encoder")

#################################################################################
#                              Evaluation networks                              #
#################################################################################

class PicklePayload:
    """Any class outside torch's weights-only allow-list stands for code a pickle could run."""


@pytest.mark.slow
def test_inception_wrapper_feeds_torch_fidelity(tmp_path, monkeypatch):
    """The real extractor's wiring, offline: randomly initialised TF-Inception weights saved to a local file, loaded
    the way --inception_weights loads them, must give torch-fidelity's own outputs for the same images."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi
    with monkeypatch.context() as m:  # build one network without downloading: skip its weight loading
        m.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, strict=True: None)
        net = tfi.FeatureExtractorInceptionV3("ref", ["2048", "logits_unbiased"])
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    extractor = encoders.InceptionV3(str(tmp_path / "inception.pth"))
    (tmp_path / "inception.pth").unlink()  # 92 MB: pytest keeps the tmp dirs of its last 3 runs
    images = torch.randint(0, 256, (1, 40, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pool, logits = extractor(images)
    ref_pool, ref_logits = net(images.permute(0, 3, 1, 2).contiguous())  # torch-fidelity takes uint8 (B, 3, H, W)
    assert pool.shape == (1, 2048) and logits.shape == (1, 1008)
    torch.testing.assert_close(pool, ref_pool, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, ref_logits.double(), rtol=1e-5, atol=1e-5)
    with pytest.raises(FileNotFoundError):
        encoders.InceptionV3(str(tmp_path / "missing.pth"))
    # a weights file that is more than tensors (a pickle can run code) is refused, not unpickled
    torch.save({"fc.weight": torch.zeros(1), "payload": PicklePayload()}, tmp_path / "pickled.pth")
    with pytest.raises(pickle.UnpicklingError):
        encoders.InceptionV3(str(tmp_path / "pickled.pth"))

#################################################################################
#                                  CLIP score                                   #
#################################################################################

@pytest.fixture(scope="module")
def tiny_clip():
    return tiny_clip_scorer()


def test_clip_score_equals_direct_cosine(tiny_clip):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (8, 24, 40, 3), generator=g, dtype=torch.uint8)
    captions = [f"a {c} {k}" for c, k in zip(["red", "green", "blue", "gray"] * 2, ["fox", "car"] * 4)]
    got = tiny_clip(images, captions)
    model, tok = tiny_clip.model, open_clip.tokenize
    raw = []
    with torch.no_grad():
        for im, cap in zip(images, captions):  # one pair at a time, cosine from unnormalized embeddings
            x = tiny_clip.preprocess(Image.fromarray(im.numpy()))[None]
            raw.append(torch.nn.functional.cosine_similarity(model.encode_image(x), model.encode_text(tok([cap]))))
    raw = torch.cat(raw).double()
    torch.testing.assert_close(got, 100 * raw.clamp(min=0), rtol=1e-5, atol=1e-4)
    assert (raw < 0).any() and (raw > 0).any()  # both sides of the floor are exercised

@pytest.mark.slow
@pytest.mark.parametrize("tag, oracle_arch, other_arch", [("openai", "ViT-B-32-quickgelu", "ViT-B-32"),
                                                          ("laion2b_s34b_b79k", "ViT-B-32", "ViT-B-32-quickgelu")])
def test_clip_load_takes_the_activation_from_the_tag(tmp_path, tag, oracle_arch, other_arch):
    """OpenAI's CLIP weights were trained with QuickGELU, LAION's with GELU. ClipScorer.load('ViT-B-32/TAG') with a
    local weights file must build what open_clip's own config for those weights builds (the oracle), not the
    bare ARCH's activation (open_clip's default, which only warns)."""
    torch.manual_seed(0)
    oracle = open_clip.create_model(oracle_arch).eval()
    path = tmp_path / "weights.pt"
    torch.save(oracle.state_dict(), path)
    got = encoders.ClipScorer.load(f"ViT-B-32/{tag}", weights=str(path))
    other = open_clip.create_model(other_arch, pretrained=str(path)).eval()  # same weights, the wrong activation
    path.unlink()  # 600 MB: pytest keeps the tmp dirs of its last 3 runs
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = oracle.encode_image(x)
        torch.testing.assert_close(got.model.encode_image(x), want)
        assert (other.encode_image(x) - want).abs().max() > 1e-3  # the activation is visible in the output


def test_clip_scorer_reuses_the_text_encoders_model():
    """One CLIP load per run: a ClipScorer made from a loaded TextEncoder that kept its image tower (the tiny one
    has a 32-px ViT) shares its model, and scores exactly as the scorer loaded on its own; without the image tower
    (load_text_encoder's default), or under another name, the scorer loads its own model."""
    te = encoders.load_text_encoder("tiny", image_tower=True)
    shared, alone = encoders.ClipScorer.load("tiny", text_encoder=te), encoders.ClipScorer.load("tiny")
    assert shared.model is te.model and alone.model is not te.model and shared.tokenizer is te.tokenizer
    images = torch.randint(0, 256, (6, 40, 24, 3), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    captions = [toys.shapes_caption(c, k, "white") for c, k in zip(toys.SHAPE_COLORS, toys.SHAPE_KINDS * 2)]
    got, want = shared(images, captions), alone(images, captions)
    assert torch.equal(got, want) and (want > 0).any()
    pooled = te(captions)[1]  # and the text encoder still encodes as before
    assert torch.equal(pooled, encoders.load_text_encoder("tiny")(captions)[1])
    assert encoders.load_text_encoder("tiny").model.visual is None  # the default drops it
    assert encoders.ClipScorer.load("tiny", text_encoder=encoders.load_text_encoder("tiny")).model.visual is not None
    other = encoders.TextEncoder("another-clip", te.model, te.tokenizer)
    assert encoders.ClipScorer.load("tiny", text_encoder=other).model is not te.model
