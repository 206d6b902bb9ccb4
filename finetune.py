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
finetuned model is the pretrained one (and, as in the paper, TrAct pretraining is finetuned with TrAct); with
``--resume RUN`` they come from the finetune run itself. Precedence: train.py's defaults < FINETUNE_DEFAULTS < those
run settings < ``-c`` YAML < command line.
"""
import argparse
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import yaml

import train
from tract.config import ConfigError, parse_args, save_args
from tract.runtime import run_cli
from tract.weights import find_run_args

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
INHERITED = ("model", "model_kwargs", "in_chans", "tract", "tract_lambda", "tract_layer")


def run_defaults(path: str) -> Dict[str, Any]:
    """The INHERITED settings of the train.py / finetune.py run at ``path`` ({} for weights from elsewhere)."""
    args_yaml = find_run_args(path)
    if args_yaml is None:
        return {}
    run_args = yaml.safe_load(args_yaml.read_text()) or {}
    inherited = {k: run_args[k] for k in INHERITED if k in run_args}
    if os.environ.get("RANK", "0") == "0":
        print(f"finetune.py: defaults from {args_yaml} (-c and flags override): "
              + ", ".join(f"{k}={v}" for k, v in inherited.items()))
    return inherited


def parse_finetune_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """train.py's command line with the finetune defaults; a finetune run needs --finetune (or --resume of one)."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--finetune", default=None)
    first.add_argument("--resume", default=None)
    known, _ = first.parse_known_args(argv)
    source = known.finetune or known.resume  # the pretraining run, or the finetune run being continued
    defaults = {**FINETUNE_DEFAULTS, **(run_defaults(source) if source else {})}
    args = parse_args(argv, defaults=defaults, prog="finetune.py")
    if not (args.finetune or args.resume):
        raise ConfigError("finetune.py needs --finetune WEIGHTS (a train.py run folder, an Accelerate checkpoint "
                          "folder, or a .safetensors / .pth / .bin file), or --resume RUN to continue a finetune run; "
                          "to train from scratch use train.py")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse with the finetune defaults, then train.py's run: build, load the weights, train, save."""
    args = parse_finetune_args(argv)
    # train.main parses a command line: give it the resolved arguments as a config file, the way -c replays a run.
    run_control = [*(["--resume", args.resume] if args.resume else []), *(["--eval"] if args.eval else []),
                   *(["--dry-run"] if args.dry_run else [])]
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "args.yaml"
        save_args(args, resolved)
        train.main(["-c", str(resolved), *run_control])


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point: user errors end with one message and a non-zero status, not a traceback."""
    run_cli(main, "finetune.py", argv)


if __name__ == "__main__":
    cli()
