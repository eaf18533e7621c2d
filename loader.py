"""
loader.py: a latent cache (data.py) -> training batches: infinite, deterministic per epoch from the seed, sharded
across DDP ranks, resumable mid-epoch (the position is the checkpoint's loader_state), prefetched in a background
thread. Caption dropout, flips and which of an image's captions it gets are drawn per sample from (seed, epoch,
index), so they do not depend on how a global batch is split; a flipped sample takes the mirrored image's cached
latent and its caption's "left" and "right" swapped (data.MIRROR_WORDS). With aspect buckets each optimizer step's
images (batch x accum x ranks) come from one bucket, so every micro-step of every rank has one shape and
accumulation and DDP split the same images as without buckets; the steps of all buckets in an order drawn per
epoch.
"""
import functools
import queue
import threading
import warnings

import numpy as np
import torch

from data import MIRROR_WORDS, LatentCache

_WARNED = set()  # cache paths whose text-states flip warning was given (once per process)

@functools.lru_cache(maxsize=4)
def epoch_plan(n, seed, epoch, cond_drop):
    """(perm, flip, drop, pick) of one epoch; flip / drop / pick (in [0, 1): which caption) are indexed by sample,
    so they depend on (seed, epoch, index) only."""
    perm = np.random.default_rng([seed, epoch, 0]).permutation(n)
    flip = np.random.default_rng([seed, epoch, 1]).random(n) < 0.5
    drop = np.random.default_rng([seed, epoch, 2]).random(n) < cond_drop
    pick = np.random.default_rng([seed, epoch, 4]).random(n)
    for a in (perm, flip, drop, pick):
        a.flags.writeable = False
    return perm, flip, drop, pick


