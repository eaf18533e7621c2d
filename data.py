"""
data.py: the user's images and captions in, a latent cache out, through the frozen VAE and text tower of
encoders.py.

  sources     sources.py's readers: metadata.jsonl imagefolder | images + .txt | webdataset shards | built-in sets
  preprocess  any PIL mode -> RGB (alpha over white, 16-bit rescaled, CMYK converted, EXIF rotation), resized to
              cover its bucket (antialiased LANCZOS), centre crop, [-1, 1]; no buckets: a `resolution` square
  cache       .npy files, opened as memmaps: latents (N, 2, C, h, w) float16, one file per bucket | bucket (N,) |
              ncaptions (N,) | tokens (M, 77 x text_chunks) int32, M captions | [states, pooled per caption] |
              captions.jsonl | manifest.json (last)
  (loader.py turns a cache into training batches)

Choices:
- Aspect-ratio buckets (aspect_buckets N > 0): N sizes of about resolution^2 pixels, aspect ratios evenly in log
  from 1:max_aspect to max_aspect:1, sides multiples of `multiple` (the VAE factor x the DiT patch), as SD XL and
  PixArt train. An image goes to the bucket nearest its aspect ratio; a first pass over the image headers counts
  them, and a bucket with fewer than `min_bucket` images (the global micro-batch) joins its nearest neighbour,
  so no image is silently unused (OneTrainer #816).
- Flips: both horizontal flips are encoded and cached (latents[:, 1] = the mirrored image's latent).
  The VAE is not flip-equivariant, so mirroring a cached latent would give latents the decoder never
  saw. Cost: 2x encode time and 2x latent disk (16 KB/image at 256 px with sd-vae). A mirrored image's
  caption says "right" where the image's said "left": the manifest keeps the token ids of MIRROR_WORDS and
  the loader swaps them in flipped samples' tokens (cached text states cannot be swapped: a warning).
- Small images: an image that would be upscaled more than 2x to cover its bucket is skipped ("too_small":
  upscaling teaches the model blur); one between 1x and 2x is upscaled.
- Captions: a missing or empty caption skips the item (caption dropout provides the unconditional samples);
  several captions of an image are all cached, the loader draws one per epoch. Non-UTF-8 bytes are decoded with
  errors="replace" and kept; captions over the text tower's 75 x text_chunks tokens are truncated (the last chunk
  keeps its end-of-text token) and kept; both are counted in manifest["fixed"].
- Bad input never stops a build: it is skipped and counted by reason in manifest["skipped"]
  (empty_file, not_an_image, decode_error, too_small, missing_caption, empty_caption, missing_file,
  missing_image, read_error, bad_metadata, unreadable_shard, truncated_shard). An empty, missing or
  unreadable source raises DataError, an encoder that cannot be loaded encoders.LoadError (DataError's base; the
  CLI exits with code 2 for either).
- ensure_cache() puts a cache in cache/<source>-<res>px-<vae>-<text encoder>[-states]-<hash of all
  settings> unless told where, reuses it while the manifest matches (settings + source fingerprint).
"""
import argparse, collections, contextlib, functools, hashlib, io, json, math, os, re, struct, sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

try:
    import fcntl  # POSIX: the cache build lock (elsewhere builds are not guarded against each other)
except ImportError:
    fcntl = None

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from checkpoint import write_json
from config import ConfigError, check_layout, fail, resolve_device
from encoders import LoadError, load_text_encoder, load_vae
from sources import DataError, builtin_set, source_fingerprint, source_items, source_kind

CACHE_FORMAT = 1     # bump when the cache layout changes: an old cache is then refused (with a message), not misread


#################################################################################
#                                  Preprocessing                                #
#################################################################################

