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
paper's two columns). PRECEDENCE (also in --help) is ours, then the fixed exceptions.
"""
import argparse
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from tract.config import DEIT3_MODELS, command_line_keys, find_run_args, parse_args
from tract.errors import ConfigError, run_cli
from tract.safe_files import read_yaml

# DeiT III's finetune recipe (its README's command for ViT-B at 224 px, github.com/facebookresearch/deit,
# README_revenge.md) without what depends on the dataset, the model or the run length: the configs set those (epochs,
# warmup, drop path, batch).
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
# Of those, what the weights' tensors are: a config or command line may not contradict them.
ARCHITECTURE_KEYS = ("model", "model_kwargs", "in_chans", "patch_norm")
PRECEDENCE = """\
Finetune pretrained weights with DeiT III's finetuning recipe: train.py's options, other defaults, and --finetune.

Precedence, highest first:
  1. the command line
  2. a -c YAML config
  3. the pretraining run's args.yaml (when --finetune is a train.py run): its model, --model-kwargs, --in-chans,
     --patch-norm and TrAct settings
  4. DeiT III's finetuning recipe (finetune.py's FINETUNE_DEFAULTS), then train.py's defaults
Two exceptions: TrAct on/off, lambda and layer are the run's unless the command line sets them (a config written for
both of the paper's columns cannot pick one); and a config or command line whose architecture (--model,
--model-kwargs, --in-chans, --patch-norm) is not the run's is refused, naming both. --resume RUN continues a finetune
run as it was started, its own args.yaml the base."""


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


def check_architecture(args: argparse.Namespace, inherited: Dict[str, Any], args_yaml: Path, given: set,
                       config: Optional[str]) -> None:
    """Refuse a config or command line whose architecture is not the one of the weights' run, naming both."""
    for key in ARCHITECTURE_KEYS:
        if key not in inherited:
            continue
        value, theirs = getattr(args, key), inherited[key]
        if key == "model" and DEIT3_MODELS.get(value, value) == DEIT3_MODELS.get(theirs, theirs):
            continue
        if value != theirs:
            flag = "--" + key.replace("_", "-")
            where = ("the command line" if key in given else f"the config {config}") + f" sets {flag} {value}"
            keep = "leave it out" if key in given else f"pass {flag} {theirs} (the command line wins over -c)"
            raise ConfigError(f"{where}, but the weights {args.finetune} are a {flag} {theirs} (their run's "
                              f"{args_yaml}): finetuning needs the weights' own architecture. Finetune a run of "
                              f"{flag} {value} instead, or {keep}")


def parse_finetune_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """train.py's command line with the finetune defaults; a finetune run needs --finetune (or --resume of one)."""
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--finetune", "--resume", "--config"):
        first.add_argument(flag, *(["-c"] if flag == "--config" else []), default=None)
    known, _ = first.parse_known_args(argv)
    source = known.finetune or known.resume  # the pretraining run, or the finetune run being continued
    inherited, args_yaml = run_defaults(source) if source else ({}, None)
    args = parse_args(argv, defaults={**FINETUNE_DEFAULTS, **inherited}, prog="finetune.py", description=PRECEDENCE,
                      require_finetune=not known.resume)
    given = command_line_keys(argv)
    if args_yaml is not None and not known.resume:
        check_architecture(args, inherited, args_yaml, given, known.config)
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


if __name__ == "__main__":  # the command line first: a bad one is told before torch and timm load (well under 1 s)
    ARGS = run_cli(parse_finetune_args, "finetune.py", sys.argv[1:])

# train.py's run, imported once the command line has been read
import train


def main(argv: Optional[Sequence[str]] = None, args: Optional[argparse.Namespace] = None) -> None:
    """Parse with the finetune defaults (or take ``args``), then train.py's run: build, load the weights, train,
    save."""
    train.main(args=args if args is not None else parse_finetune_args(argv))


def cli(argv: Optional[Sequence[str]] = None, args: Optional[argparse.Namespace] = None) -> None:
    """Entry point: user errors end with one message and a non-zero status, not a traceback."""
    run_cli(main, "finetune.py", argv, args=args)


if __name__ == "__main__":
    cli(args=ARGS)
