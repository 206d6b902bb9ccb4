"""Model building: timm.create_model, DeiT III's own model details, and TrAct on the first layer.

DeiT III names its models ``deit_small_patch16_LS`` etc.; timm has the same networks as ``deit3_*`` but initialises
LayerScale at 1e-6, draws the class token from normal(std 1e-6) and ramps stochastic depth linearly over the blocks,
where DeiT III (models_v2.py) uses 1e-4, trunc_normal(std 0.02) and the same rate in every block; and DeiT's main.py
gives every optimizer eps 1e-8 (timm's Lamb: 1e-6). With a DeiT III name all of these are DeiT III's unless
``--layer-scale-init`` / ``--drop-path-schedule`` / ``--opt-eps`` say otherwise; timm's names keep timm's. Everything
else of the model (qkv bias, LayerNorm eps 1e-6, pos_embed trunc_normal(0.02) without a class slot, Linear
trunc_normal(0.02) with zero bias, the patch embedding's default Conv2d init) is the same in both.
"""
import argparse
import difflib
from typing import Callable, Dict, Optional, Tuple

import timm
import torch
from timm.layers import DropPath
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from tract.config import ConfigError

__all__ = ["vit_pico_patch7_28", "vit_pico_convstem_28", "resnet18_cifar", "DEIT3_MODELS", "resolve_model_name",
           "optimizer_eps", "build_model", "set_drop_path", "check_patch_grid", "plain_state_dict", "count_parameters"]

# DeiT III's model names (models_v2.py) -> the same networks in timm.
DEIT3_MODELS = {
    "deit_small_patch16_LS": "deit3_small_patch16_224",
    "deit_medium_patch16_LS": "deit3_medium_patch16_224",
    "deit_base_patch16_LS": "deit3_base_patch16_224",
    "deit_large_patch16_LS": "deit3_large_patch16_224",
    "deit_huge_patch14_LS": "deit3_huge_patch14_224",
}
DEIT3_LAYER_SCALE_INIT = 1e-4  # DeiT III models_v2.py: init_scale=1e-4 (timm's deit3_*: 1e-6)
DEIT3_CLS_TOKEN_STD = 0.02  # DeiT III models_v2.py: trunc_normal_(self.cls_token, std=.02) (timm: normal, std 1e-6)
DEIT_OPT_EPS = 1e-8  # DeiT main.py: --opt-eps default, passed to every optimizer (timm's Lamb: 1e-6)


