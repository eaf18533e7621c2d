"""
sources.py: the image-caption sets people have, read in a fixed order as Items (key, read() -> (image, caption));
data.py turns them into a latent cache.

  imagefolder       a folder with metadata.jsonl: {"file_name", "text"} a line, text a string or a list of strings
                    (Hugging Face's imagefolder layout)
  captioned_images  a folder of images, each captioned by the same-named .txt file beside it (one caption a
                    non-empty line)
  webdataset        .tar shards, a folder or a glob, as img2dataset writes them: KEY.jpg|png|webp with KEY.txt (one
                    caption a line) or KEY.json's "text" (a string or a list)
  built-in          toys.py's sets, "shapes", "scenes", "scenes_wide", "scenes_wide2"[:N[:SEED]]

A caption is a str (one), a list of str (several), bytes (a .txt file: one a line) or None (missing); data.py
decodes, splits and counts them. An item that cannot be read says why (Item.error, or read() raising).
"""
import functools
import glob
import hashlib
import json
import os
import tarfile
from typing import NamedTuple

import toys
from encoders import LoadError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # the project's one list
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # what img2dataset writes


class DataError(LoadError):
    """An empty, missing or unreadable data source (the CLIs map it to exit code 2)."""


# Each source yields Items in a fixed order; read() returns (image bytes | PIL image, caption) where the caption is
# a str (one caption), a list of str (several), bytes (a .txt file: one caption a non-empty line) or None.

class Item(NamedTuple):
    key: str
    read: object = None  # () -> (bytes | PIL.Image, str | list | bytes | None)
    error: str = ""      # a skip reason known without reading

def source_kind(data):
    if builtin := builtin_set(data):
        return builtin[0]  # "shapes" | "scenes" | "scenes_wide" | "scenes_wide2"
    if os.path.isdir(data):
        if os.path.exists(os.path.join(data, "manifest.json")) and any(
                os.path.exists(os.path.join(data, f)) for f in ("latents.npy", "bucket.npy")):
            return "cache"  # a data folder that merely holds some manifest.json is read as data
        if os.path.exists(os.path.join(data, "metadata.jsonl")):
            return "imagefolder"
        return "webdataset" if glob.glob(os.path.join(data, "*.tar")) else "captioned_images"
    if glob.glob(data) and all(p.endswith(".tar") for p in glob.glob(data)):
        return "webdataset"
    raise DataError(f"data source {data!r} not found or not supported: "
                    "expected a folder, a .tar glob, a cache, or shapes | scenes | scenes_wide | scenes_wide2"
                    "[:N[:SEED]]")

def source_items(data, resolution):
    """(iterator of Items in a fixed order, item count or None when unknown before reading)."""
    kind = source_kind(data)
    if kind in toys.VERSIONS:
        return _builtin_items(data, resolution)
    if kind == "imagefolder":
        return _imagefolder_items(data)
    if kind == "webdataset":
        return _tar_items(_files(data)), None
    if kind == "captioned_images":
        return _captioned_items(data)
    raise DataError(f"{data} is already a cache")

def _files(data):
    """The files that make up a source, sorted (the source's order and its fingerprint)."""
    if source_kind(data) == "webdataset":
        return sorted(glob.glob(os.path.join(data, "*.tar"))) if os.path.isdir(data) else sorted(glob.glob(data))
    out = []
    for folder, dirs, names in os.walk(data):
        dirs.sort()
        out += [os.path.join(folder, n) for n in sorted(names)]
    return out

