"""The one command line of train.py and finetune.py: argument parser, YAML configs, validation.

Precedence is timm's: parser default < ``-c/--config`` YAML < command line. YAML keys are the argument dest names
(``lr``, ``batch_size``, ``three_augment``, ...); unlike timm, an unknown key is an error that names the closest valid
one. DeiT's ``main.py`` flag names are accepted (``--ThreeAugment``, ``--output_dir``, ``--bce-loss``, ...), new options
are kebab-case, and every boolean can be turned both ways (``--tract``/``--no-tract``).

The parser defaults are a quick Fashion-MNIST demo (``python train.py`` alone trains a small ViT in minutes); options
that DeiT III's README command does not set keep DeiT's defaults, so that command runs as DeiT would run it. The paper
runs are the YAML files in ``configs/``.
"""
import argparse
import difflib
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import yaml

from tract.errors import ConfigError, first_process_on_machine
from tract.global_batch import batch_layout, launched_processes, reachable_layouts
from tract.safe_files import read_yaml, refuse_special, write_atomic

__all__ = ["DATASETS", "DEIT3_MODELS", "FIRST_LAYER_OPTIMIZERS", "PATCH_NORMS", "get_args_parser",
           "parse_args", "command_line_keys", "validate_args", "load_config", "save_args", "find_run_args",
           "parse_model_kwargs", "RESUME_FREE", "TIMM_SOURCE_KWARGS", "check_resume_changes", "inactive_tract_options",
           "apply_global_batch"]

# --data-set: the datasets tract/data.py reads (DeiT's names, and FOLDER for any ImageFolder layout).
DATASETS: Tuple[str, ...] = ("IMNET", "CIFAR10", "CIFAR100", "FMNIST", "FLOWERS", "CARS", "FOLDER")
# DeiT III's model names (models_v2.py), which --model takes too -> the same networks in timm.
DEIT3_MODELS = {
    "deit_small_patch16_LS": "deit3_small_patch16_224",
    "deit_medium_patch16_LS": "deit3_medium_patch16_224",
    "deit_base_patch16_LS": "deit3_base_patch16_224",
    "deit_large_patch16_LS": "deit3_large_patch16_224",
    "deit_huge_patch14_LS": "deit3_huge_patch14_224",
}
# --first-layer-opt: "same" = the first layer on --opt with the rest; "sgd" = on its own SGD with momentum (Fig. 9).
FIRST_LAYER_OPTIMIZERS = ("same", "sgd")
# --patch-norm (Fig. 7): none; "patch" = every input patch standardised on its own; "dual" = DualPatchNorm (Kumar et
# al. 2023), LayerNorm with affine over each flattened patch before the patch embedding and after it.
PATCH_NORMS = ("none", "patch", "dual")
# What a resume may change without --resume-override: where the run writes, how fast and how often it reports or
# checkpoints, not what it computes. (--epochs too: extending a run on purpose is common; the note says that the
# schedule then stretches.) Everything else is refused, so that --resume RUN continues the run as it was started.
RESUME_FREE = ("output_dir", "epochs", "num_workers", "pin_mem", "prefetcher", "persistent_workers", "prefetch_factor",
               "progress", "log_interval", "sync_interval", "val_interval", "checkpoint_hist",
               "checkpoint_interval_updates", "dist_timeout", "download", "torchcompile", "torchcompile_mode",
               "channels_last", "tf32", "cudnn_benchmark", "model_ema_eval")
# timm.create_model's arguments that make it read a file or the network (timm/models/_factory.py): taken from the
# command line only, never from a file a person other than the one typing the command may have written.
TIMM_SOURCE_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")
# Flags that steer this invocation only: never written to args.yaml, never taken from it.
RUN_CONTROL = ("config", "resume", "resume_inexact", "resume_override", "rewind", "eval", "dry_run", "output",
               "experiment")
# timm's and DeiT's flags that have no same-meaning spelling here: an unrecognized one is answered with ours.
OTHER_SPELLINGS = {
    "--pretrained": "--finetune WEIGHTS (timm's --pretrained downloads the hub weights of --model; nothing is "
                    "downloaded here: pass the weights file, e.g. a model.safetensors from huggingface.co/timm/MODEL)",
    "--clip-mode": "--clip-grad NORM (gradient norm clipping, timm's --clip-mode norm; value and agc are not offered)",
    "--dataset": "--data-set (DeiT's names: IMNET, CIFAR10, ... or FOLDER)", "-d": "--data-set",
    "--interpolation": "--train-interpolation (used for evaluation too)",
    "--lr-base": "--lr (DeiT's rule: the lr per 512 images, scaled by global batch / 512)",
    "--lr-base-size": "--lr (per 512 images, DeiT's rule)",
    "--recovery-interval": "--checkpoint-interval-updates N",
    "--validation-batch-size": "nothing: evaluation batches are 1.5 x --batch-size (DeiT's)",
    "--device": "the launcher (accelerate launch, --cpu); see docs/launch.md",
    "--local-rank": "nothing: accelerate launch starts the processes",
    "--local_rank": "nothing: accelerate launch starts the processes",
    "--log-wandb": "nothing: TensorBoard events are in the run folder (tensorboard --logdir OUTPUT)",
    "--sync-bn": "nothing: the models here have no BatchNorm to synchronise, except ResNets (timm's BatchNorm, "
                 "per process)",
}
DESCRIPTION = ("Train a timm image model with DeiT III's recipe (timm + Accelerate), with TrAct on its first layer. "
               "Precedence: the defaults < -c YAML < the command line; a run's args.yaml is the base of --resume.")
