"""
The optimizer and its schedule: Muon on the blocks' weight matrices with AdamW on the rest (one object to the
loop), the learning-rate schedule (warmup, then constant / cosine / warmup-stable-decay), and the time-budget
planner that makes a max_hours run end its LR decay on time.
"""
import math
import time

import torch


def muon_params(model):
    """The parameters Muon updates: the 2-D weight matrices of the blocks' attention and MLP linears (Muon is for
    hidden layers; embedders, the final layer, biases, norms and modulation stay with AdamW)."""
    return [p for name, p in model.blocks.named_parameters() if p.ndim == 2 and "adaLN" not in name]


def configure_optimizer(model, lr, weight_decay, betas, optimizer="adamw", muon_lr=0.02, extra=None):
    """AdamW, decay on parameters of >= 2 dims only; fused (one kernel per step, and it can skip a step on device).
    optimizer "muon": Muon (muon_lr) on muon_params(model), this AdamW (lr) on the rest, as one MuonAdamW.
    extra: a module trained beside the model by the AdamW half (SRA's head), its parameters after the model's."""
    muon = {id(p) for p in muon_params(model)} if optimizer == "muon" else set()
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in muon]
    params += list(extra.parameters()) if extra is not None else []
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    if optimizer == "adamw":
        return adamw
    # "original" lr adjustment (Keller Jordan's Muon: sqrt(max(1, fan_out / fan_in))); lr_scale: its share of lr
    muon = torch.optim.Muon(muon_params(model), lr=muon_lr, weight_decay=weight_decay, adjust_lr_fn="original")
    muon.param_groups[0]["lr_scale"] = muon_lr / lr
    return MuonAdamW(muon, adamw)


def average_grads(module, world):
    """A module trained beside a DDP-wrapped model but outside it (SRA's head): its gradients averaged over the ranks
    as DDP averages the model's (each rank's divided by the world size, then summed). None: nothing to do."""
    for p in module.parameters() if module is not None else ():
        torch.distributed.all_reduce(p.grad.div_(world))


def set_hyperparameters(optimizer, C):
    """A resumed optimizer's state dict brings back its hyperparameters too: this run's settings win."""
    for group, wd in zip(optimizer.param_groups, (C.weight_decay, 0.0, C.weight_decay)):  # AdamW's two, Muon's
        group["weight_decay"] = wd
        if "betas" in group:
            group["betas"] = (C.adam_beta1, C.adam_beta2)
        else:
            group["lr_scale"] = C.muon_lr / C.lr


class MuonAdamW:
    """Muon and AdamW as one optimizer to the loop (param_groups, step, zero_grad, state_dict). A non-finite step
    (found_inf = 1, set by train_step) changes nothing, with no host sync: fused AdamW skips on the device, and
    Muon's weights and momentum are put back from a copy taken before its step (torch.where on found_inf)."""
    def __init__(self, muon, adamw):
        self.muon, self.adamw, self.found_inf, self._saved = muon, adamw, None, None
        self._params = [p for g in muon.param_groups for p in g["params"]]
        for p in self._params:  # made now (as Muon would at its first step) so that the copy covers them
            muon.state[p]["momentum_buffer"] = torch.zeros_like(p)

    @property
    def param_groups(self):  # live: load_state_dict replaces the group dicts
        return self.adamw.param_groups + self.muon.param_groups

    def step(self):
        self.adamw.found_inf = self.found_inf
        self.adamw.step()
        live = self._params + [self.muon.state[p]["momentum_buffer"] for p in self._params]
        if self.found_inf is not None:
            if self._saved is None:
                self._saved = [t.detach().clone() for t in live]
            else:
                torch._foreach_copy_(self._saved, live)
        self.muon.step()
        if self.found_inf is not None:
            bad = self.found_inf.bool()
            with torch.no_grad():
                for t, saved in zip(live, self._saved):
                    t.copy_(torch.where(bad, saved, t))

    def zero_grad(self, set_to_none=True):
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state):
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])

#################################################################################
#                          The learning-rate schedule                           #
#################################################################################

def lr_decay_start(horizon, C):
    """The step the LR starts to fall: the end of warmup for cosine, the last decay_frac of the run for wsd."""
    return C.warmup if C.lr_schedule == "cosine" else int(horizon * (1 - C.decay_frac))


def lr_at(step, horizon, C):
    """Linear warmup, then constant, cosine (to 0 at `horizon`) or warmup-stable-decay (linear to 0 over the last
    decay_frac)."""
    if step < C.warmup:
        return C.lr * (step + 1) / C.warmup
    if C.lr_schedule == "constant":
        return C.lr
    start = lr_decay_start(horizon, C)
    if step < start:
        return C.lr
    progress = min(1.0, (step - start) / max(1, horizon - start))
    if C.lr_schedule == "cosine":
        return C.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return C.lr * (1 - progress)


def fit_warmup(C, recipe_warmup):
    """A warmup that runs past the step where the LR starts to decay eats the decay. Left at the recipe's value
    (recipe_warmup: a run shorter than it was set for), it becomes a tenth of the run's steps, in C; set otherwise,
    it stays, with a warning (docs/log.md's older rows ran so). -> the note to print, or None. A time budget's
    horizon is planned later: its warmup is left as it is (also used by scripts/ablate.py, on a copy)."""
    decay_from = C.max_steps - 1 if C.lr_schedule == "cosine" else lr_decay_start(C.max_steps, C)
    if C.max_hours > 0 or C.lr_schedule == "constant" or C.warmup <= decay_from:
        return None
    if C.warmup != recipe_warmup:
        return (f"warning: warmup {C.warmup} runs past step {decay_from} of {C.max_steps}, where the LR should be "
                "decaying: the LR will not follow its schedule (lower --warmup)")
    fitted = max(1, C.max_steps // 10)
    note = (f"warmup {C.warmup} does not fit {C.max_steps} steps (the LR decays from step {decay_from}): "
            f"warmup {fitted}, a tenth of the run")
    C.warmup = fitted
    return note


class Horizon:
    """The run's last optimizer step. With max_hours > 0 it is re-planned at log steps from the measured seconds per
    step, so that the LR decay ends on time (under DDP rank 0's plan is the one every rank follows)."""
    def __init__(self, C, steps):
        self.C, self.steps, self.first_log = C, steps, None

    def plan(self, step, elapsed_s):
        """At a log step: re-plan. -> whether the budget is spent."""
        C = self.C
        if C.max_hours <= 0:
            return False
        # seconds per step: the mean since this process's first log step (checkpoint writes and sample grids
        # included, as they recur). The first interval is not used: it holds the compile and, after a resume, may be
        # a few steps long; planning from it would freeze wsd's horizon far too early.
        if self.first_log is None:
            self.first_log = (time.time(), step)
        # wsd freezes the horizon once its decay has begun (moving it would make the LR jump); cosine decays from
        # the end of warmup, so its horizon keeps being corrected (a smooth change)
        elif not (C.lr_schedule == "wsd" and step >= lr_decay_start(self.steps, C)):
            rate = (time.time() - self.first_log[0]) / max(step - self.first_log[1], 1)
            self.steps = max(step, min(C.max_steps, step + int((C.max_hours * 3600 - elapsed_s) / rate)))
        return elapsed_s >= C.max_hours * 3600
