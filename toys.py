"""
toys.py: the built-in sets "shapes", "scenes" and "scenes_wide", each drawn here and read back from its pixels by the
one reader below: the two sides of one contract. A leaf module (numpy, PIL, scipy only): data.py renders the training
sets with it, evaluate.py's probes (`--probe shapes | scenes | scenes_wide`) score samples with it.

shapes: one filled shape (KINDS) of one colour (COLOURS) on a white, black or grey background, captioned
"a red circle on a white background" (the offline demo's data); the reader gives its (colour, kind).

scenes: scenes of flat shapes on a grid with a caption in one of GenEval's six categories (Ghosh et al. 2023, arXiv
2310.11513); the reader reads the objects back, and the scorer judges them by GenEval's rules.

  grammar     kinds circle | square | triangle; 6 colours; 2 sizes (small, large: unnamed in captions, free);
              a white background; a 3 x 3 grid, one object per cell, never touching
  categories  single object "a triangle" | two objects "a circle and a square" | counting "three squares" (2-4) |
              colours "a red circle" | position "a red circle to the left of a blue square" (right of, above,
              below) | colour attribution "a red circle and a blue square"
  held out    HELD_OUT_PAIRS (colour, kind) and HELD_OUT_KINDS (a kind pairing) are never drawn in any training
              render; held_out_prompts() asks for them, in_distribution_prompts() for the rest
  reader      read_objects(uint8 (H, W, 3)) -> [SceneObject(kind, colour, size, centroid, box)]
  scoring     score(spec, objects) -> bool; evaluate_images(images, specs) -> accuracy per category, overall

scenes_wide: the scenes grammar, categories, held-out split, colours and sizes on a 2 x 4 grid at 2:1 (even samples)
or 4 x 2 at 1:2 (odd ones), so that a square centre crop cuts off the outer columns (rows); "scenes_wide2" is the
same scenes with two captions each, the short one and a long one that places every object in words. For issue 24's
crop-vs-buckets and short-vs-long measurements (data.bucket_size is the buckets' size rule).

A caption describes every object in its image: an attribute it does not name (a colour in "a triangle", every
size) is free, but there are no unnamed objects. Resolutions below MIN_RESOLUTION (32 px, where the small objects
are 5 px) raise ValueError.

The reader: background = the median of the border; objects = 4-connected components of the pixels far from it,
each cut back to the pixels nearer its own colour than the background (a blurred outline's half-way contour). The
two sets differ only in how a component is named, each by what its set can hold: a shapes image has one large
shape on one of three backgrounds (kind from its bounding-box fill ratio, colour the nearest palette entry); a
scene has several small ones on white (kind from template IoU, colour allowing for the blend with the background,
specks and noise passed over).
"""
import math
import random
import re
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

#################################################################################
#                                    Names                                      #
#################################################################################

SHAPES_DEFAULT_COUNT = SCENES_DEFAULT_COUNT = 20000  # samples when the name gives no count
# in data.py's cache fingerprint: bump a set's version when it draws other pictures or captions
VERSIONS = {"shapes": "shapes-v2", "scenes": "scenes-v1", "scenes_wide": "scenes_wide-v1",
            "scenes_wide2": "scenes_wide2-v1"}


def parse_name(name):
    """(set, count, seed) of "shapes[:N[:SEED]]", "scenes[:N[:SEED]]", "scenes_wide[:N[:SEED]]" or
    "scenes_wide2[:N[:SEED]]", None for any other name; ValueError for a scenes count below 1 (a shapes count is
    digits: "shapes:-1" names no set)."""
    if m := re.fullmatch(r"shapes(?::(\d+))?(?::(\d+))?", name):
        return "shapes", int(m.group(1) or SHAPES_DEFAULT_COUNT), int(m.group(2) or 0)
    if not (m := re.fullmatch(r"(scenes|scenes_wide2?)(?::([-+]?\d+))?(?::(\d+))?", name)):
        return None
    n = SCENES_DEFAULT_COUNT if m.group(2) is None else int(m.group(2))
    if n < 1:
        raise ValueError(f"{name!r}: the scenes count must be >= 1, got {n}")
    return m.group(1), n, int(m.group(3) or 0)