LAUNCH_HINT = "launching is Accelerate's job: see docs/launch.md (accelerate launch / launch/)"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and the description's line breaks kept (finetune.py's precedence list)."""


class _Parser(argparse.ArgumentParser):
    """argparse without abbreviations, a bad command line told in two lines (the closest flag for a typo, not the
    usage), once per machine instead of once per process of a launch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)  # --epoch must not silently mean --epochs

    def error(self, message: str):
        if not first_process_on_machine():
            self.exit(2)
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            flags = [a for a in message[len(prefix):].split() if a.startswith("-")]
            known = [o for o in self._option_string_actions if o.startswith("--")]
            parts = []
            for flag in flags:
                name = flag.split("=", 1)[0]
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                parts.append(flag + (f" (here: {OTHER_SPELLINGS[name]})" if name in OTHER_SPELLINGS else
                                     f" (did you mean {close[0]}?)" if close else ""))
            message = prefix + (", ".join(parts) or message[len(prefix):])
        self.exit(2, f"{self.prog}: error: {message}\n{self.prog}: python {self.prog} --help lists every option\n")


def parse_model_kwargs(items: Sequence[str], flag: str = "--model-kwargs") -> Dict[str, Any]:
    """Turn ``k=v`` strings into a dict, values read as Python literals (``4``, ``1e-4``, ``True``, ``'avg'``)."""
    import ast

    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigError(f"{flag} expects key=value pairs, got {item!r} (e.g. {flag} name=4)")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value  # a bare word such as global_pool=avg is meant as a string
    return kwargs


class _ModelKwargs(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, parse_model_kwargs(values, option_string))
        except ConfigError as e:
            parser.error(str(e))


class _InputSize(argparse.Action):
    """``--input-size 224`` or timm's ``--input-size 3 224 224`` (channels, height, width: also sets --in-chans)."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            sizes = [int(v) for v in values]
        except ValueError:
            parser.error(f"{option_string} takes whole numbers: SIZE, or C H W as timm's, got {' '.join(values)}")
        if len(sizes) == 3 and sizes[1] == sizes[2]:
            namespace.in_chans, sizes = sizes[0], sizes[1:2]
        if len(sizes) != 1:
            parser.error(f"{option_string} takes SIZE or C H W with H = W (square images), got {' '.join(values)}")
        setattr(namespace, self.dest, sizes[0])


class _Precision(argparse.Action):
    """timm's ``--amp`` (fp16 autocast with a grad scaler) and ``--amp-dtype`` as --mixed-precision."""

    DTYPES = {"float16": "fp16", "bfloat16": "bf16"}

    def __init__(self, option_strings, dest, **kwargs):
        takes_dtype = "--amp-dtype" in option_strings
        super().__init__(option_strings, dest, nargs=None if takes_dtype else 0, default=argparse.SUPPRESS,
                         choices=tuple(self.DTYPES) if takes_dtype else None,
                         help="timm's spelling of --mixed-precision " + ("fp16 / bf16" if takes_dtype else "fp16"))

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.DTYPES[values] if values else "fp16")