@register_model
def vit_pico_patch7_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A plain ViT for 28-px images: 4x4 patches of 7 px, width 96, 4 blocks of 3 heads (fast tests, TrAct on a
    patch embedding)."""
    cfg = dict(input_size=(3, 28, 28), first_conv="patch_embed.proj", classifier="head", num_classes=10)
    model_args = dict(img_size=28, patch_size=7, embed_dim=96, depth=4, num_heads=3)
    # A pretrained_cfg comes from timm.create_model("local-dir:RUN", pretrained=True): a train.py run's export.
    return build_model_with_cfg(VisionTransformer, "vit_pico_patch7_28", pretrained,
                                pretrained_cfg=kwargs.pop("pretrained_cfg", None) or cfg, **{**model_args, **kwargs})


@register_model
def vit_pico_convstem_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The demo ViT for 28-px images (Fashion-MNIST): a 3-conv stem to 4x4 tokens, width 96, 4 blocks of 3 heads.

    A patch-embedding ViT this small learns translated (randomly cropped) images slowly; early convolutions fix that
    (Xiao et al., 2021), so the demo reaches a meaningful accuracy in a few CPU minutes. TrAct wraps the stem's first
    3x3 convolution.
    """
    from functools import partial

    from timm.layers import HybridEmbed
    from timm.models.vision_transformer_hybrid import ConvStem

    stem = ConvStem(kwargs.get("in_chans", 3), depth=3, channels=(24, 48, 96), stride=(2, 2, 2))  # 28 -> 4 px
    cfg = dict(input_size=(3, 28, 28), first_conv="patch_embed.backbone.0.conv", classifier="head", num_classes=10)
    model_args = dict(img_size=28, patch_size=1, embed_dim=96, depth=4, num_heads=3,
                      embed_layer=partial(HybridEmbed, backbone=stem))
    return build_model_with_cfg(VisionTransformer, "vit_pico_convstem_28", pretrained,
                                pretrained_cfg=kwargs.pop("pretrained_cfg", None) or cfg, **{**model_args, **kwargs})


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's ResNet-18 with the CIFAR stem (3x3 stride-1 first convolution, no max-pool): the paper's CIFAR-10
    ResNet-18 (its section 4.1; TrAct wraps ``conv1``)."""
    from timm.models import load_pretrained

    cfg = kwargs.pop("pretrained_cfg", None) or {}
    model = timm.create_model("resnet18", **kwargs)
    model.conv1 = nn.Conv2d(model.conv1.in_channels, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # timm's ResNet init
    model.maxpool = nn.Identity()
    model.pretrained_cfg = model.default_cfg = {  # its own, not resnet18's ImageNet weights
        **dict(input_size=(3, 32, 32), first_conv="conv1", classifier="fc", num_classes=10, crop_pct=1.0,
               interpolation="bicubic", mean=model.pretrained_cfg["mean"], std=model.pretrained_cfg["std"]),
        **cfg, "architecture": "resnet18_cifar"}
    if pretrained:  # timm.create_model("local-dir:RUN", pretrained=True): a train.py run's export
        load_pretrained(model, num_classes=model.num_classes, in_chans=kwargs.get("in_chans", 3))
    return model


def resolve_model_name(name: str) -> Tuple[str, bool]:
    """Map a DeiT III name to timm's; say whether it was a DeiT III name (DeiT III's conventions apply)."""
    timm_name = DEIT3_MODELS.get(name, name)
    if not timm.is_model(timm_name):
        choices = list(DEIT3_MODELS) + timm.list_models()
        close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise ConfigError(f"unknown model '{name}'{hint} (timm.list_models('*vit*') lists timm's models)")
    return timm_name, name in DEIT3_MODELS


def optimizer_eps(args: argparse.Namespace) -> Optional[float]:
    """The optimizer epsilon to pass: ``--opt-eps``, else DeiT's 1e-8 for a DeiT III model, else None (timm's)."""
    if args.opt_eps is not None:
        return args.opt_eps
    return DEIT_OPT_EPS if resolve_model_name(args.model)[1] else None


def set_drop_path(model: nn.Module, rate: float) -> int:
    """Give every stochastic-depth slot (timm blocks' ``drop_path*``) the same rate; return how many slots."""
    slots = 0
    for module in model.modules():
        for name, child in list(module.named_children()):
            if name.startswith("drop_path") and isinstance(child, (DropPath, nn.Identity)):
                setattr(module, name, DropPath(rate) if rate > 0 else nn.Identity())
                slots += 1
    return slots


def build_model(args: argparse.Namespace, num_classes: int, *, log: Callable[[str], None] = print
                ) -> Tuple[nn.Module, Optional[str]]:
    """Create the model for ``args`` (``--finetune`` weights, TrAct if asked); return (model, TrAct layer or None)."""
    name, deit3 = resolve_model_name(args.model)
    layer_scale = args.layer_scale_init if args.layer_scale_init is not None else (
        DEIT3_LAYER_SCALE_INIT if deit3 else None)
    schedule = args.drop_path_schedule or ("uniform" if deit3 else "linear")

    kwargs: Dict = dict(num_classes=num_classes, in_chans=args.in_chans, drop_rate=args.drop,
                        drop_path_rate=args.drop_path, img_size=args.input_size)
    if layer_scale is not None:
        kwargs["init_values"] = layer_scale
    kwargs.update(args.model_kwargs)
    try:
        model = timm.create_model(name, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e) or "img_size" in args.model_kwargs:
            raise ConfigError(f"timm.create_model('{name}') refused an argument: {e}; "
                              "check --model-kwargs / --layer-scale-init for this model") from None
        # Convolutional networks take any input size and have no img_size argument.
        del kwargs["img_size"]
        try:
            model = timm.create_model(name, **kwargs)
        except TypeError as e2:
            raise ConfigError(f"timm.create_model('{name}') refused an argument: {e2}; "
                              "check --model-kwargs / --layer-scale-init for this model") from None

    check_patch_grid(model, args.input_size)
    if deit3 and getattr(model, "cls_token", None) is not None:
        # The class token's gradient at timm's 1e-6 init dominates the global norm (6.3 vs 0.5), so LAMB's clip at
        # 1.0 would scale every other gradient down about 6x until the token grows.
        from timm.layers import trunc_normal_

        with torch.no_grad():
            trunc_normal_(model.cls_token, std=DEIT3_CLS_TOKEN_STD)

    if schedule == "uniform" and args.drop_path > 0 and set_drop_path(model, args.drop_path) == 0:
        raise ConfigError(f"model '{name}' has no stochastic-depth slots to set uniformly: "
                          "pass --drop-path-schedule linear")

    if args.finetune and not args.resume:  # a resumed run's checkpoint already holds the trained weights
        from tract.weights import load_pretrained

        load_pretrained(model, args.finetune, log=log)

    layer = None
    if args.tract:
        from tract import apply_tract

        try:
            layer = apply_tract(model, lam=args.tract_lambda, layer=args.tract_layer, sync_gram=args.tract_sync_gram)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ConfigError(f"cannot apply TrAct to '{name}': {e} (name the layer with --tract-layer)") from None
    return model, layer


def check_patch_grid(model: nn.Module, input_size: int) -> None:
    """Refuse an input size that the patch size does not divide: the patch convolution would drop the edge pixels."""
    from timm.layers import PatchEmbed

    embed = getattr(model, "patch_embed", None)
    if not isinstance(embed, PatchEmbed) or getattr(embed, "dynamic_img_pad", False):
        return
    patch = embed.patch_size[0]
    if input_size % patch:
        raise ConfigError(f"--input-size {input_size} is not a multiple of the patch size {patch}: the last "
                          f"{input_size % patch} pixel rows and columns would never be seen; pass --input-size "
                          f"{input_size - input_size % patch} or {input_size - input_size % patch + patch}")


def plain_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's weights on the CPU; TrAct keeps the wrapped layer's Parameters, so the keys are vanilla timm's."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (DeiT's n_parameters)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