#################################################################################
#                               Kinds and colours                               #
#################################################################################

KINDS = ("circle", "square", "triangle")
# far apart in RGB (nearest pair: orange-yellow, 80) and all far from the white background (>= 239)
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 210, 20),
           "purple": (140, 50, 180), "orange": (245, 130, 20)}


def draw_shape(draw, kind, box, fill):
    """A filled kind in the inclusive pixel box (x0, y0, x1, y1): both sets draw with it, and so do the
    reader's templates."""
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    elif kind == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown kind {kind!r}")

#################################################################################
#                        The shapes set "shapes[:N[:SEED]]"                     #
#################################################################################

SHAPE_COLORS = COLOURS  # the scenes set's six colours (well apart in RGB, all far from the backgrounds)
SHAPE_KINDS = KINDS
SHAPE_BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}


def shapes_caption(color, kind, background):
    return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {kind} on a {background} background"


def render_shape(color, kind, background, resolution, rng):
    """One filled shape, 35-70% of the side, at a random position fully inside the image."""
    img = Image.new("RGB", (resolution, resolution), SHAPE_BACKGROUNDS[background])
    side = int(rng.uniform(0.35, 0.70) * resolution)
    x0, y0 = rng.randint(0, resolution - 1 - side), rng.randint(0, resolution - 1 - side)
    box = (x0, y0, x0 + side, y0 + side)  # PIL boxes are inclusive
    draw_shape(ImageDraw.Draw(img), kind, box, SHAPE_COLORS[color])
    return img


def shape_sample(i, seed, resolution):
    """Sample i of the shapes set: (caption, image), a function of (i, seed, resolution) only."""
    rng = random.Random(f"shapes-{seed}-{i}")  # str seeds hash with sha512: the same in every process
    spec = rng.choice(list(SHAPE_COLORS)), rng.choice(SHAPE_KINDS), rng.choice(list(SHAPE_BACKGROUNDS))
    return shapes_caption(*spec), render_shape(*spec, resolution, rng)

#################################################################################
#                     The scenes set "scenes[:N[:SEED]]": grammar               #
#################################################################################

SIZES = {"small": 0.5, "large": 0.7}  # side as a fraction of a grid cell, rounded down to odd pixels
BACKGROUND = (255, 255, 255)
GRID = 3                              # 3 x 3 cells: "left of" / "above" are a column / row apart
WIDE_GRIDS = ((2, 4), (4, 2))         # scenes_wide's (rows, cols): even samples 2:1, odd ones 1:2
WIDE_CELLS = 2                        # ... cells across their short side
JITTER = 0.08                         # an object's centre moves up to this fraction of a cell from the cell's
# True renders read without error from 20 px (3-px objects; from 16 px the small side is 1 px); renders blurred
# by 0.6 px with pixel noise of std 15, a stand-in for samples, read without error from 32 px (5-px small
# objects; 0.997 at 30 px, 0.98 at 24 px over 400 scenes). Below it read_objects and render raise ValueError.
MIN_RESOLUTION = 32
CATEGORIES = ("single_object", "two_objects", "counting", "colours", "position", "colour_attribution")
COUNTS = {2: "two", 3: "three", 4: "four"}
RELATIONS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
# the held-out split: every colour and kind is seen in training, these combinations never are
HELD_OUT_PAIRS = frozenset({("red", "triangle"), ("blue", "circle"), ("yellow", "square")})
HELD_OUT_KINDS = frozenset({frozenset({"circle", "triangle"})})  # never together in one training image
ALL_PAIRS = frozenset((c, k) for c in COLOURS for k in KINDS)
TRAIN_PAIRS = ALL_PAIRS - HELD_OUT_PAIRS
SLOTS = 12  # prompts per category in a probe set; a category with fewer distinct prompts repeats them


def check_resolution(resolution, cells=GRID):
    """resolution: an image's short side, `cells` grid cells across it; its cells must be no smaller than
    MIN_RESOLUTION / GRID px (a scenes image's at MIN_RESOLUTION: 22 px for 2 cells)."""
    if resolution * GRID < MIN_RESOLUTION * cells:
        raise ValueError(f"scenes need >= {math.ceil(MIN_RESOLUTION * cells / GRID)} px (smaller objects are not "
                         f"read reliably), got {resolution}")