class _Refused(argparse.Action):
    """A DeiT option whose job belongs to the launcher here: refuse it with a pointer instead of ignoring it."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is DeiT's submitit/torch.distributed option; {LAUNCH_HINT}")


def get_args_parser(defaults: Optional[Dict[str, Any]] = None, prog: Optional[str] = None, *,
                    description: str = DESCRIPTION, require_finetune: bool = False) -> argparse.ArgumentParser:
    """Build the full parser; ``defaults`` (e.g. finetune.py's) replace the parser defaults before any YAML;
    ``description`` heads --help; ``require_finetune``: --finetune is required (finetune.py)."""
    p = _Parser(prog=prog, description=description, formatter_class=_HelpFormatter)
    bool_flag = argparse.BooleanOptionalAction
    p.add_argument("-c", "--config", default=None, metavar="FILE", help="YAML of argument values (dest names)")

    g = p.add_argument_group("dataset")
    g.add_argument("--data-set", "--data_set", dest="data_set", default=None, choices=DATASETS,
                   help="dataset; None = FOLDER when --data-path is given (an ImageFolder, read as DeiT reads IMNET), "
                        "else Fashion-MNIST (the demo)")
    g.add_argument("--data-path", "--data_path", "--data-dir", dest="data_path", default=None,
                   help="dataset root (FMNIST: None = Debian's /usr/share/datasets/fashion-mnist)")
    g.add_argument("--download", action=bool_flag, default=False, help="download the dataset if missing")
    g.add_argument("--train-split", default="train", metavar="NAME",
                   help="IMNET / FOLDER: the training images' folder under --data-path (timm's flag)")
    g.add_argument("--val-split", default="val", metavar="NAME",
                   help="IMNET / FOLDER: the evaluation images' folder under --data-path (timm's flag)")
    g.add_argument("--in-chans", type=int, default=3, help="input channels (grayscale is repeated to 3 unless 1)")
    g.add_argument("--mean", type=float, nargs="+", default=None,
                   help="normalisation mean per input channel, as timm's; None = ImageNet's (--mean 0 --std 1: [0, 1])")
    g.add_argument("--std", type=float, nargs="+", default=None,
                   help="normalisation std per input channel; None = ImageNet's (--std 0.00392156862745098: [0, 255])")
    g.add_argument("--num-workers", "--num_workers", "--workers", "-j", dest="num_workers", type=int, default=None,
                   help="data loader workers per process; None = min(10, CPUs per process)")
    g.add_argument("--pin-mem", "--pin_mem", dest="pin_mem", action=bool_flag, default=True,
                   help="pin host memory of batches (faster host-to-GPU copies)")
    g.add_argument("--prefetcher", action=bool_flag, default=None,
                   help="timm's PrefetchLoader for training: workers hand over uint8, the next batch is copied on a "
                        "side stream and normalised (random erasing too) on the device; None = on with CUDA, off on "
                        "the CPU (measured slower there: docs/library.md, Speed)")
    g.add_argument("--persistent-workers", action=bool_flag, default=True,
                   help="keep the loader workers alive between epochs (with --num-workers > 0)")
    g.add_argument("--prefetch-factor", type=int, default=None,
                   help="batches each loader worker prepares ahead; None = torch's 2")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit_pico_convstem_28",
                   help="timm model name, or DeiT III's deit_small_patch16_LS / deit_base_patch16_LS")
    g.add_argument("--model-kwargs", nargs="*", default={}, action=_ModelKwargs, metavar="K=V",
                   help="extra timm.create_model keyword arguments, values as Python literals")
    g.add_argument("--input-size", "--img-size", dest="input_size", nargs="+", action=_InputSize, default=28,
                   metavar="SIZE", help="image size (the model is built for it); timm's C H W also works")
    g.add_argument("--num-classes", "--nb-classes", "--nb_classes", dest="num_classes", type=int, default=None,
                   help="the classes the head predicts; None = the dataset's, which any value given must equal")
    g.add_argument("--drop", type=float, default=0.0, help="dropout rate")
    g.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")
    g.add_argument("--drop-path-schedule", default=None, choices=("uniform", "linear"),
                   help="stochastic depth per block: the same rate in every block (DeiT III) or timm's linear "
                        "ramp; None = uniform for DeiT III models, linear otherwise")
    g.add_argument("--layer-scale-init", type=float, default=None,
                   help="LayerScale init value; None = 1e-4 for DeiT III models, the timm model's own otherwise")
    g.add_argument("--patch-norm", default="none", choices=PATCH_NORMS,
                   help="ViTs with a kernel == stride patch embedding (the paper's Fig. 7): 'patch' standardises every "
                        "input patch on its own, 'dual' is DualPatchNorm (LayerNorm before and after the patch "
                        "embedding); TrAct sees the normalised patches. A model trained with it needs it to load")
    g.add_argument("--finetune", "--initial-checkpoint", "--pretrained-path", dest="finetune", default=None,
                   metavar="WEIGHTS", required=require_finetune,
                   help="start from these weights, adapted to the model: a train.py run folder (its args.yaml then "
                        "gives the model and TrAct), a checkpoint folder, a .safetensors or a DeiT / timm .pth / .bin"
                        + ("; required, unless --resume continues a finetune run" if require_finetune else
                           " (finetune.py: the same with DeiT III's finetuning recipe)"))
    g.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model (TrAct included) with this backend (timm's flag; alone: inductor)")
    g.add_argument("--torchcompile-mode", default=None, metavar="MODE",
                   help="torch.compile mode, e.g. max-autotune; None = torch's default")
    g.add_argument("--channels-last", action=bool_flag, default=False,
                   help="model and batches in channels-last memory format (timm's flag; for conv layers on GPUs)")

    g = p.add_argument_group("TrAct")
    g.add_argument("--tract", action=bool_flag, default=False, help="train the first layer with TrAct")
    g.add_argument("--tract-lambda", type=float, default=0.1, help="TrAct's lambda (0.1; 0.2 for long runs)")
    g.add_argument("--tract-layer", default=None, metavar="NAME",
                   help="dotted name of the layer to wrap; None = the model's first layer")
    g.add_argument("--tract-sync-gram", action=bool_flag, default=False,
                   help="all-reduce the Gram matrix across processes (the synchronised variant)")

    g = p.add_argument_group("optimizer")
    g.add_argument("--opt", default="adamw", help="timm optimizer name; DeiT's fusedlamb means timm's lamb")
    g.add_argument("--opt-eps", type=float, default=None,
                   help="optimizer epsilon; None = DeiT's 1e-8 for DeiT III models, the optimizer's otherwise")
    g.add_argument("--opt-betas", type=float, nargs="+", default=None, help="optimizer betas; None = the optimizer's")
    g.add_argument("--opt-kwargs", nargs="*", default={}, action=_ModelKwargs, metavar="K=V",
                   help="extra optimizer keyword arguments, values as Python literals (e.g. fused=True)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=0.05, help="weight decay (none on 1-D params)")
    g.add_argument("--clip-grad", type=float, default=None, help="clip the global gradient norm; None = off")
    g.add_argument("--lr", type=float, default=4e-3,
                   help="learning rate at a global batch of 512 (scaled by global batch / 512 unless --unscale-lr)")
    g.add_argument("--unscale-lr", action=bool_flag, default=False, help="use --lr as is, without batch scaling")
    # --batch: DeiT III's README command spells it so (argparse's abbreviation there; explicit here, as none are taken)
    g.add_argument("--batch-size", "--batch", "-b", dest="batch_size", type=int, default=128,
                   help="batch size per process")
    g.add_argument("--accum-steps", "--grad-accum-steps", dest="accum_steps", type=int, default=1,
                   help="micro-batches accumulated per optimizer update (derived when --global-batch is set)")
    g.add_argument("--global-batch", type=int, default=None, metavar="N",
                   help="images per optimizer update over all processes, kept on any launch: --batch-size is then the "
                        "most per process, and the per-process batch and --accum-steps are derived from the processes "
                        "launched (a process count that cannot reach N is refused); None or 0 = --batch-size x "
                        "processes x --accum-steps")
    g.add_argument("--first-layer-opt", default="same", choices=FIRST_LAYER_OPTIMIZERS,
                   help="the first layer (the one --tract wraps, with or without --tract) on --opt with the rest, or "
                        "on its own SGD with momentum while the rest keeps --opt (the paper's Fig. 9)")
    g.add_argument("--first-layer-lr-mult", type=float, default=1.0,
                   help="with --first-layer-opt sgd: the first layer's lr over the rest's, at every update of the "
                        "same schedule (warmup, decay)")
    g.add_argument("--first-layer-momentum", type=float, default=0.9,
                   help="with --first-layer-opt sgd: its momentum (the paper: SGD with momentum; 0.9 as its SGD runs)")
    g.add_argument("--first-layer-weight-decay", type=float, default=0.0,
                   help="with --first-layer-opt sgd: its L2 weight decay (the paper gives none; 0 leaves the layer's "
                        "update TrAct's alone)")

    g = p.add_argument_group("learning-rate schedule")
    g.add_argument("--sched", default="cosine", choices=("cosine", "tanh", "step", "multistep", "poly", "constant"),
                   help="timm scheduler")
    g.add_argument("--epochs", type=int, default=3, help="epochs to train")
    g.add_argument("--warmup-epochs", type=int, default=0, help="epochs of linear warmup from --warmup-lr")
    g.add_argument("--warmup-lr", type=float, default=1e-6, help="lr at the start of warmup")
    g.add_argument("--min-lr", type=float, default=1e-5, help="lr floor of the schedule")
    g.add_argument("--decay-epochs", type=float, default=30, help="epochs between decays (step schedule)")
    g.add_argument("--decay-milestones", type=int, nargs="+", default=None, metavar="EPOCH",
                   help="multistep schedule: the lr is multiplied by --decay-rate after each of these many epochs "
                        "(torch's MultiStepLR meaning: 60 120 160 = 60 epochs at --lr, 60 at the next, ...)")
    g.add_argument("--decay-rate", type=float, default=0.1, help="lr decay factor (step and multistep schedules)")
    g.add_argument("--sched-on-updates", action=bool_flag, default=False,
                   help="step the lr every optimizer update instead of once per epoch (DeiT: per epoch)")

    g = p.add_argument_group("augmentation")
    g.add_argument("--ThreeAugment", "--three-augment", dest="three_augment", action=bool_flag, default=False,
                   help="DeiT III's 3-Augment replaces the whole train transform")
    g.add_argument("--src", action=bool_flag, default=None,
                   help="simple random crop (resize, pad-4 random crop, flip) instead of RandomResizedCrop; "
                        "None = on at 32 px or less (DeiT's rule for small images), off above")
    g.add_argument("--color-jitter", type=float, default=0.0, help="color jitter strength (DeiT: 0.3)")
    g.add_argument("--aa", default=None, help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1; None = off")
    g.add_argument("--train-interpolation", default="bicubic",
                   choices=("bicubic", "bilinear", "nearest", "box", "hamming", "lanczos", "random"),
                   help="resize interpolation")
    g.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    g.add_argument("--remode", default="pixel", choices=("pixel", "rand", "const"), help="random erasing mode")
    g.add_argument("--recount", type=int, default=1, help="random erasing count")
    g.add_argument("--repeated-aug", action=bool_flag, default=False,
                   help="repeated augmentation x3 (multi-process runs only)")
    g.add_argument("--eval-crop-ratio", "--crop-pct", dest="eval_crop_ratio", type=float, default=1.0,
                   help="eval: resize to size/ratio, center crop")

    g = p.add_argument_group("mixup, cutmix and loss")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha; 0 = off")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha; 0 = off")
    g.add_argument("--cutmix-minmax", type=float, nargs=2, default=None, help="cutmix min/max area ratio")
    g.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix when both are on")
    g.add_argument("--mixup-mode", default="batch", choices=("batch", "pair", "elem"), help="how to mix")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--bce-loss", action=bool_flag, default=False,
                   help="binary cross-entropy on binarised (target > 0) mixup targets (DeiT III)")

    g = p.add_argument_group("EMA")
    g.add_argument("--model-ema", action=bool_flag, default=False, help="keep an EMA of the weights (saved)")
    g.add_argument("--model-ema-decay", type=float, default=0.99996, help="EMA decay per update")
    g.add_argument("--model-ema-force-cpu", action=bool_flag, default=False, help="keep the EMA on the CPU")
    g.add_argument("--model-ema-eval", action=bool_flag, default=False, help="also evaluate the EMA every epoch")

    g = p.add_argument_group("run")
    g.add_argument("--output-dir", "--output_dir", dest="output_dir", default=None,
                   help="run folder; None = OUTPUT/train/EXPERIMENT (timm's naming; OUTPUT/finetune/EXPERIMENT with "
                        "--finetune)")
    g.add_argument("--output", default=None, metavar="OUTPUT",
                   help="timm's: the folder that holds the runs when --output-dir is not given; None = output")
    g.add_argument("--experiment", default=None, metavar="EXPERIMENT",
                   help="timm's: the run's folder name when --output-dir is not given; None = <time>-<model>-<size>")
    g.add_argument("--resume", default=None, metavar="PATH",
                   help="a run folder (the checkpoint its `last` points to) or a checkpoint")
    g.add_argument("--resume-override", action=bool_flag, default=False,
                   help="let --resume change options that change what the run computes (lr, model, TrAct, data, ...)")
    g.add_argument("--rewind", action=bool_flag, default=False,
                   help="with --resume of an earlier checkpoint of the same run: move its later checkpoints and log "
                        "aside (into OUTPUT/rewound-<time>/) and continue from that checkpoint")
    g.add_argument("--resume-inexact", action=bool_flag, default=False,
                   help="resume even without the random state that makes the run exact (another number of processes)")
    g.add_argument("--eval", action=bool_flag, default=False, help="only evaluate (--resume or --finetune weights)")
    g.add_argument("--dry-run", action=bool_flag, default=False,
                   help="resolve and print everything, then exit without training or writing")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--mixed-precision", default=None, choices=("no", "fp16", "bf16"),
                   help="None = the launcher's setting (accelerate config / launch flag)")
    g.add_argument("--amp", dest="mixed_precision", action=_Precision)
    g.add_argument("--amp-dtype", dest="mixed_precision", action=_Precision)
    g.add_argument("--dist-timeout", type=float, default=60.0, help="process-group timeout in minutes")
    g.add_argument("--tf32", action=bool_flag, default=True,
                   help="on CUDA, float32 matmuls and convolutions in TF32 (as timm's train.py)")
    g.add_argument("--cudnn-benchmark", action=bool_flag, default=True,
                   help="on CUDA, let cuDNN pick the fastest convolution algorithms (as timm's train.py)")
    g.add_argument("--sync-interval", type=int, default=20,
                   help="optimizer updates between the loop's host syncs: loss check, progress bar and the "
                        "processes' agreement on a preemption signal")
    g.add_argument("--val-interval", type=int, default=1, help="evaluate every N epochs, and after the last")
    g.add_argument("--checkpoint-interval-updates", type=int, default=None, metavar="N",
                   help="also checkpoint every N optimizer updates inside an epoch (as preemption does); None = off")
    g.add_argument("--progress", action=bool_flag, default=True,
                   help="progress inside an epoch: a tqdm bar on a terminal, a line every --log-interval updates "
                        "elsewhere (SLURM, nohup, tee)")
    g.add_argument("--log-interval", type=int, default=50,
                   help="optimizer updates between progress lines when stderr is not a terminal (timm's flag)")
    g.add_argument("--checkpoint-hist", type=int, default=1, help="newest epoch checkpoints kept besides best")
    g.add_argument("--max-updates-per-epoch", type=int, default=None,
                   help="cap optimizer updates per epoch (smoke tests of a setup); the schedule follows the cap")
    for flag in ("--nodes", "--ngpus", "--world_size", "--dist_url", "--dist-url"):
        p.add_argument(flag, action=_Refused)

    if defaults:
        unknown = set(defaults) - {a.dest for a in p._actions}
        if unknown:
            raise ConfigError(f"unknown default(s) {sorted(unknown)}")
        p.set_defaults(**defaults)
    return p


def _dests(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in ("help", "config") and a.default != argparse.SUPPRESS}


def load_config(path: str, parser: Optional[argparse.ArgumentParser] = None, *, fix: Optional[str] = None,
                follow: bool = True) -> Dict[str, Any]:
    """Read a YAML config and check it against the parser: unknown keys and bad values are ConfigErrors. ``fix``
    ends the message of a file that cannot be read; ``follow=False`` refuses a link (a run folder's own file)."""
    parser = parser or get_args_parser()
    # bounded (size, nesting, YAML aliases expanded): a config, or a run's args.yaml, cannot exhaust memory
    fix = fix or "fix or replace the file (python train.py --help lists the keys)"
    cfg = read_yaml(Path(path), follow=follow, fix=fix) or {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"config {path} must be a mapping of argument names to values")
    actions = _dests(parser)
    out = {}
    for key, value in cfg.items():
        key = str(key).replace("-", "_")
        if key not in actions:
            close = difflib.get_close_matches(key, list(actions), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"config {path}: unknown key '{key}'{hint}")
        out[key] = _coerce(actions[key], value, f"config {path}: key '{key}'")
    return out


def _coerce(action: argparse.Action, value: Any, where: str) -> Any:
    """Give a YAML value the type the command line would give it (YAML reads 4e-3 as a string, for one)."""
    if value is None:
        numeric = action.type in (int, float) or isinstance(action, (argparse.BooleanOptionalAction, _InputSize))
        if numeric and action.default is not None:  # null means "off" only where the option has an off state
            raise ConfigError(f"{where} needs a value (leave the key out for the default, {action.default!r})")
        return None
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(action, _InputSize):
        if type(value) is not int:
            raise ConfigError(f"{where} must be one whole number (the square image size; set in_chans for channels), "
                              f"got {value!r}")
        return value
    if isinstance(action, _ModelKwargs):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, e.g. {{patch_size: 4}}")
        return value
    convert = action.type or (lambda v: v)
    single = action.nargs is None or action.nargs == "?"
    if single and isinstance(value, (list, dict)):
        raise ConfigError(f"{where} takes one value, got {value!r}")
    if action.type in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if action.type is int and isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(f"{where} must be a whole number, got {value!r}")
        value = int(value)
    try:
        if action.nargs in ("+", "*") or isinstance(action.nargs, int):
            value = [convert(v) if isinstance(v, str) else v for v in (value if isinstance(value, list) else [value])]
        elif isinstance(value, str) and action.type is not None:
            value = convert(value)
        elif action.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} has a bad value {value!r}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where} must be one of {list(action.choices)}, got {value!r}")
    return value


