"""optim.py: Muon + AdamW against torch's own optimizers, a non-finite step that changes nothing, the warmup that
fits the run."""
import copy
from types import SimpleNamespace

import torch

import optim
import train
from model import DiT, make_config
from run_utils import args, load, log_records, tensors_equal


def muon_setup(seed=0):
    torch.manual_seed(seed)
    model = DiT(make_config("DiT-S/2", depth=2, width=64, heads=4, in_channels=3, input_size=8, text_dim=32,
                            pooled_dim=32, text_len=4))
    return model, optim.configure_optimizer(model, 1e-3, 0.1, (0.9, 0.999), "muon", 0.02)


def set_grads(model, seed, poison=False):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    if poison:
        optim.muon_params(model)[0].grad[0, 0] = float("nan")
        model.final_layer.linear.bias.grad[0] = float("inf")


def test_muon_split_and_one_step_equal_torch_optimizers():
    """Muon gets exactly the blocks' attention/MLP weight matrices; a step of MuonAdamW (found_inf 0) equals
    torch.optim.Muon + fused AdamW stepped on their own over the same split."""
    model, opt = muon_setup()
    muon_ids = {id(p) for p in optim.muon_params(model)}
    names = [n for n, p in model.named_parameters() if id(p) in muon_ids]
    assert names and all(n.startswith("blocks.") and n.endswith("weight") and "adaLN" not in n for n in names)
    assert {n.split(".", 2)[2] for n in names} == {"attn.qkv.weight", "attn.proj.weight", "cross_attn.q.weight",
                                                   "cross_attn.kv.weight", "cross_attn.proj.weight", "mlp.0.weight",
                                                   "mlp.2.weight"}
    ref, _ = muon_setup()
    rest = [p for p in ref.parameters() if id(p) not in {id(q) for q in optim.muon_params(ref)}]
    ref_muon = torch.optim.Muon(optim.muon_params(ref), lr=0.02, weight_decay=0.1, adjust_lr_fn="original")
    ref_adamw = torch.optim.AdamW([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}], lr=1e-3)
    for step in range(2):
        set_grads(model, step)
        set_grads(ref, step)
        opt.found_inf = torch.zeros(())
        opt.step()
        ref_muon.step()
        ref_adamw.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_muon_non_finite_step_changes_nothing():
    """found_inf = 1 with a NaN gradient: weights, Muon's momentum and AdamW's state and step count stay bitwise."""
    model, opt = muon_setup()
    set_grads(model, 0)
    opt.found_inf = torch.zeros(())
    opt.step()
    before = ({k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(opt.state_dict()))
    set_grads(model, 1, poison=True)
    opt.found_inf = torch.ones(())
    opt.step()
    assert tensors_equal(model.state_dict(), before[0])
    assert tensors_equal(opt.state_dict(), before[1])
    set_grads(model, 1)  # and the next good step moves them again
    opt.found_inf = torch.zeros(())
    opt.step()
    assert not tensors_equal(opt.state_dict()["muon"]["state"], before[1]["muon"]["state"])


def test_a_warmup_that_does_not_fit_becomes_a_tenth_of_the_run(cache, tmp_path, capsys):
    """A warmup that fits is left alone; the recipe's 2,000 steps in a run too short for them (they would run past the
    decay's start) become a tenth of the run, said once, and the LR then follows its schedule; a warmup set to
    another value that does not fit stays, with a warning (older commands rerun as they ran)."""
    train.main(args(cache, tmp_path / "a", lr_schedule="cosine", warmup=3, max_steps=6))
    train.main(args(cache, tmp_path / "b", lr_schedule="wsd", warmup=3, max_steps=6, decay_frac=0.5))
    assert "warmup" not in capsys.readouterr().out
    train.main(args(cache, tmp_path / "w", lr_schedule="wsd", warmup=5, max_steps=6, decay_frac=0.5))
    assert "warning: warmup 5 runs past step 3 of 6" in capsys.readouterr().out
    assert load(tmp_path / "w" / "ckpt.pt")["config"]["warmup"] == 5
    train.main(args(cache, tmp_path / "c", lr_schedule="wsd", warmup=2000, max_steps=40, decay_frac=0.5,
               log_every=1))
    assert "warmup 2000 does not fit 40 steps (the LR decays from step 20): warmup 4" in capsys.readouterr().out
    lrs = [r["lr"] for r in log_records(tmp_path / "c")]
    C = SimpleNamespace(lr=1e-3, warmup=4, lr_schedule="wsd", decay_frac=0.5)
    assert lrs == [optim.lr_at(step, 40, C) for step in range(40)] and max(lrs) == 1e-3
    assert load(tmp_path / "c" / "ckpt.pt")["config"]["warmup"] == 4