def side_px(size, resolution, cells=GRID):
    """An object's side in pixels (`cells` cells across `resolution` px): odd, so a triangle's apex and a circle sit
    on the pixel grid symmetrically."""
    s = int(SIZES[size] * resolution / cells)
    return s - 1 + s % 2

#################################################################################
#                              Captions and specs                               #
#################################################################################

# A spec is what a caption asks for, JSON-ready: {"category", "objects": [{"kind", "colour" (None: free)}],
# "count" (counting), "relation" (position: a RELATIONS key, object 0 relative to object 1)}.

def phrase(obj):
    words = ([obj["colour"]] if obj["colour"] else []) + [obj["kind"]]
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def caption(spec):
    a = spec["objects"][0]
    if spec["category"] == "counting":
        return f"{COUNTS[spec['count']]} {a['kind']}s"
    if spec["category"] == "position":
        return f"{phrase(a)} {RELATIONS[spec['relation']]} {phrase(spec['objects'][1])}"
    return " and ".join(phrase(o) for o in spec["objects"])


_NP = rf"an? (?:({'|'.join(COLOURS)}) )?({'|'.join(KINDS)})"
_COUNTING = re.compile(rf"({'|'.join(COUNTS.values())}) ({'|'.join(KINDS)})s")
_TWO = re.compile(rf"{_NP} (and|{'|'.join(RELATIONS.values())}) {_NP}")
_ONE = re.compile(_NP)


def parse_caption(text):
    """The spec a caption of this grammar asks for (the inverse of caption()); ValueError for other text."""
    obj = lambda colour, kind: {"kind": kind, "colour": colour}
    if m := _COUNTING.fullmatch(text):
        words = {w: n for n, w in COUNTS.items()}
        return {"category": "counting", "objects": [obj(None, m[2])], "count": words[m[1]]}
    if m := _TWO.fullmatch(text):
        objects = [obj(m[1], m[2]), obj(m[4], m[5])]
        if m[3] != "and":
            return {"category": "position", "objects": objects,
                    "relation": {v: k for k, v in RELATIONS.items()}[m[3]]}
        if (m[1] is None) == (m[4] is None):
            return {"category": "two_objects" if m[1] is None else "colour_attribution", "objects": objects}
    if m := _ONE.fullmatch(text):
        return {"category": "single_object" if m[1] is None else "colours", "objects": [obj(m[1], m[2])]}
    raise ValueError(f"not a scenes caption: {text!r}")


def is_held_out(spec):
    """Whether a spec names a held-out (colour, kind) pair or puts a held-out kind pairing together."""
    objects = spec["objects"]
    named = any((o["colour"], o["kind"]) in HELD_OUT_PAIRS for o in objects)
    return named or frozenset(o["kind"] for o in objects) in HELD_OUT_KINDS


def all_specs(category):
    """Every spec of a category, in a fixed order (position: 864, colour attribution: 180, ...)."""
    obj = lambda k, c=None: {"kind": k, "colour": c}
    ordered = [(a, b) for a in KINDS for b in KINDS if a != b]
    if category == "single_object":
        return [{"category": category, "objects": [obj(k)]} for k in KINDS]
    if category == "colours":
        return [{"category": category, "objects": [obj(k, c)]} for k in KINDS for c in COLOURS]
    if category == "counting":
        return [{"category": category, "objects": [obj(k)], "count": n} for k in KINDS for n in COUNTS]
    if category == "two_objects":
        return [{"category": category, "objects": [obj(a), obj(b)]} for a, b in ordered]
    colour_pairs = [(c, d) for c in COLOURS for d in COLOURS if category == "position" or c != d]
    specs = [{"category": category, "objects": [obj(a, c), obj(b, d)]} for a, b in ordered for c, d in colour_pairs]
    if category == "position":
        specs = [dict(s, relation=r) for s in specs for r in RELATIONS]
    return specs


_TRAIN_SPECS = {c: [s for s in all_specs(c) if not is_held_out(s)] for c in CATEGORIES}  # what training draws