def parse_args(argv: Optional[Sequence[str]] = None, defaults: Optional[Dict[str, Any]] = None,
               prog: Optional[str] = None, *, description: str = DESCRIPTION,
               require_finetune: bool = False) -> argparse.Namespace:
    """Parse the command line: defaults, then the ``--resume`` run's args.yaml, then ``-c`` YAML, then the remaining
    flags; then validate. A resume that changes what the run computes is refused unless ``--resume-override``."""
    parser = get_args_parser(defaults, prog=prog, description=description, require_finetune=require_finetune)
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    first.add_argument("-c", "--config", default=None)
    first.add_argument("--resume", default=None)
    known, _ = first.parse_known_args(argv)
    for flag, value in (("-c", known.config), ("--resume", known.resume)):
        if value:
            refuse_special(Path(value).expanduser(), flag)  # before anything opens it: a FIFO would hang the open
    run_args = find_run_args(known.resume) if known.resume and Path(known.resume).expanduser().is_dir() else None
    saved = {}
    if run_args is not None:  # the run continues as it was started: its own arguments are the base
        fix = (f"it is not the args.yaml train.py writes. Restore it, or delete it and rerun the command with "
               f"--resume {run_args.parent} (the command line then gives the run's options)")
        saved = {k: v for k, v in load_config(str(run_args), parser, fix=fix, follow=False).items()
                 if k not in RUN_CONTROL}
        parser.set_defaults(**saved)
    if known.config:
        parser.set_defaults(**load_config(known.config, parser))
    args = parser.parse_args(argv)
    for flag, value in (("--finetune", args.finetune), ("--data-path", args.data_path)):
        if value:
            refuse_special(Path(value).expanduser(), flag)
    validate_args(args)
    _check_model_sources(args, argv, known.config or run_args)
    apply_global_batch(args, launched_processes(), accum_given="accum_steps" in command_line_keys(argv))
    if saved:
        check_resume_changes(args, saved, run_args, prog=parser.prog)
    return args


