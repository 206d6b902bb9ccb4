"""The paper's two ablations as train.py options: the first layer on its own SGD (Fig. 9) and patch normalisation /
DualPatchNorm for timm ViTs (Fig. 7), each against a float64 reference written here, resumed, composed with TrAct."""
import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_train import fresh_accelerate_state, log_lines, tiny_run  # noqa: F401  (an autouse fixture)

import train
from tract.config import parse_args
from tract.engine import SplitOptimizer, build_optimizer, build_scheduler
from tract.errors import ConfigError
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
    saved = torch.load(straight / "checkpoints" / "epoch-0001" / "optimizer.bin", weights_only=True)
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


# ---- Fig. 7: patch normalisation and DualPatchNorm in front of a ViT's patch embedding --------------------------

def patch_rows(x, p):
    """The (B * L, C * p * p) matrix of non-overlapping p x p patches, in a convolution weight's (C, kh, kw) order."""
    return F.unfold(x, p, stride=p).transpose(1, 2).reshape(-1, x.shape[1] * p * p)


def normalised_rows(model, x, mode, p=8):
    """The patches the projection should see, from the definitions: per-patch standardisation or LayerNorm + affine."""
    rows = patch_rows(x, p)
    if mode == "patch":
        return (rows - rows.mean(1, keepdim=True)) / (rows.var(1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    pre = model.patch_embed.pre_norm
    return F.layer_norm(rows, (rows.shape[1],), pre.weight, pre.bias, eps=1e-6)


def patch_norm_vit(mode, *extra):
    torch.manual_seed(0)
    model, layer = build_model(parse_args([*VIT, "--patch-norm", mode, *extra]), num_classes=3)
    model.double()
    with torch.no_grad():  # affine away from 1 / 0, so a missing or misplaced affine shows
        for name, param in model.patch_embed.named_parameters():
            if "norm" in name:
                param.normal_(0.5 if name.endswith("weight") else 0.0, 0.3)
    return model, layer


@pytest.mark.parametrize("mode", ["patch", "dual"])
def test_patch_embedding_output_is_the_projection_of_the_normalised_patches(mode):
    model, _ = patch_norm_vit(mode)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64) * 3 + 1
    x[0, :, :8, :8] = 0.25  # a constant patch: standardised to 0, not NaN
    proj = model.patch_embed.proj
    tokens = normalised_rows(model, x, mode) @ proj.weight.reshape(proj.out_channels, -1).T + proj.bias
    if mode == "dual":
        post = model.patch_embed.norm
        tokens = F.layer_norm(tokens, (tokens.shape[1],), post.weight, post.bias, eps=1e-6)
    assert torch.allclose(model.patch_embed(x), tokens.reshape(2, 16, -1), rtol=1e-10, atol=1e-10)
    assert model(x).shape == (2, 3)
    if mode == "patch":
        assert torch.equal(normalised_rows(model, x, mode)[0], torch.zeros(192, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["patch", "dual"])
def test_tract_wraps_the_projection_and_its_gradient_is_the_closed_form_on_the_normalised_patches(mode):
    model, layer = patch_norm_vit(mode, "--tract", "--tract-lambda", "0.1")
    assert layer == "patch_embed.proj"
    seen = {}

    def keep_output_gradient(module, inputs, out):
        out.register_hook(lambda grad: seen.update(g=grad))

    model.patch_embed.proj.register_forward_hook(keep_output_gradient)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64) * 2 + 0.5
    (model(x) * torch.randn(3, 3, dtype=torch.float64)).sum().backward()
    rows = normalised_rows(model, x, mode).detach()
    grad_z = seen["g"].flatten(2).transpose(1, 2).reshape(-1, 32)  # rows in unfold's order: image, then patch
    b, n = rows.shape
    expected = grad_z.T @ rows @ torch.linalg.inv(rows.T @ rows / b + 0.1 * torch.eye(n, dtype=torch.float64))
    got = model.patch_embed.proj.weight.grad.reshape(32, -1)
    assert torch.allclose(got, expected, rtol=1e-8, atol=1e-12)
    assert not torch.allclose(got, grad_z.T @ rows, rtol=1e-3)  # not the ordinary gradient


@pytest.mark.parametrize("model", ["resnet18_cifar", "vit_pico_convstem_28"])
def test_patch_norm_is_refused_for_a_model_without_a_kernel_equals_stride_patch_embedding(model, tiny_imagefolder,
                                                                                          tmp_path):
    with pytest.raises(ConfigError, match=rf"--patch-norm dual normalises the patches .*'{model}' has .*leave out"):
        build_model(parse_args(["--model", model, "--patch-norm", "dual"]), num_classes=3)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:  # train.py: one message, nothing written
        train.cli([*tiny_run(tiny_imagefolder, out), "--model", model, "--model-kwargs", "--patch-norm", "patch"])
    assert str(e.value.code).startswith("train.py: error: --patch-norm patch normalises the patches")
    assert not out.exists()


@pytest.mark.parametrize("mode, added", [("patch", set()), ("dual", {"patch_embed.pre_norm.weight",
                                                                     "patch_embed.pre_norm.bias",
                                                                     "patch_embed.norm.weight",
                                                                     "patch_embed.norm.bias"})])
def test_run_with_patch_norm_saves_the_norms_weights_and_its_args_rebuild_the_model(tiny_imagefolder, tmp_path,
                                                                                    mode, added):
    import finetune

    out = tmp_path / mode
    train.main(tiny_run(tiny_imagefolder, out, "--patch-norm", mode, "--tract"))
    saved = load_file(out / "model.safetensors")
    plain, _ = build_model(parse_args(VIT), num_classes=3)
    assert set(saved) - set(plain.state_dict()) == added and set(plain.state_dict()) <= set(saved)
    rebuilt, _ = build_model(parse_args(["-c", str(out / "args.yaml")]), num_classes=3)
    rebuilt.load_state_dict(saved, strict=True)
    assert 0 <= log_lines(out)[-1]["test_acc1"] <= 100
    assert finetune.parse_finetune_args(["--finetune", str(out)]).patch_norm == mode  # inherited, as the model is