def to_rgb(img):
    """Any PIL mode -> RGB; transparency is composited over white, 16/32-bit grey rescaled to 8 bits."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16-bit PNG/TIFF grey: 0..65535 -> 0..255
        a = np.asarray(img, dtype=np.float32)
        if img.mode == "F":
            a = a * 255.0 if a.max() <= 1.0 else a  # float images: [0, 1] or already 0..255
        elif img.mode != "I" or a.max() > 255:
            a = a / 257.0  # 65535 -> 255
        img = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")  # also CMYK, P, L, 1, YCbCr

def preprocess(img, size):
    """PIL image -> (H, W, 3) uint8 for a bucket size (W, H) (an int R: R x R): resized to cover it, the rest
    centre-cropped. None when covering it would upscale more than 2x."""
    W, H = (size, size) if isinstance(size, int) else size
    if img.format == "JPEG" and min(img.size) >= 2 * max(W, H):
        # JPEG DCT scaling: decode at 1/2..1/8 size, both sides stay >= max(W, H) (so in either orientation)
        img.draft(None, (max(W, H), max(W, H)))
    img.load()
    if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation: phones store portraits rotated
        img = ImageOps.exif_transpose(img)
    img = to_rgb(img)
    w, h = img.size
    scale = max(W / w, H / h)
    if scale > 2:
        return None
    size = (max(W, round(w * scale)), max(H, round(h * scale)))
    if size != img.size:  # LANCZOS is antialiased when reducing; reducing_gap box-reduces huge images first (speed)
        img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    left, top = (size[0] - W) // 2, (size[1] - H) // 2
    return np.asarray(img.crop((left, top, left + W, top + H)))

def oriented_size(img):
    """(width, height) as the image is shown: EXIF orientations 5-8 store it rotated by 90 degrees. From the header
    alone: PIL's getexif() decodes a whole PNG or WebP, whose EXIF (when it precedes the pixels) is in info."""
    if img.format in ("PNG", "WEBP"):
        exif = Image.Exif()
        if img.info.get("exif"):
            exif.load(img.info["exif"])
    else:
        exif = img.getexif()
    return img.size[::-1] if exif.get(0x0112, 1) in (5, 6, 7, 8) else img.size

def to_pixels(arrays):
    """uint8 (N, H, W, 3) images -> float (N, 3, H, W) in [-1, 1], what VAE.encode takes."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1

def _open(raw):
    return raw if isinstance(raw, Image.Image) else Image.open(io.BytesIO(raw))

def _decode(raw, buckets):
    """Image bytes or PIL image -> (bucket index, uint8 array), or the reason it is skipped (runs in worker
    threads). buckets: a Buckets."""
    if not isinstance(raw, Image.Image) and len(raw) == 0:
        return "empty_file"
    try:
        img = _open(raw)
        b = buckets.index(*oriented_size(img))
        arr = preprocess(img, buckets.sizes[b])
    except Image.UnidentifiedImageError:
        return "not_an_image"
    except Exception:  # truncated data, bad headers, decompression bombs, ...
        return "decode_error"
    return "too_small" if arr is None else (b, arr)

def _caption_texts(caption, fixed):
    """A reader's caption (see Item) -> (list of captions, None) or (None, skip reason)."""
    if caption is None:
        return None, "missing_caption"
    if isinstance(caption, bytes):  # a .txt file: one caption a non-empty line
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError:
            caption = caption.decode("utf-8", errors="replace")
            fixed["non_utf8_caption"] += 1
        caption = caption.lstrip("\ufeff").splitlines()
    texts = [t.strip().lstrip("\ufeff").strip() for t in ([caption] if isinstance(caption, str) else caption)]
    texts = [t for t in texts if t]
    return (texts, None) if texts else (None, "empty_caption")

#################################################################################
#                                  The cache                                    #
#################################################################################

def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def _append(f, data):
    f.write(data)

def _npy_header(dtype, shape):
    """A .npy v1.0 header padded to a fixed 128 bytes, so it can be rewritten in place once N is known."""
    d = "{'descr': '%s', 'fortran_order': False, 'shape': %r, }" % (np.dtype(dtype).str, tuple(shape))
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", 118) + d.ljust(117).encode("latin1") + b"\n"  # numpy.lib.format

def _name(x):
    return x if isinstance(x, str) else x.name

def _load_item(item):
    """Read one item's bytes in the main thread (tar members must be read while their shard is open)."""
    if item.error:
        return item.error
    try:
        return item.read()
    except FileNotFoundError:
        return "missing_file"
    except Exception:
        return "read_error"

def _encode_group(group, buckets, files, vae, te, text_states, pool, skipped, fixed):
    """A list of (key, loaded item) -> dict of arrays to append (or None), counting what is skipped/fixed.
    files: the latent file of each bucket."""
    good = []
    for key, loaded in group:
        if isinstance(loaded, str):
            skipped[loaded] += 1
            continue
        texts, reason = _caption_texts(loaded[1], fixed)
        if reason:
            skipped[reason] += 1
        else:
            good.append((key, texts, loaded[0]))
    keep = []
    decoded = pool.map(functools.partial(_decode, buckets=buckets), [g[2] for g in good])
    for (key, texts, _), d in zip(good, decoded):
        if isinstance(d, str):
            skipped[d] += 1
        else:
            keep.append((key, texts, *d))
    if not keep:
        return None
    bucket = np.array([b for _, _, b, _ in keep], np.int16)  # (n,)
    out = {}
    for b in np.unique(bucket):  # one VAE batch per bucket shape, rows in the group's order
        x = to_pixels([a for _, _, bb, a in keep if bb == b])  # (n_b, 3, H, W) in [-1, 1]
        lat = vae.encode(torch.cat([x, x.flip(-1)])).float().cpu()  # (2n_b, C, h, w): images, then their mirrors
        out[files[b]] = torch.stack(lat.chunk(2), 1).half().numpy()  # (n_b, 2, C, h, w)
    ids = [te.token_ids(t) for _, texts, _, _ in keep for t in texts]  # every caption of every image, in order
    fixed["caption_truncated"] += sum(map(te.truncated, ids))
    tokens = te.pack(ids)  # (M, 77 x chunks)
    out.update({"bucket.npy": bucket, "ncaptions.npy": np.array([len(k[1]) for k in keep], np.int16),
                "tokens.npy": tokens.int().numpy(),
                "captions.jsonl": "".join(json.dumps({"key": k, "text": t if len(t) > 1 else t[0]}) + "\n"
                                          for k, t, _, _ in keep).encode()})
    if text_states:
        states, pooled = te.encode(tokens)
        out["states.npy"], out["pooled.npy"] = states.half().cpu().numpy(), pooled.half().cpu().numpy()
    return out