#################################################################################
#                                  Rendering                                    #
#################################################################################

class Placed(NamedTuple):
    """One drawn object, resolution-free: its cell and its offset from the cell centre (fractions of a cell)."""
    kind: str
    colour: str
    size: str
    row: int
    col: int
    dx: float = 0.0
    dy: float = 0.0


def render(objects, size, grid=(GRID, GRID)):
    """Placed objects -> PIL RGB image of size R (R x R) or (W, H) on a grid of (rows, cols) cells, objects sized
    by the smaller cell side. An object stays >= 1 px inside its cell, so neighbours are >= 2 px apart."""
    w, h = (size, size) if isinstance(size, int) else size
    short, cells = min((w, grid[1]), (h, grid[0]), key=lambda t: t[0] / t[1])  # the smaller cell's axis
    check_resolution(short, cells)
    img = Image.new("RGB", (w, h), BACKGROUND)
    draw = ImageDraw.Draw(img)
    xs, ys = ([round(k * n / m) for k in range(m + 1)] for n, m in ((w, grid[1]), (h, grid[0])))
    for o in objects:
        side = side_px(o.size, short, cells)
        box = []
        for lo, hi, d in ((xs[o.col], xs[o.col + 1], o.dx), (ys[o.row], ys[o.row + 1], o.dy)):
            start = round((lo + hi - side) / 2 + d * (hi - lo))
            box.append(min(max(start, lo + 1), hi - 1 - side))
        x0, y0 = box
        draw_shape(draw, o.kind, (x0, y0, x0 + side - 1, y0 + side - 1), COLOURS[o.colour])
    return img


def _position_cells(relation, cells):
    """Ordered (cell of object 0, cell of object 1) pairs where the relation is the dominant offset (strictly):
    a diagonal neighbour would satisfy two relations only marginally under GenEval's 0.1 box margin."""
    sign = -1 if relation in ("left of", "above") else 1
    axis = 1 if relation in ("left of", "right of") else 0
    return [(a, b) for a in cells for b in cells
            if sign * (a[axis] - b[axis]) > abs(a[1 - axis] - b[1 - axis])]


def layout(spec, rng, pairs, grid=(GRID, GRID)):
    """A random scene for a spec on a (rows, cols) grid: cells, sizes, offsets, and the free colours drawn from
    `pairs` (colour, kind)."""
    cells = [(r, c) for r in range(grid[0]) for c in range(grid[1])]
    wanted = spec["objects"] * spec.get("count", 1)
    if spec["category"] == "position":
        chosen = list(rng.choice(_position_cells(spec["relation"], cells)))
    else:
        chosen = rng.sample(cells, len(wanted))
    out = []
    for o, (row, col) in zip(wanted, chosen):
        colour = o["colour"] or rng.choice([c for c in COLOURS if (c, o["kind"]) in pairs])
        out.append(Placed(o["kind"], colour, rng.choice(list(SIZES)), row, col,
                          rng.uniform(-JITTER, JITTER), rng.uniform(-JITTER, JITTER)))
    return out


def draw_scene(i, seed, wide=False):
    """Training scene i: (spec, [Placed]), a function of (i, seed) only; held-out pairs are never drawn. wide: of
    scenes_wide, on the grid WIDE_GRIDS[i % 2]."""
    rng = random.Random(f"scenes{'_wide' * wide}-{seed}-{i}")  # str seeds hash with sha512: the same everywhere
    spec = rng.choice(_TRAIN_SPECS[rng.choice(CATEGORIES)])
    spec = dict(spec, objects=[dict(o) for o in spec["objects"]])  # the caller's own copy
    return spec, layout(spec, rng, TRAIN_PAIRS, WIDE_GRIDS[i % 2] if wide else (GRID, GRID))


def scene_sample(i, seed, resolution):
    """Sample i of the scenes set: (caption, PIL image), a function of (i, seed, resolution) only."""
    spec, objects = draw_scene(i, seed)
    return caption(spec), render(objects, resolution)


def truth_layout(spec, seed, size, pairs=ALL_PAIRS):
    """The probe's scene for a spec and an image seed on grid_for(size)'s grid: what render_spec draws and what a
    long probe prompt (long_prompt) names. Free colours from `pairs` (every pair by default)."""
    return layout(spec, random.Random(f"scenes-truth-{seed}"), pairs, grid_for(size))


