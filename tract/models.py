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

from tract.config import DEIT3_MODELS
from tract.errors import ConfigError
from tract.method import apply_tract
from tract.weights import load_pretrained

__all__ = ["vit_pico_patch7_28", "vit_cifar_patch4_32", "vit_pico_convstem_28", "resnet18_cifar", "DEIT3_MODELS",
           "PatchNorm", "add_patch_norm", "resolve_model_name", "optimizer_eps", "build_model",
           "set_drop_path", "check_patch_grid", "plain_state_dict", "count_parameters", "build_ema"]

DEIT3_LAYER_SCALE_INIT = 1e-4  # DeiT III models_v2.py: init_scale=1e-4 (timm's deit3_*: 1e-6)
DEIT3_CLS_TOKEN_STD = 0.02  # DeiT III models_v2.py: trunc_normal_(self.cls_token, std=.02) (timm: normal, std 1e-6)
DEIT_OPT_EPS = 1e-8  # DeiT main.py: --opt-eps default, passed to every optimizer (timm's Lamb: 1e-6)
PATCH_NORM_EPS = 1e-6  # timm's ViT LayerNorm eps; a constant patch (a black background) becomes 0, not NaN


class PatchNorm(nn.LayerNorm):
    """LayerNorm over each non-overlapping patch of an image (its C x p x p values, flattened in the order of a
    convolution's weight), returning the image in its shape: what a kernel == stride patch embedding then sees.

    Without affine (``elementwise_affine=False``) every patch is standardised to mean 0 and std 1 on its own.
    """

    def __init__(self, in_chans: int, patch_size: Tuple[int, int], *, elementwise_affine: bool = True,
                 eps: float = PATCH_NORM_EPS):
        super().__init__(in_chans * patch_size[0] * patch_size[1], eps=eps, elementwise_affine=elementwise_affine)
        self.patch_size = tuple(patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        ph, pw = self.patch_size
        patches = x.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)  # B, rows, cols, C, ph, pw
        normed = super().forward(patches.reshape(*patches.shape[:3], -1)).reshape(patches.shape)
        return normed.permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def _normalise_patches(embed: nn.Module, args: Tuple) -> Tuple:
    """Forward pre-hook of a patch embedding: its input image, patch-normalised, is what its projection sees."""
    return (embed.pre_norm(args[0]), *args[1:])


def add_patch_norm(model: nn.Module, mode: str, *, name: str = "the model") -> None:
    """Put patch normalisation (``patch``) or DualPatchNorm (``dual``) around a timm ViT's patch embedding.

    The norm in front is ``patch_embed.pre_norm``, run by a forward pre-hook of ``patch_embed``, so
    ``patch_embed.proj`` (the layer TrAct wraps) sees the normalised patches; DualPatchNorm's second LayerNorm goes
    in timm's own slot after the projection, ``patch_embed.norm``. Only ``dual`` adds weights (both norms' affine).
    """
    from timm.layers import PatchEmbed

    embed = getattr(model, "patch_embed", None)
    proj = getattr(embed, "proj", None)
    fits = (isinstance(embed, PatchEmbed) and type(proj) is nn.Conv2d and proj.kernel_size == proj.stride
            and proj.padding == (0, 0) and proj.dilation == (1, 1) and proj.groups == 1
            and not getattr(embed, "dynamic_img_pad", False))
    if not fits:
        found = (f"patch_embed.proj = {proj}" if proj is not None else
                 f"patch_embed = {type(embed).__name__}" if embed is not None else "no patch_embed")
        raise ConfigError(f"--patch-norm {mode} normalises the patches of a ViT whose patch embedding is one "
                          f"convolution with kernel == stride (timm's PatchEmbed: vit_*, deit3_*); {name} has {found}: "
                          "leave out --patch-norm (or pass --patch-norm none)")
    embed.pre_norm = PatchNorm(proj.in_channels, proj.kernel_size, elementwise_affine=mode == "dual")
    embed.register_forward_pre_hook(_normalise_patches)
    if mode == "dual":
        embed.norm = nn.LayerNorm(proj.out_channels, eps=PATCH_NORM_EPS)


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
def vit_cifar_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The paper's CIFAR ViT (its section 4.1, after github.com/omihub777/ViT-CIFAR): 32-px images in 8x8 patches of
    4 px (64 tokens and a class token), width 384, 7 blocks of 12 heads, MLP hidden 384 (ViT-CIFAR's), no dropout."""
    if pretrained:
        raise ValueError("vit_cifar_patch4_32 has no pretrained weights")
    kwargs.pop("pretrained_cfg", None)
    cfg = dict(input_size=(3, 32, 32), first_conv="patch_embed.proj", classifier="head", num_classes=10)
    model_args = dict(img_size=32, patch_size=4, embed_dim=384, depth=7, num_heads=12, mlp_ratio=1.0)
    return build_model_with_cfg(VisionTransformer, "vit_cifar_patch4_32", pretrained, pretrained_cfg=cfg,
                                **{**model_args, **kwargs})


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
    if args.patch_norm != "none":  # before any weights load: a --patch-norm run's weights hold the norms' keys
        add_patch_norm(model, args.patch_norm, name=f"'{name}'")
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
        load_pretrained(model, args.finetune, log=log)

    layer = None
    if args.tract:
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


def build_ema(args: argparse.Namespace, model: nn.Module, device: torch.device):
    """timm's ModelEmaV3 of ``model`` for --model-ema (None without it); ``model`` is moved to ``device`` first."""
    if not args.model_ema:
        return None
    from timm.utils import ModelEmaV3

    # The model on its device first: an EMA built from a model on another device has foreach updates off
    model.to(device)
    return ModelEmaV3(model, decay=args.model_ema_decay, device="cpu" if args.model_ema_force_cpu else None)


def plain_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's weights on the CPU; TrAct keeps the wrapped layer's Parameters, so the keys are vanilla timm's."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (DeiT's n_parameters)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