def find_run_args(path: str | Path) -> Optional[Path]:
    """The args.yaml of the train.py run a path belongs to (run folder, its weights, checkpoints/, a checkpoint)."""
    path = Path(path).resolve()  # checkpoints/last is a symlink to checkpoints/epoch-NNNN
    folder = path if path.is_dir() else path.parent
    candidates = [folder] + [parent.parent for parent in (folder, folder.parent) if parent.name == "checkpoints"]
    return next((c / "args.yaml" for c in candidates if (c / "args.yaml").is_file()), None)


def check_resume_changes(args: argparse.Namespace, saved: Dict[str, Any], run_args: Path,
                         prog: str = "train.py") -> None:
    """Name every option that differs from the run's ``args.yaml`` in one line; refuse those that change what the run
    computes (anything outside RESUME_FREE) unless ``--resume-override``."""
    changed = {k: (saved[k], v) for k, v in sorted(vars(args).items())
               if k in saved and v != saved[k] and k not in RUN_CONTROL}
    if not changed:
        return
    run = run_args.parent

    def flag(key: str) -> str:
        return "--" + key.replace("_", "-")

    refused = {k: c for k, c in changed.items() if k not in RESUME_FREE and k != "output_dir"}
    if refused and not args.resume_override:
        raise ConfigError(f"--resume {args.resume}: " + ", ".join(f"{flag(k)} {new!r} (the run: {old!r})"
                                                                  for k, (old, new) in refused.items()) +
                          " would change what the run computes. Leave them out to continue the run as it was "
                          f"started (python {prog} --resume {run}), or add --resume-override to change them anyway "
                          "(the result is then no longer the uninterrupted run's)")
    notes = [f"{flag(k)} {old!r} -> {new!r}" for k, (old, new) in changed.items() if k != "output_dir"]
    if "epochs" in changed:
        notes[list(k for k in changed if k != "output_dir").index("epochs")] += (
            " (the lr schedule is stretched to the new length from here on)")
    if notes and os.environ.get("RANK", "0") == "0":
        print(f"note: resuming {run} with its args.yaml, changed: {'; '.join(notes)}" +
              (" (--resume-override: no longer the uninterrupted run)" if refused else ""))