@functools.lru_cache(maxsize=4)
def bucket_batches(cache, step_batch, seed, epoch):
    """One epoch's optimizer steps on a bucketed cache: [(bucket, sample indices)]: each bucket's samples in the
    epoch's permutation, cut into steps of step_batch (its tail dropped), the steps of all buckets in an order drawn
    from (seed, epoch). A bucket smaller than a step gives none (Loader warns)."""
    perm = epoch_plan(len(cache), seed, epoch, 0.0)[0]
    in_bucket = cache.bucket[perm]
    batches = []
    for b in range(len(cache.sizes)):
        order = perm[in_bucket == b]
        batches += [(b, order[k * step_batch:(k + 1) * step_batch]) for k in range(len(order) // step_batch)]
    return [batches[i] for i in np.random.default_rng([seed, epoch, 3]).permutation(len(batches))]

def mirror_tokens(tokens, flip, pairs):
    """tokens (B, L) int64, flip (B,) bool, pairs (P, 2) int64 -> tokens where, in the flipped rows, each id of a
    pair is replaced by the other one (no loop over samples)."""
    is_a, is_b = tokens[..., None] == pairs[:, 0], tokens[..., None] == pairs[:, 1]  # (B, L, P)
    other = (is_a * pairs[:, 1] + is_b * pairs[:, 0]).sum(-1)  # (B, L): a mirrored id's partner, 0 elsewhere
    return torch.where(flip[:, None] & (is_a | is_b).any(-1), other, tokens)

class Loader:
    """Infinite deterministic batches from a cache, one per micro-step. Per epoch e: perm from (seed, e), global
    batches of batch_size * world_size in order (tail dropped), rank r takes slice [r*B, (r+1)*B). With buckets:
    bucket_batches' steps of batch_size * accum * world_size, micro-step m of rank r takes [(m*world + r)*B, +B)."""
    def __init__(self, cache, batch_size, seed=0, rank=0, world_size=1, cond_drop=0.0, flip=True, device="cpu",
                 prefetch=2, accum=1):
        self._thread = None
        self.cache = cache if isinstance(cache, LatentCache) else LatentCache(cache)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.cond_drop, self.flip, self.device, self.prefetch = cond_drop, flip, torch.device(device), prefetch
        self.bucketed, self.accum = len(self.cache.sizes) > 1, accum if len(self.cache.sizes) > 1 else 1
        step_batch, sizes = batch_size * world_size * self.accum, [len(m) for m in self.cache.members]
        self.batches_per_epoch = sum(n // step_batch for n in sizes) * self.accum  # micro-steps
        if self.batches_per_epoch == 0:
            raise ValueError(f"cache has {len(self.cache)} samples, fewer than one global batch "
                             f"({batch_size} x {world_size})" + (f" x accum {accum} in any bucket" if self.bucketed
                                                                 else ""))
        self.left_out = {"%dx%d" % size: n for size, n in zip(self.cache.sizes, sizes) if n < step_batch}
        if self.bucketed and self.left_out and rank == 0:  # data.py merges such buckets for the step it builds for
            warnings.warn(f"buckets with fewer images than an optimizer step's {step_batch} are left out: "
                          f"{self.left_out} (this cache was built for a smaller step: give train.py another "
                          "--cache_dir to build one that merges them)", stacklevel=2)
        self.step = 0  # batches consumed by the caller (prefetched ones do not count)
        self._mirror = self._mirror_pairs() if flip else None
        self._start()

    def _mirror_pairs(self):
        """The (P, 2) token ids a flip swaps, None when there is nothing to swap: a cache built before the manifest
        kept them (read as before), or one with cached text states (which say the unflipped words: a warning)."""
        m = self.cache.manifest
        if not m.get("mirror_tokens"):
            return None
        if self.cache.states is None:
            return torch.tensor(m["mirror_tokens"], dtype=torch.long)
        if m.get("mirror_captions") and self.cache.path not in _WARNED:
            _WARNED.add(self.cache.path)
            warnings.warn(f"{self.cache.path}: {m['mirror_captions']} captions hold "
                          f"{'/'.join(w for p in MIRROR_WORDS for w in p)}, but cached text states cannot be "
                          "mirrored: flipped samples keep the unflipped words (rebuild without --text_states, or "
                          "flip = False)", stacklevel=3)
        return None

    def plan(self, step):
        """This rank's batch number `step`: (sample indices, flip flags, drop flags, caption rows, bucket)."""
        c, epoch, k = self.cache, *divmod(step, self.batches_per_epoch)
        perm, flip, drop, pick = epoch_plan(len(c), self.seed, epoch, self.cond_drop)
        bucket, start = 0, (k * self.world_size + self.rank) * self.batch_size
        if self.bucketed:
            (bucket, perm), micro = bucket_batches(c, self.batch_size * self.world_size * self.accum, self.seed,
                                                   epoch)[k // self.accum], k % self.accum
            start = (micro * self.world_size + self.rank) * self.batch_size  # train_step's rows of the step's noise
        idx = perm[start:start + self.batch_size]
        caption = c.caption_start[idx] + (pick[idx] * c.ncaptions[idx]).astype(np.int64)  # one of each image's
        return idx, (flip[idx] if self.flip else np.zeros(len(idx), bool)), drop[idx], caption, bucket

    def gather(self, step):
        """Batch `step` as stored (float16 latents/states): rows, flips, captions and caption drops applied."""
        idx, flip, drop, caption, bucket = self.plan(step)
        c = self.cache
        tokens = c.tokens[caption].astype(np.int64)  # (B, 77 x text_chunks)
        if self._mirror is not None:  # a mirrored image's caption says "right" where the image's said "left"
            tokens = mirror_tokens(torch.from_numpy(tokens), torch.from_numpy(flip), self._mirror).numpy()
        tokens[drop] = c.empty_tokens
        latents = c.bucket_latents[bucket][c.row[idx], flip.astype(np.int64)]  # (B, C, h, w) float16
        batch = {"latents": latents, "tokens": tokens}
        if c.states is not None:
            states, pooled = c.states[caption], c.pooled[caption]  # (B, L, dim), (B, pooled_dim) float16 copies
            states[drop], pooled[drop] = c.empty_states, c.empty_pooled
            batch["states"], batch["pooled"] = states, pooled
        return {k: torch.from_numpy(v) for k, v in batch.items()}

    def _batch(self, step):
        batch = self.gather(step)
        if self.device.type == "cuda":  # pinned float16: the copy in __next__ is asynchronous and half the bytes
            return {k: v.pin_memory() for k, v in batch.items()}
        # fp16 -> fp32 here, in the thread
        return {k: v.float() if v.dtype == torch.float16 else v for k, v in batch.items()}

    def _work(self, step, q, stop):
        """Background thread: batches step, step + 1, ... into the bounded queue until stopped."""
        while not stop.is_set():
            try:
                batch = self._batch(step)
            except Exception as e:  # handed to the caller, raised by __next__
                batch = e
            while not stop.is_set():
                try:
                    q.put(batch, timeout=0.1)
                    break
                except queue.Full:
                    pass
            if isinstance(batch, Exception):
                return  # nothing is produced after an error
            step += 1

    def _start(self):
        if self.prefetch > 0:
            self._queue, self._stop = queue.Queue(self.prefetch), threading.Event()
            self._thread = threading.Thread(target=self._work, args=(self.step, self._queue, self._stop), daemon=True)
            self._thread.start()

    def close(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def __iter__(self):
        return self

    def __next__(self):
        batch = self._queue.get() if self._thread is not None else self._batch(self.step)
        if isinstance(batch, Exception):
            raise batch
        self.step += 1
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        return {k: v.float() if v.dtype == torch.float16 else v for k, v in batch.items()}  # on the GPU: fp16 -> fp32

    def state_dict(self):
        return {"step": self.step, "seed": self.seed, "global_batch": self.batch_size * self.world_size}

    def load_state_dict(self, sd):
        self.close()
        global_batch = self.batch_size * self.world_size  # another world size: continue from the same sample count
        same = sd["global_batch"] == global_batch
        self.step = sd["step"] if same else sd["step"] * sd["global_batch"] // global_batch
        self._start()

    def __del__(self):
        self.close()

