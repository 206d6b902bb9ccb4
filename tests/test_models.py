"""DeiT III's model and optimizer details for DeiT III names (models_v2.py, main.py); timm's names keep timm's."""
from pathlib import Path

import pytest
import torch
import yaml
from timm.optim import Lamb

from tract.config import parse_args
from tract.engine import build_optimizer
from tract.models import build_model

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SMALL = ["--model-kwargs", "depth=1", "--input-size", "224"]


def built(*argv):
    args = parse_args([*argv, *SMALL])
    model, _ = build_model(args, num_classes=10)
    return args, model


@pytest.mark.parametrize("model, expected", [("deit_small_patch16_LS", 1e-8), ("deit3_small_patch16_224", 1e-6)])
def test_lamb_gets_deits_epsilon_for_deit3_names_and_timms_for_timm_names(model, expected):
    # DeiT's main.py: --opt-eps 1e-8 for every optimizer; timm's Lamb defaults to 1e-6.
    args, net = built("--model", model, "--opt", "fusedlamb")
    optimizer = build_optimizer(args, net, lr=4e-3)
    assert isinstance(optimizer, Lamb)
    assert {group["eps"] for group in optimizer.param_groups} == {expected}


def test_opt_eps_on_the_command_line_wins_for_deit3_names():
    args, net = built("--model", "deit_small_patch16_LS", "--opt", "lamb", "--opt-eps", "1e-6")
    assert {g["eps"] for g in build_optimizer(args, net, lr=4e-3).param_groups} == {1e-6}


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name.startswith(("deit3_",
                                                                                                      "transfer_"))))
def test_every_deit_recipe_config_gives_its_optimizer_deits_epsilon(config):
    assert yaml.safe_load((CONFIGS / config).read_text())["opt_eps"] == 1e-8
    assert parse_args(["-c", str(CONFIGS / config)]).opt_eps == 1e-8


def test_deit3_class_token_is_drawn_with_std_0_02_and_timms_with_1e_6():
    torch.manual_seed(0)
    _, deit3 = built("--model", "deit_small_patch16_LS")
    _, timm_named = built("--model", "deit3_small_patch16_224")
    # 384 draws of trunc_normal(0, 0.02) on [-2, 2] (nothing truncated at this std): sample std within ~5 sigma.
    assert deit3.cls_token.std().item() == pytest.approx(0.02, abs=0.0036)
    assert timm_named.cls_token.std().item() < 1e-5
    # The rest of models_v2.py's init is timm's too: pos_embed trunc_normal(0.02), LayerScale 1e-4 (DeiT III's).
    assert deit3.pos_embed.std().item() == pytest.approx(0.02, abs=0.002)
    assert torch.all(deit3.blocks[0].ls1.gamma == 1e-4)


def test_deit3_model_details_are_models_v2s():
    _, net = built("--model", "deit_small_patch16_LS")
    block = net.blocks[0]
    assert block.attn.qkv.bias is not None  # qkv_bias=True
    assert net.norm.eps == block.norm1.eps == 1e-6  # partial(nn.LayerNorm, eps=1e-6)
    assert net.pos_embed.shape == (1, 196, 384)  # no class slot in pos_embed
    assert torch.all(net.head.bias == 0)


@pytest.mark.parametrize("config", ["deit3_vit_s_400ep.yaml", "deit3_vit_s_800ep.yaml", "deit3_vit_b_400ep_192.yaml"])
def test_dry_run_of_each_pretraining_config_prints_lamb_with_deits_epsilon(config, tmp_path, capsys):
    import train

    # Fashion-MNIST stands in for ImageNet (as in test_train.py); one block is enough to build the optimizer.
    train.main(["-c", str(CONFIGS / config), "--data-set", "FMNIST", "--model-kwargs", "depth=1", "--num-workers", "0",
                "--output-dir", str(tmp_path / "never"), "--dry-run"])
    assert "  optimizer: Lamb, eps 1e-08\n" in capsys.readouterr().out