def apply_global_batch(args: argparse.Namespace, processes: int, accum_given: bool = False) -> None:
    """With ``--global-batch N``: set ``batch_size`` and ``accum_steps`` to the layout that reaches N exactly on
    ``processes`` (tract/global_batch.py); a layout that cannot, or a command-line ``--accum-steps`` that contradicts
    it, is refused with the layouts that can."""
    if not args.global_batch:
        return
    n = args.global_batch
    layout = batch_layout(n, args.batch_size, processes)
    if layout is None:
        layouts = "; ".join(reachable_layouts(n, args.batch_size, processes))
        raise ConfigError(f"--global-batch {n} cannot be split evenly over the {processes} processes launched: "
                          f"launch a process count that divides it ({layouts}), "
                          f"or pass --global-batch with a multiple of {processes} (e.g. "
                          f"{n - n % processes or processes} or {n - n % processes + processes}), or --global-batch 0 "
                          "to use --batch-size x processes x --accum-steps")
    batch, steps = layout
    if accum_given and steps != args.accum_steps:
        raise ConfigError(f"--accum-steps {args.accum_steps} contradicts --global-batch {n}: over {processes} "
                          f"process(es) it takes {batch} per process x {steps} step(s). Leave --accum-steps out (it is "
                          "derived), lower --batch-size to accumulate more, or pass --global-batch 0 to set it "
                          "yourself")
    if batch < args.batch_size and first_process_on_machine():
        print(f"note: --global-batch {n} over {processes} process(es): {batch} images per process x {steps} step(s) "
              f"(--batch-size {args.batch_size} is the most per process)")
    args.batch_size, args.accum_steps = batch, steps