def render_spec(spec, seed, size, pairs=ALL_PAIRS):
    """A true render of any spec (held-out ones included; free colours from `pairs`), from its seed, at size R
    or (W, H) on grid_for(size)'s grid."""
    return render(truth_layout(spec, seed, size, pairs), size, grid_for(size))

#################################################################################
#               The non-square set "scenes_wide[2][:N[:SEED]]", buckets         #
#################################################################################

# Sample i is drawn at ~R^2 px, R the training resolution: 2S x S on a 2 x 4 grid (even i), S x 2S on 4 x 2 (odd i),
# S = round(R / sqrt 2), so its cells, ~0.35 R, are about a scenes cell (R / 3) and its 2:1 (1:2) bucket is about its
# own size (56 x 28 at 40 px is the bucket at multiples 2 and 4; 90 x 45 -> 90 x 46 at 64 px, multiple 2). data.py's
# square path resizes its short side to R and keeps the middle two columns (rows) of four: 64% of the training
# scenes lose an object. True renders resized (LANCZOS) to their bucket read without error at 40 px, multiples 1-8
# (300 scenes each), 64 px at 2 and 256 px at 16 (sd-vae-ft-mse x patch 2), and so does the scenes' stand-in for
# samples (0.6-px blur, noise std 15) at 40 px, multiples 2 and 4. At 32 px a patch-4 bucket (44 x 24) reads 0.95 of
# 400 scenes and the stand-in at 46 x 22 0.955: resampled 5-px circles pass for squares. Other settings can cost too
# (48 px, multiple 8: 68 x 34 -> 64 x 32 reads 0.77, its 7-px circles as squares): check one with the tests first.
WIDE_MIN_RESOLUTION = 40
# Where a row / column stands, for the long caption; a flip swaps "left" and "right" (data.py) and stays true.
ROW_WORDS = {2: ("top", "bottom"), 4: ("very top", "top", "bottom", "very bottom")}
COL_WORDS = {2: ("left", "right"), 4: ("far left", "left", "right", "far right")}


def check_wide_resolution(resolution):
    if resolution < WIDE_MIN_RESOLUTION:
        raise ValueError(f"scenes_wide needs >= {WIDE_MIN_RESOLUTION} px (its resized objects are not read reliably "
                         f"below), got {resolution}")



def grid_for(size):
    """The (rows, cols) grid of an image of size R or (W, H): the scenes' 3 x 3 when square, else WIDE_GRIDS'."""
    w, h = (size, size) if isinstance(size, int) else size
    return (GRID, GRID) if w == h else WIDE_GRIDS[w < h]


def long_caption(spec, objects, grid):
    """The caption, then every object with its colour and place: "a red circle to the left of a blue square; the
    red circle is at the top far left, the blue square at the bottom right"."""
    places = [f"the {o.colour} {o.kind} {'is ' * (k == 0)}at the {ROW_WORDS[grid[0]][o.row]} "
              f"{COL_WORDS[grid[1]][o.col]}" for k, o in enumerate(objects)]
    return f"{caption(spec)}; {', '.join(places)}"


def parse_long_caption(text, grid):
    """(spec, [(colour, kind, row, col)]) of a long caption on a (rows, cols) grid; ValueError for other text."""
    rows, cols = ROW_WORDS[grid[0]], COL_WORDS[grid[1]]
    place = re.compile(rf"the ({'|'.join(COLOURS)}) ({'|'.join(KINDS)}) (?:is )?at the ({'|'.join(rows)}) "
                       rf"({'|'.join(cols)})")
    short, _, rest = text.partition("; ")
    found = [place.fullmatch(p) for p in rest.split(", ")]
    if all(found):
        spec, objects = parse_caption(short), [(m[1], m[2], rows.index(m[3]), cols.index(m[4])) for m in found]
        if long_caption(spec, [Placed(k, c, "small", r, q) for c, k, r, q in objects], grid) == text:  # "is" once
            return spec, objects
    raise ValueError(f"not a long scenes caption: {text!r}")


