"""Finetune pretrained weights (DeiT III's 224-px finetune, transfer learning), optionally with TrAct.

    python train.py --output-dir output/train/demo                    # 1. pretrain (the Fashion-MNIST demo)
    python finetune.py --finetune output/train/demo --data-set CIFAR10 --data-path data/cifar10 --download
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision fp16 finetune.py \
        -c configs/deit3_vit_b_ft224.yaml --data-path /path/to/imagenet --finetune output/train/<192-px ViT-B run>

finetune.py is train.py with DeiT III's finetuning recipe as the defaults and ``--finetune WEIGHTS``: the same
options, ``-c`` configs, ``--dry-run``, ``--resume``, ``--eval`` and run-folder layout. WEIGHTS is a train.py run
folder, an Accelerate checkpoint folder, a ``.safetensors`` file or a DeiT / timm ``.pth``/``.bin`` (tract/weights.py).
The weights are adapted to the model: pos_embed and patch embedding resampled for a new input or patch size, a new
head for a new class count (the class count is the dataset's).

When WEIGHTS comes from a train.py run, that run's ``args.yaml`` supplies the model and TrAct settings, so the
finetuned model is the pretrained one and TrAct pretraining is finetuned with TrAct, vanilla pretraining without (the
paper's two columns). Precedence: train.py's defaults < FINETUNE_DEFAULTS < those run settings < ``-c`` YAML <
command line, except that TrAct on/off, lambda and layer are the run's unless the COMMAND LINE says otherwise (a
config cannot flip them; a command line that contradicts the run is named in one line). For weights from elsewhere
(a ``.pth``) the config and flags decide, TrAct off by default. ``--resume RUN`` continues a finetune run as it was
started: its whole ``args.yaml`` is the base, as for train.py.
"""
import argparse
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import train
from tract.config import command_line_keys, find_run_args, parse_args
from tract.errors import ConfigError
from tract.runtime import run_cli
from tract.safe_files import read_yaml

# DeiT III's finetune recipe (README command for ViT-B at 224 px; recipes.md section 4) without what depends on the
# dataset, the model or the run length: the configs set those (epochs, warmup, drop path, batch).
FINETUNE_DEFAULTS: Dict[str, Any] = {
    "opt": "adamw",
    "lr": 1e-5,  # per 512 images: DeiT III's 1e-5 at 8 x 64
    "unscale_lr": False,
    "weight_decay": 0.1,
    "warmup_lr": 1e-6,
    "min_lr": 1e-6,  # ours: DeiT's 1e-5 would sit above the scaled lr of smaller batches, making the cosine rise
    "smoothing": 0.1,
    "mixup": 0.8,
    "cutmix": 1.0,
    "aa": "rand-m9-mstd0.5-inc1",
    "three_augment": False,
    "reprob": 0.0,
    "repeated_aug": False,
    "bce_loss": False,
    "eval_crop_ratio": 1.0,
}
# Taken from the pretraining run: what the weights must fit, and TrAct (the paper finetunes with the pretraining's).
INHERITED = ("model", "model_kwargs", "in_chans", "patch_norm", "tract", "tract_lambda", "tract_layer")
# Of those, the ones only the command line may change: a config written for both columns must not pick one.
TRACT_KEYS = ("tract", "tract_lambda", "tract_layer")


def say(line: str) -> None:
    """Print once per launch (rank 0), before Accelerate exists."""
    if os.environ.get("RANK", "0") == "0":
        print(line)


def run_defaults(path: str) -> Tuple[Dict[str, Any], Optional[Path]]:
    """The INHERITED settings of the train.py / finetune.py run at ``path``, and its args.yaml ({}, None elsewhere)."""
    args_yaml = find_run_args(path)
    if args_yaml is None:
        return {}, None
    run_args = read_yaml(args_yaml, fix=f"it is not the args.yaml train.py writes: restore it, or pass the weights "
                                     f"file itself (--finetune {args_yaml.parent / 'model.safetensors'})") or {}
    if not isinstance(run_args, dict):
        raise ConfigError(f"{args_yaml} is not a mapping of options: pass the weights file itself")
    inherited = {k: run_args[k] for k in INHERITED if k in run_args}
    say(f"finetune.py: defaults from {args_yaml}: " + ", ".join(f"{k}={v}" for k, v in inherited.items()))
    return inherited, args_yaml


def tract_summary(values: Any) -> str:
    """'on, lambda 0.2' / 'off' for a namespace or dict of TrAct settings."""
    get = values.get if isinstance(values, dict) else lambda k, d=None: getattr(values, k, d)
    if not get("tract", False):
        return "off"
    layer = get("tract_layer")
    return f"on, lambda {get('tract_lambda', 0.1)}" + (f", layer {layer}" if layer else "")


def parse_finetune_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """train.py's command line with the finetune defaults; a finetune run needs --finetune (or --resume of one)."""
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    first.add_argument("--finetune", default=None)
    first.add_argument("--resume", default=None)
    known, _ = first.parse_known_args(argv)
    source = known.finetune or known.resume  # the pretraining run, or the finetune run being continued
    inherited, args_yaml = run_defaults(source) if source else ({}, None)
    args = parse_args(argv, defaults={**FINETUNE_DEFAULTS, **inherited}, prog="finetune.py")
    if not (args.finetune or args.resume):
        raise ConfigError("finetune.py needs --finetune WEIGHTS (a train.py run folder, an Accelerate checkpoint "
                          "folder, or a .safetensors / .pth / .bin file), or --resume RUN to continue a finetune run; "
                          "to train from scratch use train.py")
    given = command_line_keys(argv)
    run_tract = {k: inherited[k] for k in TRACT_KEYS if k in inherited}
    for key, value in run_tract.items():
        if key not in given:
            setattr(args, key, value)  # over a -c config too
    if args_yaml is None:
        origin = "the config and command line (the weights are not a train.py run: off unless asked)"
    elif given & set(TRACT_KEYS):
        origin = "the command line"
        if tract_summary(args) != tract_summary(run_tract):
            origin += f", which differs from the run {args_yaml} (TrAct {tract_summary(run_tract)})"
    else:
        origin = f"the run {args_yaml}"
    say(f"finetune.py: TrAct {tract_summary(args)}: from {origin}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse with the finetune defaults, then train.py's run: build, load the weights, train, save."""
    train.main(args=parse_finetune_args(argv))


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point: user errors end with one message and a non-zero status, not a traceback."""
    run_cli(main, "finetune.py", argv)


if __name__ == "__main__":
    cli()
