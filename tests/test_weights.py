"""tract.weights: every weights format loads, and adaptation (prefixes, LayerScale names, resampling, head) is right."""
import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from tract.config import find_run_args
from tract.errors import WeightsError
from tract.weights import adapt_state_dict, load_pretrained, load_state_dict

WIDTH = 24


def tiny_vit(img_size: int = 32, num_classes: int = 10, patch_size: int = 4, name: str = "deit3_small_patch16_224",
             **kwargs) -> nn.Module:
    """A 2-block ViT small enough for CPU tests; deit3 keeps no class slot in pos_embed, vit_* does."""
    return timm.create_model(name, img_size=img_size, patch_size=patch_size, embed_dim=WIDTH, depth=2, num_heads=2,
                             num_classes=num_classes, **kwargs)


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights made distinct from a fresh init, so a test can tell loaded values from initial ones."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(model: nn.Module, expected: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    got = model.state_dict()
    for k, v in expected.items():
        if not k.startswith(skip):
            assert torch.equal(got[k], v), k


def bicubic_grid(tokens: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """Reference: (1, old*old, D) tokens resized to (1, new*new, D) by plain float64 bicubic, as DeiT finetunes."""
    grid = tokens.double().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)


# ---- resolution change ---------------------------------------------------------------------------------------------

def test_pos_embed_without_class_slot_is_resampled_bicubic_from_8x8_to_12x12_grid():
    src = trained_state(tiny_vit(img_size=32))
    model = tiny_vit(img_size=48)
    logs = []
    out = adapt_state_dict(src, model, log=logs.append)
    assert out["pos_embed"].shape == (1, 144, WIDTH)
    torch.testing.assert_close(out["pos_embed"].double(), bicubic_grid(src["pos_embed"], 8, 12), atol=1e-5, rtol=1e-5)
    assert torch.equal(out["cls_token"], src["cls_token"])
    assert any("pos_embed" in line and "resampled" in line for line in logs)


def test_pos_embed_with_class_slot_keeps_the_class_token_and_resamples_the_grid():
    src = trained_state(tiny_vit(img_size=32, name="vit_tiny_patch16_224"))
    out = adapt_state_dict(src, tiny_vit(img_size=48, name="vit_tiny_patch16_224"), log=lambda _: None)
    assert out["pos_embed"].shape == (1, 1 + 144, WIDTH)
    assert torch.equal(out["pos_embed"][:, :1], src["pos_embed"][:, :1])
    torch.testing.assert_close(out["pos_embed"][:, 1:].double(), bicubic_grid(src["pos_embed"][:, 1:], 8, 12),
                               atol=1e-5, rtol=1e-5)


def test_resampling_at_equal_size_is_the_exact_identity():
    src = trained_state(tiny_vit(img_size=32))
    logs = []
    out = adapt_state_dict(src, tiny_vit(img_size=32), log=logs.append)
    assert all(torch.equal(out[k], v) for k, v in src.items())
    assert not any("resampled" in line for line in logs)


def test_patch_embedding_resampled_to_a_larger_patch_gives_the_same_token_for_the_resized_patch():
    src = trained_state(tiny_vit(img_size=32, patch_size=4))
    out = adapt_state_dict(src, tiny_vit(img_size=64, patch_size=8), log=lambda _: None)
    w_old, w_new = src["patch_embed.proj.weight"], out["patch_embed.proj.weight"]
    assert w_new.shape == (WIDTH, 3, 8, 8)
    patch = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    big = F.interpolate(patch, size=(8, 8), mode="bicubic", align_corners=False)
    torch.testing.assert_close(torch.einsum("bchw,ochw->bo", big, w_new.double()),
                               torch.einsum("bchw,ochw->bo", patch, w_old.double()), atol=1e-3, rtol=1e-3)
    assert out["pos_embed"].shape == src["pos_embed"].shape  # same 8x8 grid


# ---- head ----------------------------------------------------------------------------------------------------------

def test_head_is_replaced_and_logged_when_class_count_differs_and_everything_else_is_loaded(tmp_path):
    src = trained_state(tiny_vit(num_classes=10))
    save_file(src, tmp_path / "w.safetensors")
    model = tiny_vit(num_classes=7)
    fresh_head = {k: v.clone() for k, v in model.head.state_dict().items()}
    logs = []
    load_pretrained(model, tmp_path / "w.safetensors", log=logs.append)
    assert_same_weights(model, src, skip=("head.",))
    assert torch.equal(model.head.weight, fresh_head["weight"]) and torch.equal(model.head.bias, fresh_head["bias"])
    assert model.head.weight.shape == (7, WIDTH)
    assert any("classifier head" in line and "(10, 24)" in line and "(7, 24)" in line for line in logs)