#################################################################################
#                                  Buckets                                      #
#################################################################################

class Buckets:
    """Bucket sizes (W, H) and the rule that puts an image in one: the size nearest its aspect ratio (in log),
    then `into` (bucket -> the bucket its images join: the small ones merged). sizes: the kept ones, in order."""
    def __init__(self, all_sizes, into=None, square=False):
        self.all, self.square = [tuple(s) for s in all_sizes], square
        self.into = list(into or range(len(self.all)))
        kept = sorted(set(self.into))
        self.sizes, self._kept = [self.all[k] for k in kept], {k: i for i, k in enumerate(kept)}
        self.files = ["latents.npy"] if square else [f"latents_{W}x{H}.npy" for W, H in self.sizes]

    def nearest(self, w, h):
        """The bucket (of all) nearest the aspect ratio w / h in log; ties go to the lower index."""
        return min(range(len(self.all)), key=lambda b: (abs(math.log(w / h * self.all[b][1] / self.all[b][0])), b))

    def index(self, w, h):
        return self._kept[self.into[self.nearest(w, h)]]

def bucket_size(resolution, aspect, multiple):
    """(W, H) of the bucket of aspect W / H with about resolution^2 px, each side rounded to the nearest multiple
    (halves up, at least one multiple): 46 x 22 at 32 px, aspect 2, multiple 2; 368 x 176 at 256 px, multiple 16."""
    side = lambda x: multiple * max(1, math.floor(x / multiple + 0.5))
    return side(resolution * math.sqrt(aspect)), side(resolution / math.sqrt(aspect))

def bucket_sizes(resolution, n, max_aspect, multiple):
    """n sizes (W, H) of about resolution^2 pixels, aspect ratios W / H evenly spaced in log from 1 / max_aspect to
    max_aspect, sides multiples of `multiple` (bucket_size); a size two ratios round to is kept once."""
    sizes = []
    for k in range(n):
        size = bucket_size(resolution, max_aspect ** (2 * k / (n - 1) - 1), multiple)
        sizes += [size] if size not in sizes else []
    return sizes

def merge_small(sizes, counts, min_bucket):
    """bucket -> the bucket its images go to: while the smallest non-empty bucket holds fewer than min_bucket
    images it joins its nearest neighbour in log aspect (a bucket smaller than a batch would never make one);
    a bucket no image chose points at the nearest kept one."""
    logs, counts, into = [math.log(W / H) for W, H in sizes], list(counts), list(range(len(sizes)))
    alive = [b for b, c in enumerate(counts) if c > 0]
    nearest = lambda b: min((a for a in alive if a != b), key=lambda a: (abs(logs[a] - logs[b]), a))
    while len(alive) > 1 and min(counts[b] for b in alive) < min_bucket:
        small = min(alive, key=lambda b: (counts[b], b))
        to = nearest(small)
        alive.remove(small)
        counts[to] += counts[small]
        into = [to if t == small else t for t in into]
    return [t if t in alive or not alive else nearest(t) for t in into]

def plan_buckets(items, total, sizes, min_bucket):
    """The first pass of a bucketed build: each image's header (size and EXIF orientation; the bytes are read,
    nothing is decoded) -> its nearest bucket, counted when covering it upscales at most 2x -> Buckets with the
    small ones merged, and the counts."""
    rule, counts = Buckets(sizes), [0] * len(sizes)
    for item in tqdm(items, total=total, unit="img", desc="sizing", smoothing=0.1):
        loaded = _load_item(item)
        try:
            w, h = oriented_size(_open(loaded[0]))
        except Exception:  # unreadable: the encoding pass counts why
            continue
        b = rule.nearest(w, h)
        counts[b] += max(sizes[b][0] / w, sizes[b][1] / h) <= 2
    return Buckets(sizes, merge_small(sizes, counts, min_bucket)), counts

# build_cache's steps, in the order it runs them

