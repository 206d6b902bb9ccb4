"""The paper's two ablations as train.py options: the first layer on its own SGD (Fig. 9) and patch normalisation /
DualPatchNorm for timm ViTs (Fig. 7), each against a float64 reference written here, resumed, and composed with TrAct."""
import math
import re

import pytest
import torch
from safetensors.torch import load_file
from test_train import fresh_accelerate_state, log_lines, tiny_run  # noqa: F401  (an autouse fixture)

import train
from tract.checkpoint import _read_pickle
from tract.config import ConfigError, parse_args
from tract.engine import SplitOptimizer, build_optimizer, build_scheduler
from tract.models import build_model

VIT = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=8", "embed_dim=32", "depth=1", "num_heads=2",
       "--input-size", "32"]
SPLIT = ["--first-layer-opt", "sgd", "--first-layer-lr-mult", "10", "--first-layer-momentum", "0.8"]


# ---- Fig. 9: the first layer on SGD with momentum, the rest on --opt ------------------------------------------

def schedule(t, updates=2, epochs=3, base=1e-3, warmup_lr=1e-5, min_lr=1e-4):
    """timm's per-update cosine with one epoch of linear warmup inside it, written out."""
    total, warmup = updates * epochs, updates
    if t < warmup:
        return warmup_lr + t * (base - warmup_lr) / warmup
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / total))


@pytest.mark.parametrize("tract", ["--tract", "--no-tract"])
def test_first_layer_gets_sgd_momentum_at_a_multiple_of_the_scheduled_lr_while_the_rest_gets_adamw(tract):
    args = parse_args([*VIT, *SPLIT, tract, "--opt", "adamw", "--weight-decay", "0.05", "--epochs", "3",
                       "--warmup-epochs", "1", "--warmup-lr", "1e-5", "--min-lr", "1e-4", "--sched-on-updates"])
    torch.manual_seed(0)
    model, _ = build_model(args, num_classes=3)
    optimizer = build_optimizer(args, model, lr=1e-3)
    scheduler = build_scheduler(args, optimizer, updates_per_epoch=2)
    params = dict(model.named_parameters())
    first = ["patch_embed.proj.weight", "patch_embed.proj.bias"]
    other = "blocks.0.mlp.fc1.weight"  # a decayed weight of the rest
    ref = {name: params[name].detach().double().clone() for name in first + [other]}
    buf = {name: torch.zeros_like(ref[name]) for name in first}
    m, v = torch.zeros_like(ref[other]), torch.zeros_like(ref[other])
    gen = torch.Generator().manual_seed(1)
    for t in range(4):  # two warmup updates, two cosine ones
        scheduler.step_update(t)
        lr = schedule(t)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12)
        assert optimizer.param_groups[-1]["lr"] == pytest.approx(10 * lr, rel=1e-12)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        grads = {name: params[name].grad.double() for name in first + [other]}
        optimizer.step()
        for name in first:  # SGD, momentum 0.8, no weight decay: buf = 0.8 buf + g (g at the first step), w -= lr buf
            buf[name] = grads[name] if t == 0 else 0.8 * buf[name] + grads[name]
            ref[name] -= 10 * lr * buf[name]
        g, b1, b2, eps, wd = grads[other], 0.9, 0.999, 1e-8, 0.05  # AdamW with decoupled weight decay
        ref[other] *= 1 - lr * wd
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        ref[other] -= lr * (m / (1 - b1 ** (t + 1))) / ((v / (1 - b2 ** (t + 1))).sqrt() + eps)
        for name, expected in ref.items():
            assert torch.allclose(params[name].double(), expected, rtol=0, atol=2e-7), (name, t)


def test_the_split_holds_every_parameter_once_and_saves_as_one_torch_optimizer_state():
    args = parse_args([*VIT, *SPLIT, "--tract"])
    model, layer = build_model(args, num_classes=3)
    optimizer = build_optimizer(args, model, lr=1e-3)
    assert isinstance(optimizer, SplitOptimizer) and layer == "patch_embed.proj"
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(held) == len(set(map(id, held))) == len(list(model.parameters()))
    sgd_params = optimizer.optimizers[1].param_groups[0]["params"]
    assert {id(p) for p in sgd_params} == {id(model.patch_embed.proj.weight), id(model.patch_embed.proj.bias)}
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    # torch's numbering: 0..n-1 over the groups in order; the SGD group last, with its momentum buffers
    assert [i for g in state["param_groups"] for i in g["params"]] == list(range(len(held)))
    assert set(state["state"][len(held) - 1]) == {"momentum_buffer"}
    assert set(state["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    fresh = build_optimizer(args, model, lr=1e-3)
    fresh.load_state_dict(state)
    assert fresh.param_groups[-1] is fresh.optimizers[1].param_groups[0]  # a scheduler still reaches the SGD group
    assert torch.equal(fresh.state[model.patch_embed.proj.weight]["momentum_buffer"],
                       optimizer.state[model.patch_embed.proj.weight]["momentum_buffer"])
    single = build_optimizer(parse_args([*VIT, "--tract"]), model, lr=1e-3).state_dict()  # saved without the split
    with pytest.raises(ValueError, match="another --first-layer-opt"):
        fresh.load_state_dict(single)


def test_split_run_resumes_bitwise_and_trains_the_first_layer_otherwise_than_one_optimizer(tiny_imagefolder,
                                                                                           tmp_path):
    recipe = ["--epochs", "2", "--warmup-epochs", "1", "--sched-on-updates", "--tract", "--checkpoint-hist", "2"]
    straight, resumed, single = tmp_path / "straight", tmp_path / "resumed", tmp_path / "single"
    train.main(tiny_run(tiny_imagefolder, straight, *recipe, *SPLIT))
    train.main(tiny_run(tiny_imagefolder, resumed, *recipe, *SPLIT, "--resume",
                        str(straight / "checkpoints" / "epoch-0001")))
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = _read_pickle(straight / "checkpoints" / "epoch-0001" / "optimizer.bin")
    assert saved["param_groups"][-1]["lr_scale"] == 10 and saved["param_groups"][-1]["momentum"] == 0.8
    train.main(tiny_run(tiny_imagefolder, single, *recipe))
    c = load_file(single / "model.safetensors")
    assert not torch.equal(a["patch_embed.proj.weight"], c["patch_embed.proj.weight"])
    assert parse_args(["-c", str(straight / "args.yaml")]).first_layer_lr_mult == 10  # the run replays with it


def test_dry_run_names_the_first_layers_optimizer(tiny_imagefolder, tmp_path, capsys):
    train.main(tiny_run(tiny_imagefolder, tmp_path / "a", *SPLIT, "--dry-run"))
    train.main(tiny_run(tiny_imagefolder, tmp_path / "b", "--dry-run"))
    lines = re.findall(r"^  first-layer optimizer: (.*)$", capsys.readouterr().out, flags=re.M)
    assert lines == ["SGD for patch_embed.proj, momentum 0.8, lr 10 x the rest's on the same schedule, weight decay "
                     "0; the rest AdamW", "with the rest (--first-layer-opt same)"]


@pytest.mark.parametrize("extra, message", [
    (["--first-layer-opt", "sgd", "--first-layer-lr-mult", "0"], "--first-layer-lr-mult must be > 0"),
    (["--first-layer-opt", "sgd", "--first-layer-momentum", "1"], "--first-layer-momentum must be in [0, 1)"),
    (["--first-layer-lr-mult", "10"], "add --first-layer-opt sgd"),
])
def test_bad_first_layer_options_are_refused(extra, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(extra)