def long_prompt(spec, seed, size, pairs=ALL_PAIRS):
    """The long probe prompt of a spec for the image of this seed and (W, H): its caption, then every object of
    truth_layout's scene with its place (long_caption), so render_spec(spec, seed, size, pairs) is its true render.
    The scenes_wide_long probe scores a sample against the spec alone, as the short probe does."""
    return long_caption(spec, truth_layout(spec, seed, size, pairs), grid_for(size))


def wide_scene_sample(i, seed, resolution, captions=1):
    """Sample i of scenes_wide (captions=1): (PIL image, caption), or of scenes_wide2 (captions=2): (PIL image,
    [caption, long caption]), the same scenes; a function of (i, seed, resolution) only."""
    check_wide_resolution(resolution)
    if captions not in (1, 2):
        raise ValueError(f"captions must be 1 or 2, got {captions!r}")
    spec, objects = draw_scene(i, seed, wide=True)
    rows, cols = grid = WIDE_GRIDS[i % 2]
    short = round(resolution / math.sqrt(2))
    image = render(objects, (short * cols // WIDE_CELLS, short * rows // WIDE_CELLS), grid)
    return image, caption(spec) if captions == 1 else [caption(spec), long_caption(spec, objects, grid)]

#################################################################################
#                                  Prompt sets                                  #
#################################################################################

class Prompt(NamedTuple):
    text: str
    category: str
    spec: dict


def _prompt_set(held_out):
    """SLOTS prompts per category that has any on this side of the split (a fixed draw; small sets cycle)."""
    out = []
    for category in CATEGORIES:
        specs = [s for s in all_specs(category) if is_held_out(s) == held_out]
        if specs:
            picks = random.Random(f"scenes-prompts-{category}-{held_out}").sample(specs, min(SLOTS, len(specs)))
            out += [Prompt(caption(s), category, s) for s in (picks * SLOTS)[:SLOTS]]
    return out


def in_distribution_prompts():
    """72 prompts, 12 per category, of combinations the training set draws."""
    return _prompt_set(False)


def held_out_prompts():
    """48 prompts, 12 per category, each naming a held-out pair or pairing: two objects, colours, position and
    colour attribution (a kind alone and a count of one kind name no combination to hold out)."""
    return _prompt_set(True)


def probe_plan(prompts, n_per_prompt, seed):
    """(texts, specs, seeds): each prompt n_per_prompt times in a row, image k with seed + k (as the shapes probe)."""
    expanded = [p for p in prompts for _ in range(n_per_prompt)]
    return [p.text for p in expanded], [p.spec for p in expanded], [seed + k for k in range(len(expanded))]

#################################################################################
#                           The reader (both sets)                              #
#################################################################################

def background(im):
    """(3,) the background colour of a float (H, W, 3) image: the median of its border, plain in both sets."""
    return np.median(np.concatenate([im[0], im[-1], im[:, 0], im[:, -1]]), axis=0)


def far_from(im, colour, threshold):
    """(H, W) bool: the pixels farther than threshold (RGB L2) from colour."""
    return np.linalg.norm(im - colour, axis=-1) > threshold


def nearer(pixels, fg, bg):
    """(...) bool: the pixels (..., 3) nearer fg than bg, which cuts a blurred outline at its half-way contour."""
    return np.linalg.norm(pixels - fg, axis=-1) < np.linalg.norm(pixels - bg, axis=-1)


def bounding_box(mask):
    """(row slice, column slice) of a non-empty (H, W) mask's bounding box."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def largest_component(mask: np.ndarray):
    """The largest 4-connected component of a boolean (H, W) mask, or None when the mask is empty."""
    labels, count = ndimage.label(mask)
    return labels == 1 + np.argmax(np.bincount(labels.ravel())[1:]) if count else None

# The shapes set: one shape, 35-70% of the side, on a white, black or grey background.

# fill ratio of the bounding box of an axis-aligned filled shape: disc pi/4, square 1, triangle with a side on
# the box edge and the apex on the opposite edge 1/2
KIND_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}


def shape_attributes(images, threshold=60.0, min_area=0.005, max_area=0.6) -> list:
    """uint8 (N, H, W, 3) -> [(colour or None, kind or None)]: the shape = the largest component far_from the
    background, then regrown as the pixels nearer its median colour than the background's; colour = palette entry
    nearest that median, kind = KIND_FILL entry nearest the shape's bounding-box fill ratio. No shape covering
    min_area..max_area of the image (nothing drawn) -> (None, None)."""
    names, palette = list(SHAPE_COLORS), np.array(list(SHAPE_COLORS.values()), dtype=np.float64)  # (P, 3)
    out = []
    for im in np.asarray(images, dtype=np.float64):  # (H, W, 3)
        bg = background(im)  # (3,)
        mask = largest_component(far_from(im, bg, threshold))  # (H, W)
        if mask is not None:
            fg = np.median(im[mask], axis=0)  # (3,) shape colour
            # two classes: noise far from the background but no nearer the shape's colour does not stretch the box
            mask = largest_component(nearer(im, fg, bg) & ndimage.binary_dilation(mask))
        if mask is None or not min_area <= mask.mean() <= max_area:
            out.append((None, None))
            continue
        rows, cols = bounding_box(mask)
        fill = mask.sum() / ((rows.stop - rows.start) * (cols.stop - cols.start))
        colour = names[np.argmin(np.linalg.norm(palette - fg, axis=-1))]
        kind = min(KIND_FILL, key=lambda k: abs(KIND_FILL[k] - fill))
        out.append((colour, kind))
    return out

# The scenes set: up to four small objects on white, so every component is read, and one that is no object
# (a speck, noise) is passed over.

class SceneObject(NamedTuple):
    kind: str
    colour: str
    size: str
    centroid: tuple  # (x, y) in pixels
    box: tuple       # (x0, y0, x1, y1), inclusive


FOREGROUND = 80.0   # RGB distance from the background that makes a pixel part of an object (palette: >= 239)
MIN_IOU = 0.6       # a component is an object when it overlaps a kind's template this much (true renders: 1.0)
MAX_SPREAD = 60.0   # ... and its pixels nearer its colour than the background are this close to it (median)


def _template(kind, h, w):
    img = Image.new("L", (w, h), 0)
    draw_shape(ImageDraw.Draw(img), kind, (0, 0, w - 1, h - 1), 1)
    return np.asarray(img, bool)


def _kind(mask):
    """(best kind, its IoU) against each kind's template drawn in the component's bounding box."""
    ious = {k: (mask & t).sum() / (mask | t).sum() for k in KINDS for t in [_template(k, *mask.shape)]}
    best = max(ious, key=ious.get)
    return best, ious[best]


def _palette_colour(fg, bg):
    """The palette entry whose mix with the background passes nearest fg: min over entries p and a in [0, 1] of
    |fg - (bg + a (p - bg))|. A blurred sample's small object is blended with the background (the median of a
    5-px red triangle under a 0.6-px blur is (230, 93, 93), nearer orange than red as a plain colour)."""
    names, palette = list(COLOURS), np.array(list(COLOURS.values()), float)  # (P, 3)
    direction = palette - bg  # (P, 3)
    a = np.clip((direction @ (fg - bg)) / (direction ** 2).sum(1), 0, 1)  # (P,)
    return names[int(np.argmin(np.linalg.norm(bg + a[:, None] * direction - fg, axis=1)))]


def _read_component(patch, region, bg, small, large):
    """One component (its bounding-box patch (h, w, 3) and mask) -> (kind, colour, size, mask cropped to the
    object, its (row, col) in the patch) or None. Colour: from the median of its more saturated half (the rim is a
    blend); shape: the pixels nearer that colour than the background."""
    if region.sum() < small ** 2 / 4:
        return None  # a speck (the common case in noise: checked before any median)
    pixels = patch[region]
    far = np.linalg.norm(pixels - bg, axis=1)
    fg = np.median(pixels[far >= np.median(far)], axis=0)  # (3,)
    mask = region & nearer(patch, fg, bg)
    if not small ** 2 / 4 <= mask.sum() <= 2 * large ** 2:
        return None  # a speck, or larger than any scene object
    spread = np.median(np.linalg.norm(patch[mask] - np.median(patch[mask], axis=0), axis=1))
    rows, cols = bounding_box(mask)
    mask = mask[rows, cols]
    kind, iou = _kind(mask)
    if iou < MIN_IOU or spread > MAX_SPREAD:
        return None  # no kind's outline, or no flat colour: noise
    size = "large" if max(mask.shape) > (small + large) / 2 else "small"
    return kind, _palette_colour(fg, bg), size, mask, (rows.start, cols.start)


def read_objects(image, cells=GRID):
    """uint8 (H, W, 3) -> [SceneObject]: every 4-connected component far_from the background by FOREGROUND, cut
    back to the pixels nearer its colour than the background; one smaller than a quarter of the small square
    (specks) or larger than twice the large square (not a scene object) is passed over, and so is one that fits no
    kind's template (MIN_IOU) or has no flat colour (MAX_SPREAD): noise. Kind: the best template; colour:
    _palette_colour; size: the bounding box's side against the two sides. cells: grid cells across the image's short
    side (a scenes image: GRID; a scenes_wide one: WIDE_CELLS, also once cropped to a square)."""
    im = np.asarray(image, dtype=np.float64)
    check_resolution(min(im.shape[:2]), cells)
    bg = background(im)  # (3,)
    labels, _ = ndimage.label(far_from(im, bg, FOREGROUND))
    small, large = (side_px(s, min(im.shape[:2]), cells) for s in ("small", "large"))
    out = []
    for k, box in enumerate(ndimage.find_objects(labels)):
        read = _read_component(im[box], labels[box] == k + 1, bg, small, large)
        if read is None:
            continue
        kind, colour, size, mask, (r0, c0) = read
        y0, x0 = box[0].start + r0, box[1].start + c0
        ys, xs = np.nonzero(mask)
        out.append(SceneObject(kind, colour, size, (x0 + xs.mean(), y0 + ys.mean()),
                               (x0, y0, x0 + mask.shape[1] - 1, y0 + mask.shape[0] - 1)))
    return out

#################################################################################
#                                  Scoring                                      #
#################################################################################

POSITION_THRESHOLD = 0.1  # GenEval's margin: the offset is reduced by 0.1 x the sum of the two boxes' sides


def relations(a, b):
    """GenEval's relative_position (evaluation/evaluate_images.py) of object a to b, on centroids: the offset,
    reduced by the margin on each axis, names a relation where it is > 0.5 of the offset's length."""
    offset = np.subtract(a.centroid, b.centroid)
    dims = [np.subtract(o.box[2:], o.box[:2]) + 1 for o in (a, b)]
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dims[0] + dims[1]), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    return {r for r, hit in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                             ("below", dy > 0.5)) if hit}