def _command_line_values(argv: Optional[Sequence[str]]) -> Dict[str, Any]:
    """The values the command line itself sets (not defaults, not a ``-c`` config)."""
    parser = get_args_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given, _ = parser.parse_known_args(argv)
    return {k: v for k, v in vars(given).items() if k != "config"}


def command_line_keys(argv: Optional[Sequence[str]]) -> set:
    """The argument names the command line itself sets (not defaults, not a ``-c`` config)."""
    return set(_command_line_values(argv))


def _check_model_sources(args: argparse.Namespace, argv: Optional[Sequence[str]], source: Any) -> None:
    """Refuse model_kwargs that make timm read a file or the network (TIMM_SOURCE_KWARGS) unless the command line
    gives them: a config, a run's args.yaml or finetune.py's pretraining run may not."""
    typed = _command_line_values(argv).get("model_kwargs", {})
    foreign = [k for k in TIMM_SOURCE_KWARGS
               if args.model_kwargs.get(k) not in (None, False, "", {}) and k not in typed]
    if foreign:
        where = source or "the args.yaml of the run whose weights are finetuned"
        them = "it" if len(foreign) == 1 else "them"
        raise ConfigError(f"model_kwargs {', '.join(f'{k}={args.model_kwargs[k]!r}' for k in foreign)} (from {where}) "
                          f"would make timm read a file or the network, which a file may not ask for. Remove {them} "
                          f"from {where}, or give {them} on the command line (--model-kwargs "
                          f"{' '.join(f'{k}=...' for k in foreign)})")