def _cache_settings(data, resolution, vae, text_encoder, text_states, layout):
    """What a cache is a function of: a finished cache is reused only while its manifest holds these values. The
    layout's keys are there when they differ from OPTIONAL (so caches built before them keep matching)."""
    settings = dict(format=CACHE_FORMAT, fingerprint=source_fingerprint(data), resolution=resolution, vae=_name(vae),
                    text_encoder=_name(text_encoder), text_states=bool(text_states), min_side=resolution / 2)
    if layout["aspect_buckets"]:
        settings.update({k: layout[k] for k in ("aspect_buckets", "max_aspect", "patch")})
    if layout["text_chunks"] > 1:
        settings["text_chunks"] = layout["text_chunks"]
    return settings

# the layout's keys and their values in a manifest that does not name them
OPTIONAL = dict(aspect_buckets=0, max_aspect=None, patch=None, text_chunks=1)
# build defaults; bucket sides are multiples of the VAE's factor x the DiT's patch, so that every bucket patchifies
LAYOUT = dict(aspect_buckets=0, max_aspect=2.0, patch=2, min_bucket=1, text_chunks=1)

def _same(built, settings):
    return all(built.get(k, OPTIONAL.get(k)) == settings.get(k, OPTIONAL.get(k)) for k in {*settings, *OPTIONAL})

def _check_out_folder(out, settings):
    """(done, progress): done when `out` holds a finished cache of these settings; else the progress.json of a
    partial build of them, or None. A finished or partial cache of other settings there raises DataError."""
    manifest_path = os.path.join(out, "manifest.json")
    manifest, prog = _read_json(manifest_path), _read_json(os.path.join(out, "progress.json"))
    if manifest and _same(manifest, settings):
        return True, prog
    built = manifest or (prog or {}).get("settings")
    if os.path.exists(manifest_path) or (built and not _same(built, settings)):  # hours of encoding: never lost here
        differ = [k for k in {*settings, *OPTIONAL} if not _same({k: (built or {}).get(k, OPTIONAL.get(k))},
                                                                  {k: settings.get(k, OPTIONAL.get(k))})]
        raise DataError(f"{out} holds a {'finished' if manifest else 'partly built'} cache with other settings "
                        f"({', '.join(differ) or 'unreadable manifest'}; 'fingerprint' = the source's files changed); "
                        "it is left as it is: give another cache_dir, or delete that folder to rebuild")
    return False, prog

def _open_encoders(vae, text_encoder, device, text_chunks):
    """Names are loaded; loaded encoders are used as they are (a text encoder with other chunks is refused)."""
    vae = load_vae(vae, device) if isinstance(vae, str) else vae
    te = (load_text_encoder(text_encoder, device, chunks=text_chunks) if isinstance(text_encoder, str)
          else text_encoder)
    if te.chunks != text_chunks:
        raise DataError(f"the text encoder encodes {te.chunks} chunks, the cache asks for text_chunks {text_chunks}")
    return vae, te