def source_fingerprint(data):
    """sha1 over (relative path, size, mtime) of every file; for a built-in set, over (renderer, count, seed)."""
    h, kind = hashlib.sha1(), source_kind(data)
    if kind in toys.VERSIONS:
        h.update(("%s:%d:%d" % (toys.VERSIONS[kind], *builtin_set(data)[1:])).encode())
    else:
        for p in _files(data):
            st = os.stat(p)
            name = os.path.basename(p) if kind == "webdataset" else os.path.relpath(p, data)
            h.update(f"{name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()

def _read_file(path):
    with open(path, "rb") as f:
        return f.read()

# A folder with metadata.jsonl: one {"file_name", "text"} record a line (Hugging Face's imagefolder layout).

def _imagefolder_items(data):
    try:
        lines = [l for l in _read_file(os.path.join(data, "metadata.jsonl")).splitlines() if l.strip()]
    except OSError as e:
        raise DataError(f"cannot read {data}/metadata.jsonl: {e}") from e
    if not lines:
        raise DataError(f"{data}/metadata.jsonl is empty")
    return (_metadata_item(data, l) for l in lines), len(lines)

def _metadata_item(root, line):
    try:
        rec = json.loads(line)
        name, text = rec["file_name"], rec.get("text")
        path = os.path.join(root, name)
    except (ValueError, KeyError, TypeError, AttributeError):
        return Item(line[:80].decode("utf-8", "replace"), error="bad_metadata")
    return Item(name, lambda: (_read_file(path), _json_caption(text)))

def _json_caption(text):
    """A JSON `text`: a list (several captions), None (missing), or anything else as its text (0 -> "0")."""
    return [str(t) for t in text] if isinstance(text, list) else None if text is None else str(text)

# A folder of images, each captioned by the same-named .txt file beside it (several lines: several captions).

def _captioned_items(data):
    paths = [p for p in _files(data) if p.lower().endswith(IMAGE_EXTS)]
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) found in {data}")
    return (Item(os.path.relpath(p, data), functools.partial(_captioned_image, p)) for p in paths), len(paths)

def _captioned_image(path):
    txt = os.path.splitext(path)[0] + ".txt"
    return _read_file(path), (_read_file(txt) if os.path.exists(txt) else None)

# Webdataset .tar shards: the files KEY.EXT with the same KEY form one sample (an image, KEY.txt its captions a line,
# or KEY.json's "text", a string or a list, when there is no KEY.txt).

def _tar_items(shards):
    for shard in shards:
        try:
            tf = tarfile.open(shard)
        except (tarfile.TarError, OSError):
            yield Item(os.path.basename(shard), error="unreadable_shard")
            continue
        with tf:
            members, broken = [], False
            try:
                members.extend(tf)  # reads the headers; a truncated shard keeps what came before the damage
            except (tarfile.TarError, OSError):
                broken = True
            groups = {}  # KEY -> {ext: member}
            for m in members:
                if m.isfile():
                    folder, base = os.path.split(m.name)
                    key, _, ext = base.partition(".")
                    groups.setdefault(os.path.join(folder, key), {})[ext.lower()] = m
            for key, files in groups.items():
                img = next((files[e] for e in TAR_IMAGE_EXTS if e in files), None)
                if img is None:
                    yield Item(f"{os.path.basename(shard)}/{key}", error="missing_image")
                    continue
                cap = files.get("txt") or files.get("json")
                read = lambda img=img, cap=cap: (tf.extractfile(img).read(), cap and _tar_caption(tf, cap))
                yield Item(f"{os.path.basename(shard)}/{key}", read)  # read() runs while this shard is open
            if broken:
                yield Item(os.path.basename(shard), error="truncated_shard")

def _tar_caption(tf, member):
    raw = tf.extractfile(member).read()
    if not member.name.endswith(".json"):
        return raw
    return _json_caption(json.loads(raw).get("text"))  # a bad .json is a read_error

# The built-in sets (toys.VERSIONS: "shapes", "scenes", "scenes_wide", "scenes_wide2", each [:N[:SEED]]): toys.py
# draws them (and reads them back for evaluate.py's probes); sample i is a function of (i, SEED, resolution) only.

def builtin_set(data):
    """(set, count, seed) of a built-in set's name, None for other sources; a scenes count below 1 is a DataError."""
    try:
        return toys.parse_name(data)
    except ValueError as e:
        raise DataError(str(e)) from None

def _builtin_items(data, resolution):
    kind, n, seed = builtin_set(data)
    if kind != "shapes":
        try:
            (toys.check_wide_resolution if kind.startswith("scenes_wide") else toys.check_resolution)(resolution)
        except ValueError as e:
            raise DataError(str(e)) from None
    read = {"shapes": lambda i: toys.shape_sample(i, seed, resolution)[::-1],  # (image, caption)
            "scenes": lambda i: toys.scene_sample(i, seed, resolution)[::-1],
            "scenes_wide": lambda i: toys.wide_scene_sample(i, seed, resolution),  # 2:1 and 1:2 images
            "scenes_wide2": lambda i: toys.wide_scene_sample(i, seed, resolution, captions=2)}[kind]  # [short, long]
    name = {"shapes": "shape", "scenes": "scene"}.get(kind, "wide")
    return (Item(f"{name}{i}", functools.partial(read, i)) for i in range(n)), n