def score(spec, objects):
    """GenEval's rules (evaluation/evaluate_images.py) on read objects. Counting: exactly `count` objects of the
    kind (others ignored); position: an object matching each named one with the relation between them; every
    other category: each named object present, with its colour where one is named (so colour attribution fails
    when the colours swap kinds). GenEval judges colour and position on the detector's most confident object of
    a class; the reader has no confidences, so any matching object counts."""
    found = [[o for o in objects if o.kind == w["kind"] and w["colour"] in (None, o.colour)]
             for w in spec["objects"]]
    if spec["category"] == "counting":
        return len(found[0]) == spec["count"]
    if spec["category"] == "position":
        return any(spec["relation"] in relations(a, b) for a in found[0] for b in found[1])
    return all(found)


def evaluate_images(images, specs, cells=GRID):
    """uint8 images (N, H, W, 3) or a list of (H, W, 3) of any shapes, and their specs -> accuracy per category (None
    where no spec has it), overall (GenEval's: the mean over the categories present), n, and n per category.
    cells: read_objects'."""
    hits = {c: [] for c in CATEGORIES}
    for image, spec in zip(images, specs, strict=True):
        hits[spec["category"]].append(score(spec, read_objects(image, cells)))
    acc = {c: float(np.mean(h)) if h else None for c, h in hits.items()}
    present = [a for a in acc.values() if a is not None]
    return dict(acc, overall=float(np.mean(present)) if present else None, n=len(specs),
                n_per_category={c: len(h) for c, h in hits.items()})