def _cache_files(buckets, vae, te, text_states):
    """The cache's files in write order: .npy name -> (dtype, shape of one row); captions.jsonl -> None. Images
    have a latent row in their bucket's file, a bucket index and a caption count; captions a token row (and states)."""
    f, L = vae.factor, te.context_length
    rows = {name: (np.float16, (2, vae.channels, H // f, W // f)) for name, (W, H) in zip(buckets.files, buckets.sizes)}
    rows.update({"bucket.npy": (np.int16, ()), "ncaptions.npy": (np.int16, ()), "tokens.npy": (np.int32, (L,)),
                 "captions.jsonl": None})
    if text_states:
        rows["states.npy"], rows["pooled.npy"] = (np.float16, (L, te.dim)), (np.float16, (te.pooled_dim,))
    return rows

def _open_progress(out, rows, settings, prog):
    """The build's progress (a new one when prog is None), its files cut back to it: each file is truncated to its
    committed size, dropping what a killed run appended after its last commit; an empty .npy gets its header."""
    os.makedirs(out, exist_ok=True)
    if not prog:
        prog = dict(settings=settings, items=0, count=0, skipped={}, fixed={}, sizes={n: 0 for n in rows})
    for n, fill in (("bucket.npy", 0), ("ncaptions.npy", 1)):  # a build started before these files: its rows
        if n not in prog["sizes"]:  # (one square bucket, one caption an image) written out, then it continues
            _write_rows(os.path.join(out, n), np.full(prog["count"], fill, np.int16))
            prog["sizes"][n] = os.path.getsize(os.path.join(out, n))
    for n, row in rows.items():
        with open(os.path.join(out, n), "ab") as f:
            f.truncate(prog["sizes"][n])
            if row and prog["sizes"][n] == 0:
                f.write(_npy_header(row[0], (0, *row[1])))  # placeholder row count
    return prog

def _write_rows(path, a):
    with open(path, "wb") as f:
        f.write(_npy_header(a.dtype, (0, *a.shape[1:])) + a.tobytes())

def _next_chunk(loaded, encode, pbar, batch_size, chunk_size):
    """The next chunk: (items read, non-empty _encode_group outputs, skip counts, fix counts); 0 items at the end."""
    n_items, parts, skipped, fixed = 0, [], collections.Counter(), collections.Counter()
    for _ in range(max(1, chunk_size // batch_size)):
        group = list(islice(loaded, batch_size))
        if not group:
            break
        n_items += len(group)
        parts.append(encode(group, skipped=skipped, fixed=fixed))
        pbar.update(len(group))
    return n_items, [p for p in parts if p], skipped, fixed

def _commit_chunk(out, files, prog, n_items, parts, skipped, fixed):
    """Append a chunk's rows to every file and fsync them, then rewrite progress.json: the commit point."""
    for n, f in files.items():
        for p in (p[n] for p in parts if n in p):  # a group without images of a bucket has no rows for its file
            _append(f, p if isinstance(p, bytes) else p.tobytes())
        f.flush(), os.fsync(f.fileno())
    prog["items"] += n_items
    prog["count"] += sum(len(p["bucket.npy"]) for p in parts)
    prog["skipped"] = dict(collections.Counter(prog["skipped"]) + skipped)
    prog["fixed"] = dict(collections.Counter(prog["fixed"]) + fixed)
    prog["sizes"] = {n: f.tell() for n, f in files.items()}
    write_json(os.path.join(out, "progress.json"), prog)

def _encode_chunks(data, out, items, total, rows, prog, encode, batch_size, chunk_size, workers):
    """Encode the items after the committed ones, chunk by chunk; prog is updated at each commit."""
    it = iter(items)
    collections.deque(islice(it, prog["items"]), maxlen=0)  # items already committed: skipped without reading
    loaded = ((item.key, _load_item(item)) for item in it)
    files = {n: open(os.path.join(out, n), "ab") for n in rows}
    pbar = tqdm(total=total, initial=prog["items"], unit="img", desc=f"caching {data}", smoothing=0.1)
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        encode = functools.partial(encode, pool=pool)
        while True:
            n_items, parts, skipped, fixed = _next_chunk(loaded, encode, pbar, batch_size, chunk_size)
            if n_items == 0:
                break
            _commit_chunk(out, files, prog, n_items, parts, skipped, fixed)
    pbar.close()
    for f in files.values():
        f.close()

def _write_headers(out, rows, sizes):
    """Each .npy header gets its final row count (from its committed byte size), in place -> {name: rows}."""
    counts = {}
    for n, row in rows.items():
        if row:
            counts[n] = (sizes[n] - 128) // (np.dtype(row[0]).itemsize * math.prod(row[1]))  # 128: the header
            with open(os.path.join(out, n), "r+b") as f:
                f.write(_npy_header(row[0], (counts[n], *row[1])))
                f.flush(), os.fsync(f.fileno())
    return counts

# Words a horizontal flip swaps in a caption, wherever they stand as a whole BPE token (CLIP's "left</w>"): in
# "left-hand" too, and in non-spatial uses ("all right"), which a mirror makes no falser; "leftmost" is another
# token and stays. Caches built before this key exist (no `mirror_tokens` in the manifest) are read unswapped.
MIRROR_WORDS = (("left", "right"),)

def mirror_token_pairs(te):
    """[[id, id], ...]: the token ids of MIRROR_WORDS, from the text encoder's own tokenizer (a pair that it
    splits into several tokens is left out)."""
    ids = [(te.token_ids(a)[1:-1], te.token_ids(b)[1:-1]) for a, b in MIRROR_WORDS]  # without start / end of text
    return [[a[0], b[0]] for a, b in ids if len(a) == len(b) == 1]

def _count_mirrored(path, pairs, chunk=1 << 16):
    """How many token rows of tokens.npy hold a mirrored word (those a flip changes), read chunk by chunk."""
    tokens, ids = np.load(path, mmap_mode="r"), np.array(pairs, np.int64).ravel()
    return int(sum(np.isin(tokens[i:i + chunk], ids).any(1).sum() for i in range(0, len(tokens), chunk)))

def _write_manifest(data, kind, out, settings, prog, rows, counts, buckets, vae, te):
    """The empty caption's tokens (and states), then manifest.json, the file that marks the cache finished."""
    empty = te.tokenize([""])
    if settings["text_states"]:
        states, pooled = te.encode(empty)
        np.save(os.path.join(out, "empty_states.npy"), states[0].half().cpu().numpy())
        np.save(os.path.join(out, "empty_pooled.npy"), pooled[0].half().cpu().numpy())
    manifest = dict(settings, source=data, source_kind=kind, count=prog["count"], items=prog["items"],
                    skipped=dict(sorted(prog["skipped"].items())), fixed=dict(sorted(prog["fixed"].items())),
                    scaling_factor=vae.scaling_factor, shift_factor=vae.shift_factor, vae_factor=vae.factor,
                    latent_shape=[vae.channels] + [settings["resolution"] // vae.factor] * 2, flips=2,
                    text_dim=te.dim, pooled_dim=te.pooled_dim, context_length=te.context_length,
                    captions=counts["tokens.npy"], empty_tokens=empty[0].tolist(), files=list(rows),
                    mirror_tokens=mirror_token_pairs(te), min_bucket=prog.get("min_bucket", 1),
                    buckets=[dict(size=list(size), file=name, count=counts[name], latent_shape=list(rows[name][1][1:]))
                             for size, name in zip(buckets.sizes, buckets.files)],
                    merged={"%dx%d" % buckets.all[b]: "%dx%d" % buckets.all[t] for b, t in enumerate(buckets.into)
                            if t != b and prog.get("sized", [1] * len(buckets.all))[b]})
    manifest["mirror_captions"] = _count_mirrored(os.path.join(out, "tokens.npy"), manifest["mirror_tokens"])
    write_json(os.path.join(out, "manifest.json"), manifest)
    os.remove(os.path.join(out, "progress.json"))
    print(f"cache {out}: {manifest['count']} images from {manifest['items']} items, {manifest['captions']} captions; "
          f"skipped {manifest['skipped'] or 'none'}; fixed {manifest['fixed'] or 'none'}")
    if not buckets.square:
        print("buckets: " + ", ".join(f"{W}x{H} {b['count']}" for (W, H), b in zip(buckets.sizes, manifest["buckets"]))
              + "".join(f"; {a} merged into {b} (fewer than {manifest['min_bucket']} images)"
                        for a, b in manifest["merged"].items()))

def build_cache(data, out, resolution, vae, text_encoder, device="cpu", text_states=False, batch_size=32,
                chunk_size=512, workers=0, **layout):
    """Encode `data` into the folder `out`; returns `out`. vae / text_encoder: names or loaded objects. layout: any
    of LAYOUT's keys (aspect_buckets, max_aspect, patch, min_bucket, text_chunks).
    Resumable: rows are appended chunk by chunk and progress.json (items, rows, byte sizes, the buckets) is committed
    after each chunk's data is fsynced; a rerun truncates the files to the last commit and continues.
    The .npy headers get the final row count at the end, then manifest.json is written, last."""
    kind = source_kind(data)
    if kind == "cache":
        raise DataError(f"{data} is already a cache: pass it to LatentCache / Loader directly")
    layout = {**LAYOUT, **layout}
    settings = _cache_settings(data, resolution, vae, text_encoder, text_states, layout)
    done, _ = _check_out_folder(out, settings)
    if done:
        return out
    with _build_lock(out):  # two runs asking for one cache at once: the second waits, then finds it finished
        done, prog = _check_out_folder(out, settings)
        if not done:
            _build_locked(data, out, resolution, vae, text_encoder, device, text_states, batch_size, chunk_size,
                          workers, settings, prog, layout)
    return out

@contextlib.contextmanager
def _build_lock(out):
    """An exclusive lock on out/.lock for one build: processes that write the same files at once interleave their
    chunks and truncations into a cache that is wrong without an error (seen with two ablation runs started
    together). flock is released by the OS when its holder dies, so a killed build never leaves a stale lock."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, ".lock"), "a") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                print(f"{out}: another process is building this cache; waiting for it", flush=True)
                fcntl.flock(f, fcntl.LOCK_EX)
                locked = True
            except OSError as e:  # a filesystem without flock (some NFS / FUSE mounts): build as before, unguarded
                warnings.warn(f"{out}: no file lock here ({e}); do not build this cache from two processes at once")
                locked = False
        try:
            yield
        finally:
            if fcntl is not None and locked:
                fcntl.flock(f, fcntl.LOCK_UN)

def _build_locked(data, out, resolution, vae, text_encoder, device, text_states, batch_size, chunk_size, workers,
                  settings, prog, layout):
    kind = source_kind(data)
    items, total = source_items(data, resolution)
    vae, te = _open_encoders(vae, text_encoder, device, layout["text_chunks"])
    buckets, sized = Buckets([(resolution, resolution)], square=True), None
    if layout["aspect_buckets"]:  # the first pass (sizes only), unless a partial build already made it
        sizes = bucket_sizes(resolution, layout["aspect_buckets"], layout["max_aspect"], vae.factor * layout["patch"])
        if prog and "into" in prog:
            buckets = Buckets(sizes, prog["into"])
        else:
            buckets, sized = plan_buckets(*source_items(data, resolution), sizes, layout["min_bucket"])
    rows = _cache_files(buckets, vae, te, text_states)
    prog = _open_progress(out, rows, settings, prog)
    if sized is not None:
        prog.update(into=buckets.into, sized=sized, min_bucket=layout["min_bucket"])
    if text_states:
        row = te.context_length * te.dim * 2  # bytes of one caption's float16 states
        print(f"text states: {te.context_length} x {te.dim} x 2 bytes = {row / 1e3:.0f} KB per caption on disk"
              + (f", {row * total / 1e9:.1f} GB for {total} items" if total else ""))
    encode = functools.partial(_encode_group, buckets=buckets, files=buckets.files, vae=vae, te=te,
                               text_states=text_states)
    _encode_chunks(data, out, items, total, rows, prog, encode, batch_size, chunk_size, workers)
    if prog["count"] == 0:
        raise DataError(f"no usable images in {data!r} ({prog['items']} items; skipped: {prog['skipped'] or 'none'})")
    counts = _write_headers(out, rows, prog["sizes"])
    _write_manifest(data, kind, out, settings, prog, rows, counts, buckets, vae, te)

def cache_slug(data, resolution, vae, text_encoder, text_states=False, **layout):
    """A readable folder name for a source + settings, with a hash of the full settings (the layout's keys where
    they differ from OPTIONAL, so older caches keep their names)."""
    clean = lambda s: re.sub(r"[^A-Za-z0-9._]+", "-", s).strip("-.")
    src = data if builtin_set(data) else os.path.basename(os.path.normpath(data.split("*")[0] or ".")) or "data"
    extra = {k: v for k, v in layout.items() if k in OPTIONAL and v != OPTIONAL[k]}
    if not layout.get("aspect_buckets"):
        extra = {k: v for k, v in extra.items() if k == "text_chunks"}
    key = json.dumps([data if builtin_set(data) else os.path.abspath(data), resolution, vae, text_encoder,
                      bool(text_states)] + ([extra] if extra else []), sort_keys=True)
    vae_short = "none" if vae == "none" else os.path.basename(os.path.normpath(vae))
    te_short = os.path.basename(os.path.normpath(text_encoder)) if os.path.exists(text_encoder) else text_encoder
    parts = [clean(src), f"{resolution}px", clean(vae_short), clean(te_short)]
    return "-".join(parts + (["states"] if text_states else []) + [hashlib.sha1(key.encode()).hexdigest()[:8]])

def ensure_cache(data, resolution, vae, text_encoder, cache_dir="", device="cpu", text_states=False, **layout):
    """The path of a finished cache for `data` with these settings: `data` itself when it is a cache
    (its settings must match), else `cache_dir` or cache/<cache_slug(...)>, built or resumed if needed."""
    if source_kind(data) == "cache":
        m, lay = LatentCache(data).manifest, {**LAYOUT, **layout}
        wanted = dict(resolution=resolution, vae=_name(vae), text_encoder=_name(text_encoder),
                      aspect_buckets=lay["aspect_buckets"], text_chunks=lay["text_chunks"])
        if lay["aspect_buckets"]:
            wanted.update(max_aspect=lay["max_aspect"], patch=lay["patch"])
        have = lambda k: m.get(k, OPTIONAL.get(k))
        bad = {k: f"cache has {have(k)!r}, asked for {v!r}" for k, v in wanted.items() if have(k) != v}
        if text_states and not m["text_states"]:
            bad["text_states"] = "cache has no text states"
        if bad:
            raise DataError(f"cache {data} does not match the requested settings: {bad}")
        return data
    slug = cache_slug(data, resolution, _name(vae), _name(text_encoder), text_states, **layout)
    return build_cache(data, cache_dir or os.path.join("cache", slug), resolution, vae, text_encoder, device=device,
                       text_states=text_states, **layout)

class LatentCache:
    """A finished cache folder as read-only memmaps. Images i = 0..N-1 and their captions c = 0..M-1: image i is row
    row[i] of its bucket's latents, and has captions caption_start[i] .. + ncaptions[i] - 1."""
    def __init__(self, path):
        self.path, self.manifest = path, _read_json(os.path.join(path, "manifest.json"))
        if self.manifest is None:
            raise DataError(f"{path} is not a finished cache (no readable manifest.json)")
        m, n, here = self.manifest, self.manifest["count"], lambda name: os.path.exists(os.path.join(path, name))
        load = lambda name: np.load(os.path.join(path, name), mmap_mode="r")
        # caches from before buckets and several captions: one square bucket in latents.npy, one caption an image
        buckets = m.get("buckets") or [dict(size=[m["resolution"]] * 2, file="latents.npy")]
        self.sizes = [tuple(b["size"]) for b in buckets]  # (W, H) in pixels
        self.bucket_latents = [load(b["file"]) for b in buckets]  # each (N_b, 2, C, h, w) float16; [:, 1] mirrored
        self.latents = self.bucket_latents[0] if len(buckets) == 1 else None  # the one file of an unbucketed cache
        self.bucket = load("bucket.npy") if here("bucket.npy") else np.zeros(n, np.int16)  # (N,)
        self.members = [np.flatnonzero(self.bucket == b) for b in range(len(buckets))]  # image indices per bucket
        self.row = np.zeros(n, np.int64)  # (N,): an image's row in its bucket's file (files keep the images' order)
        for members in self.members:
            self.row[members] = np.arange(len(members))
        self.ncaptions = load("ncaptions.npy") if here("ncaptions.npy") else np.ones(n, np.int16)  # (N,)
        self.caption_start = np.concatenate([[0], np.cumsum(self.ncaptions, dtype=np.int64)[:-1]])  # (N,)
        self.tokens = load("tokens.npy")  # (M, 77 x text_chunks) int32
        self.empty_tokens = np.array(m["empty_tokens"], np.int32)  # (77 x text_chunks,)
        self.states = self.pooled = self.empty_states = self.empty_pooled = None
        if m["text_states"]:  # (M, L, dim), (M, pooled_dim), (L, dim), (pooled_dim,) float16
            names = ("states.npy", "pooled.npy", "empty_states.npy", "empty_pooled.npy")
            self.states, self.pooled, self.empty_states, self.empty_pooled = map(load, names)

    def __len__(self):
        return self.manifest["count"]

    @property
    def latent_shapes(self):
        """(C, h, w) of each bucket."""
        return [tuple(lat.shape[2:]) for lat in self.bucket_latents]

    def captions(self):
        """Each image's caption (a str), or its captions (a list) where it has several."""
        with open(os.path.join(self.path, "captions.jsonl")) as f:
            return [json.loads(line)["text"] for line in f]

#################################################################################
#                                  Command line                                 #
#################################################################################

def main(argv=None):
    p = argparse.ArgumentParser(description="Encode a dataset into a latent cache (resumable: rerun after a kill).")
    p.add_argument("--data", required=True,
                   help="folder (metadata.jsonl | images + .txt | .tar shards), .tar glob, or a built-in set: "
                   "shapes | scenes | scenes_wide | scenes_wide2 [:N[:SEED]]")
    p.add_argument("--out", default="", help="cache folder (default: cache/<slug of source and settings>)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-mse")
    p.add_argument("--text_encoder", default="ViT-L-14/laion2b_s32b_b82k")
    p.add_argument("--text_states", action="store_true",
                   help="also cache per-token text states (77 x text_chunks x dim fp16 per caption)")
    p.add_argument("--text_chunks", type=int, default=1, help="1..3 chunks of 75 caption tokens (train.py's key)")
    p.add_argument("--aspect_buckets", type=int, default=5, help="N >= 2: aspect buckets (train.py's default); 0: "
                   "square centre crops")
    p.add_argument("--max_aspect", type=float, default=2.0, help="the widest bucket's W / H (>= 1)")
    p.add_argument("--patch", type=int, default=2, help="the DiT's patch (bucket sides: multiples of VAE factor x it)")
    p.add_argument("--min_bucket", type=int, default=64, help="a bucket with fewer images joins its neighbour "
                   "(train.py passes its global micro-batch)")
    p.add_argument("--device", default="auto", help="auto: cuda when there is a GPU, else cpu")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--chunk_size", type=int, default=512, help="items per committed chunk")
    p.add_argument("--workers", type=int, default=0, help="image decoding threads (0: min(8, cpus))")
    a = p.parse_args(argv)
    a.device = resolve_device(a.device)
    try:
        check_layout(a.aspect_buckets, a.max_aspect, a.text_chunks)
        if a.patch < 1 or a.min_bucket < 1:
            raise ConfigError(f"--patch {a.patch} / --min_bucket {a.min_bucket}: each must be >= 1")
        layout = dict(aspect_buckets=a.aspect_buckets, max_aspect=a.max_aspect, text_chunks=a.text_chunks,
                      patch=a.patch, min_bucket=a.min_bucket)
        if a.out and source_kind(a.data) != "cache":
            path = build_cache(a.data, a.out, a.resolution, a.vae, a.text_encoder, a.device, a.text_states,
                               a.batch_size, a.chunk_size, a.workers, **layout)
        else:
            path = ensure_cache(a.data, a.resolution, a.vae, a.text_encoder, device=a.device, text_states=a.text_states,
                                **layout)
    except (ConfigError, LoadError) as e:  # bad keys, DataError, or an encoder that cannot be loaded
        fail(e, prog="data.py")
    print(path)
    return 0

if __name__ == "__main__":
    sys.exit(main())