def test_head_is_kept_when_class_count_matches(tmp_path):
    src = trained_state(tiny_vit(num_classes=10))
    save_file(src, tmp_path / "w.safetensors")
    model = tiny_vit(num_classes=10)
    logs = []
    load_pretrained(model, tmp_path / "w.safetensors", log=logs.append)
    assert_same_weights(model, src)
    assert not any("classifier head" in line for line in logs)


# ---- formats -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """One trained tiny ViT written in every supported format; returns (state_dict, {format: path})."""
    root = tmp_path_factory.mktemp("formats")
    model = tiny_vit()
    state = trained_state(model)
    ema = {k: v + 1 for k, v in state.items()}
    args = argparse.Namespace(model="deit3_small_patch16_224", lr=1e-5, output_dir="out")
    paths = {"train.py output folder": root / "run", "safetensors file": root / "w.safetensors",
             "DeiT checkpoint .pth": root / "deit.pth", "timm training checkpoint": root / "timm.pth.tar",
             "plain state_dict .pth": root / "plain.pth", "Hub pytorch_model.bin": root / "pytorch_model.bin"}
    paths["train.py output folder"].mkdir()
    save_file(state, paths["train.py output folder"] / "model.safetensors")
    save_file(state, paths["safetensors file"])
    torch.save({"model": state, "model_ema": ema, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5}]},
                "epoch": 3, "args": args}, paths["DeiT checkpoint .pth"])
    torch.save({"state_dict": state, "state_dict_ema": ema, "arch": "deit3_small_patch16_224", "epoch": 3,
                "args": args}, paths["timm training checkpoint"])
    torch.save(state, paths["plain state_dict .pth"])
    torch.save(state, paths["Hub pytorch_model.bin"])
    # Accelerate's own save_state, in a child process so its process-wide state stays out of this test session.
    torch.save(state, root / "state.pth")
    script = textwrap.dedent(f"""
        import timm, torch
        from accelerate import Accelerator
        acc = Accelerator(cpu=True)
        model = timm.create_model("deit3_small_patch16_224", img_size=32, patch_size=4, embed_dim={WIDTH}, depth=2,
                                  num_heads=2, num_classes=10)
        model.load_state_dict(torch.load({str(root / 'state.pth')!r}))
        opt = torch.optim.AdamW(model.parameters())
        model, opt = acc.prepare(model, opt)
        acc.save_state({str(root / 'accelerate_safe')!r})
        acc.save_state({str(root / 'accelerate_bin')!r}, safe_serialization=False)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    paths["Accelerate checkpoint folder"] = root / "accelerate_safe"
    paths["Accelerate checkpoint folder, safe_serialization=False"] = root / "accelerate_bin"
    assert (root / "accelerate_bin" / "pytorch_model.bin").is_file()
    return state, paths


FORMATS = ["train.py output folder", "safetensors file", "DeiT checkpoint .pth", "timm training checkpoint",
           "plain state_dict .pth", "Hub pytorch_model.bin", "Accelerate checkpoint folder",
           "Accelerate checkpoint folder, safe_serialization=False"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_weights_format_loads_the_model_weights_exactly(source, fmt):
    state, paths = source
    model = tiny_vit()
    load_pretrained(model, paths[fmt], log=lambda _: None)
    assert_same_weights(model, state)  # for checkpoints: the model, not its EMA copy


def test_deit3_layerscale_gamma_names_are_mapped_to_timm_names(tmp_path):
    state = trained_state(tiny_vit())
    deit3 = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v for k, v in state.items()}
    assert "blocks.1.gamma_2" in deit3
    torch.save({"model": deit3}, tmp_path / "deit3.pth")
    model = tiny_vit()
    logs = []
    load_pretrained(model, tmp_path / "deit3.pth", log=logs.append)
    assert_same_weights(model, state)
    assert any("gamma_1" in line for line in logs)


def test_ddp_and_torch_compile_key_prefixes_are_stripped(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    state = trained_state(model)
    ddp_keys = nn.DataParallel(model).state_dict()
    compiled_keys = torch.compile(model).state_dict()
    assert next(iter(ddp_keys)).startswith("module.") and next(iter(compiled_keys)).startswith("_orig_mod.")
    for name, sd in (("ddp", ddp_keys), ("compiled", compiled_keys)):
        torch.save(sd, tmp_path / f"{name}.pth")
        fresh = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        load_pretrained(fresh, tmp_path / f"{name}.pth", log=lambda _: None)
        assert_same_weights(fresh, state)


# ---- refusals ------------------------------------------------------------------------------------------------------

class _CreatesFileWhenUnpickled:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


class _Config:
    """A custom class: unpickling it imports and builds arbitrary user code."""


@pytest.mark.parametrize("payload", ["file-creating object", "function", "custom class instance"])
def test_pickle_holding_code_is_refused_and_never_executed(tmp_path, payload):
    marker = tmp_path / "pwned"
    obj = {"file-creating object": _CreatesFileWhenUnpickled(marker), "function": os.system,
           "custom class instance": _Config()}[payload]
    torch.save({"model": trained_state(tiny_vit()), "extra": obj}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="refusing to load") as err:
        load_pretrained(tiny_vit(), tmp_path / "bad.pth", log=lambda _: None)
    assert not marker.exists()
    expected = {"file-creating object": "io.open", "function": "system", "custom class instance": "_Config"}[payload]
    assert expected in str(err.value)


def test_unexpected_missing_and_mismatched_keys_are_listed_in_one_error(tmp_path):
    state = trained_state(tiny_vit())
    state["blocks.0.extra.weight"] = torch.zeros(3)
    del state["norm.bias"]
    state["blocks.1.mlp.fc1.bias"] = torch.zeros(7)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(WeightsError) as err:
        load_pretrained(tiny_vit(), tmp_path / "w.pth", log=lambda _: None)
    msg = str(err.value)
    assert "unexpected keys (1): blocks.0.extra.weight" in msg
    assert "missing keys (1): norm.bias" in msg
    assert "mismatched keys (1): blocks.1.mlp.fc1.bias: weights (7,) vs model (96,)" in msg


def test_a_model_of_another_width_is_a_clear_error_not_a_partial_load(tmp_path):
    save_file(trained_state(tiny_vit()), tmp_path / "w.safetensors")
    model = timm.create_model("deit3_small_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=2,
                              num_heads=2, num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError, match="mismatched keys"):
        load_pretrained(model, tmp_path / "w.safetensors", log=lambda _: None)
    assert_same_weights(model, before)


def test_folder_without_weights_names_what_it_expected_and_found(tmp_path):
    (tmp_path / "args.yaml").write_text("lr: 1\n")
    with pytest.raises(WeightsError, match=r"model\.safetensors.*found args\.yaml"):
        load_state_dict(tmp_path)


def test_unfinished_run_folder_points_at_its_newest_checkpoint(tmp_path):
    (tmp_path / "args.yaml").write_text("lr: 1\n")
    (tmp_path / "checkpoints" / "epoch-0001").mkdir(parents=True)
    with pytest.raises(WeightsError, match=r"not finished: pass its newest checkpoint, .*checkpoints/last"):
        load_state_dict(tmp_path)


def test_run_args_are_found_from_the_run_folder_its_weights_and_its_checkpoints(tmp_path):
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "epoch-0002"
    ckpt.mkdir(parents=True)
    (run / "args.yaml").write_text("model: x\n")
    (run / "model.safetensors").write_bytes(b"")
    (ckpt / "model.safetensors").write_bytes(b"")
    (run / "checkpoints" / "last").symlink_to("epoch-0002")
    for weights in (run, run / "model.safetensors", run / "checkpoints", ckpt, ckpt / "model.safetensors",
                    run / "checkpoints" / "last"):
        assert find_run_args(weights) == (run / "args.yaml").resolve(), weights
    (tmp_path / "w.pth").write_bytes(b"")
    assert find_run_args(tmp_path / "w.pth") is None


def test_missing_path_and_non_weights_files_are_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_state_dict(tmp_path / "nope.pth")
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        load_state_dict(tmp_path / "notes.pth")
    torch.save({"model": {"lr": 0.1}}, tmp_path / "numbers.pth")
    with pytest.raises(WeightsError, match=r"non-tensor entries: lr \(float\)"):
        load_state_dict(tmp_path / "numbers.pth")
