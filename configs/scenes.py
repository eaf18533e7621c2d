# The compositional demo: python train.py configs/scenes.py  (CPU, no network)
# then: python evaluate.py --ckpt out/scenes/ckpt.pt --probe scenes --cfg 3 --probe_n 4 --steps 25
# 1 to 4 coloured shapes on a 3x3 grid at 32 px, captions in GenEval's six categories (toys.py); pixel space, the
# tiny random CLIP-style text tower. The shapes demo (configs/shapes.py: its depth and recipe) at 32 px and patch 4
# (64 tokens, as the shapes demo) and width 128, for a time budget; its numbers and ablations: docs/log.md
# 2026-11-29, 2026-12-03 and 2026-12-06. Only what differs from configs/shapes.py, each with its reason.
import os as _os

exec(open(_os.path.join(_os.path.dirname(__file__), "shapes.py")).read())  # the shapes demo's keys, then:

data = "scenes:20000"
out_dir = "out/scenes"
resolution = 32                      # the smallest at which toys.py reads generated-looking renders without error
patch = 4                            # 64 tokens of 4x4 pixels
width, heads = 128, 4                # at this time budget width 128 beats 64 (in-distribution 0.54 vs 0.37, held-out
                                     # 0.19 vs 0.12 at CFG 3, 2 seeds): the CPU runs it at 2.6x the FLOP/s, so it trains
                                     # 2.6x the FLOPs in the same time (at equal FLOPs 64 wins; docs/log.md 2026-12-06,
                                     # "The scenes demo within 30 minutes")
warmup = 370                         # a tenth of width 64's 3,680 steps (the width table); the width-128 runs
                                     # kept it, about a tenth of the ~4,200 steps the budget buys them
max_hours = 0.42                     # ~25 minutes of training: the whole command ends within 30 on 2 cores (cache and
                                     # start-up included; docs/log.md 2026-12-06, "The scenes demo within 30 minutes").
                                     # Was 11,000 steps (47 minutes at 121 img/s); a slower machine trains fewer steps
flip = True                          # flips swap "left" and "right" in the cached caption tokens (data.py); the scenes
                                     # have no text or asymmetric things that a mirror would contradict
sample_prompts = ("a red circle to the left of a blue square|three squares|a green triangle"
                  "|a purple circle above an orange square")
sample_cfg = 3.0