def validate_args(args: argparse.Namespace) -> None:
    """Reject values that cannot work, before anything is built or written; each message says the fix."""
    positive = {"batch_size": "--batch-size", "epochs": "--epochs", "accum_steps": "--accum-steps",
                "input_size": "--input-size", "in_chans": "--in-chans", "dist_timeout": "--dist-timeout",
                "checkpoint_hist": "--checkpoint-hist", "sync_interval": "--sync-interval",
                "log_interval": "--log-interval",
                "val_interval": "--val-interval"}
    for key, flag in positive.items():
        if not getattr(args, key) > 0:
            raise ConfigError(f"{flag} must be > 0, got {getattr(args, key)}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise ConfigError(f"--lr must be > 0, got {args.lr}")
    for key in ("mean", "std"):
        values = getattr(args, key)
        if values is not None and (len(values) != args.in_chans or not all(map(math.isfinite, values))):
            raise ConfigError(f"--{key} needs {args.in_chans} finite value(s), one per --in-chans channel, "
                              f"got {values}")
    if args.std is not None and min(args.std) <= 0:
        raise ConfigError(f"--std must be > 0, got {args.std}")
    non_negative = {"weight_decay": "--weight-decay", "warmup_epochs": "--warmup-epochs",
                    "warmup_lr": "--warmup-lr", "min_lr": "--min-lr", "drop": "--drop", "drop_path": "--drop-path",
                    "mixup": "--mixup", "cutmix": "--cutmix", "smoothing": "--smoothing", "reprob": "--reprob",
                    "color_jitter": "--color-jitter", "seed": "--seed"}
    for key, flag in non_negative.items():
        value = getattr(args, key)
        if not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"{flag} must be >= 0, got {value}")
    if not (args.tract_lambda > 0 and math.isfinite(args.tract_lambda)):
        raise ConfigError(f"--tract-lambda must be > 0 (the paper uses 0.1; 0.2 for long runs), "
                          f"got {args.tract_lambda}")
    for key in ("drop", "drop_path", "reprob", "mixup_prob", "mixup_switch_prob"):
        if not 0 <= getattr(args, key) <= 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be in [0, 1], got {getattr(args, key)}")
    if not 0 < args.eval_crop_ratio <= 1:
        raise ConfigError(f"--eval-crop-ratio must be in (0, 1], got {args.eval_crop_ratio}")
    if args.smoothing >= 1:
        raise ConfigError(f"--smoothing must be < 1, got {args.smoothing}")
    if args.bce_loss and args.smoothing > 0:
        raise ConfigError("--bce-loss binarises targets (> 0), which would make every class positive with label "
                          f"smoothing {args.smoothing}: pass --smoothing 0.0 with --bce-loss (as DeiT III does)")
    if args.in_chans not in (1, 3):
        raise ConfigError(f"--in-chans must be 1 (grayscale) or 3 (RGB): images have no other channel counts, got "
                          f"{args.in_chans}")
    if args.clip_grad is not None and not (args.clip_grad > 0 and math.isfinite(args.clip_grad)):
        raise ConfigError(f"--clip-grad must be > 0 (the largest gradient norm kept), got {args.clip_grad}; leave it "
                          "out to not clip")
    if not 0 < args.model_ema_decay < 1:
        raise ConfigError(f"--model-ema-decay must be in (0, 1) (DeiT: 0.99996), got {args.model_ema_decay}")
    if args.opt_betas is not None:
        wanted = 3 if args.opt.lower() == "adan" else 2
        if len(args.opt_betas) != wanted or not all(0 <= b < 1 for b in args.opt_betas):
            example = "0.98 0.92 0.99" if wanted == 3 else "0.9 0.999"
            raise ConfigError(f"--opt-betas takes {wanted} values in [0, 1) for --opt {args.opt}, e.g. --opt-betas "
                              f"{example}; got {' '.join(map(str, args.opt_betas))}")
    if not 0 <= args.momentum < 1 + 1e-9:
        raise ConfigError(f"--momentum must be in [0, 1], got {args.momentum}")
    if not (args.first_layer_lr_mult > 0 and math.isfinite(args.first_layer_lr_mult)):
        raise ConfigError(f"--first-layer-lr-mult must be > 0, got {args.first_layer_lr_mult}")
    if not 0 <= args.first_layer_momentum < 1:
        raise ConfigError(f"--first-layer-momentum must be in [0, 1), got {args.first_layer_momentum}")
    if not (args.first_layer_weight_decay >= 0 and math.isfinite(args.first_layer_weight_decay)):
        raise ConfigError(f"--first-layer-weight-decay must be >= 0, got {args.first_layer_weight_decay}")
    if args.first_layer_opt == "same" and args.first_layer_lr_mult != 1:
        raise ConfigError(f"--first-layer-lr-mult {args.first_layer_lr_mult:g} applies to the first layer's own "
                          "optimizer: add --first-layer-opt sgd (or leave the multiplier at 1)")
    if args.sched == "step" and not (args.decay_epochs > 0 and 0 < args.decay_rate <= 1):
        raise ConfigError(f"--sched step needs --decay-epochs > 0 and --decay-rate in (0, 1], got "
                          f"{args.decay_epochs} and {args.decay_rate}")
    if args.sched == "multistep":
        milestones = args.decay_milestones or []
        if not (milestones and milestones[0] > 0 and all(a < b for a, b in zip(milestones, milestones[1:]))
                and 0 < args.decay_rate <= 1):
            raise ConfigError(f"--sched multistep needs --decay-milestones: increasing epoch counts > 0, e.g. "
                              f"--decay-milestones 60 120 160, and --decay-rate in (0, 1]; got {milestones or 'none'} "
                              f"and {args.decay_rate}")
    if args.cutmix_minmax is not None and not 0 < args.cutmix_minmax[0] <= args.cutmix_minmax[1] <= 1:
        raise ConfigError(f"--cutmix-minmax takes MIN MAX with 0 < MIN <= MAX <= 1, got "
                          f"{args.cutmix_minmax[0]} {args.cutmix_minmax[1]}")
    if not args.seed < 2**31:
        raise ConfigError(f"--seed must be < 2**31 (numpy's seeds are 32-bit), got {args.seed}")
    if args.warmup_epochs >= args.epochs and first_process_on_machine():
        print(f"warning: --warmup-epochs {args.warmup_epochs} is not shorter than --epochs {args.epochs}: the "
              "learning rate never leaves its warmup", file=sys.stderr)
    if args.global_batch is not None and args.global_batch < 0:
        raise ConfigError(f"--global-batch must be > 0 (or 0 for none), got {args.global_batch}")
    if args.max_updates_per_epoch is not None and args.max_updates_per_epoch <= 0:
        raise ConfigError(f"--max-updates-per-epoch must be > 0, got {args.max_updates_per_epoch}")
    for key in ("checkpoint_interval_updates", "prefetch_factor"):
        if getattr(args, key) is not None and getattr(args, key) <= 0:
            raise ConfigError(f"--{key.replace('_', '-')} must be > 0, got {getattr(args, key)}")
    if args.torchcompile is not None:
        import torch

        if args.torchcompile not in torch._dynamo.list_backends(exclude_tags=()):
            raise ConfigError(f"--torchcompile {args.torchcompile}: unknown backend; torch has "
                              f"{', '.join(torch._dynamo.list_backends())}")
    if args.num_workers is not None and args.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.three_augment and args.aa:
        raise ConfigError(f"--ThreeAugment replaces the whole train transform, so --aa {args.aa} would be ignored: "
                          "drop one of them")
    if args.src is None:
        # RandomResizedCrop down to 8% of a 28-px image leaves a few pixels; DeiT crops small images with padding.
        args.src = args.input_size <= 32
    folder_data = args.data_set in ("IMNET", "FOLDER") or (args.data_set is None and args.data_path)
    if (args.train_split, args.val_split) != ("train", "val") and not folder_data:
        raise ConfigError(f"--train-split / --val-split name the folders of an image-folder dataset (--data-set "
                          f"FOLDER or IMNET); {args.data_set or 'FMNIST'} has its own splits: leave them out")
    for key in ("train_split", "val_split"):
        value = getattr(args, key)
        if not value or "/" in value or value in (".", ".."):
            raise ConfigError(f"--{key.replace('_', '-')} takes one folder name under --data-path, got {value!r}")
    if args.eval and not (args.resume or args.finetune):
        raise ConfigError("--eval needs weights: pass --resume RUN_OR_CHECKPOINT (or --finetune WEIGHTS)")


def inactive_tract_options(args: argparse.Namespace) -> Optional[str]:
    """The TrAct options set to something other than their default while TrAct is off (None when there are none)."""
    if args.tract:
        return None
    parser = get_args_parser()
    set_ = [f"--{key.replace('_', '-')} {getattr(args, key)}" for key in ("tract_lambda", "tract_layer",
                                                                           "tract_sync_gram")
            if getattr(args, key) != parser.get_default(key)]
    if not set_:
        return None
    return (f"{', '.join(set_)} given without --tract: TrAct is off and they do nothing (add --tract to train the "
            "first layer with TrAct)")


def save_args(args: argparse.Namespace, path: Path) -> bytes:
    """Write the resolved arguments as YAML that ``-c`` accepts back (run-control flags left out); return the bytes
    written."""
    values = {k: v for k, v in sorted(vars(args).items()) if k not in RUN_CONTROL}
    data = yaml.safe_dump(values, sort_keys=False).encode()
    write_atomic(Path(path), data)  # never a partial or 0-byte file
    return data
