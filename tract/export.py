"""Exports: a run's weights as timm loads them, ``model.safetensors`` beside the run's ``config.json`` in a folder.

train.py writes the run's ``config.json`` (timm's ``save_config_for_hf``: the architecture and its arguments, the class
count and names, the eval preprocessing) when training starts, and at its end exports from its checkpoints: the last
epoch's weights into the run folder itself, the weights it calls best (``checkpoints/best``) into ``OUTPUT/best/`` and,
with ``--model-ema``, the EMA of the last epoch into ``OUTPUT/ema/``. Each folder loads with
``timm.create_model("local-dir:FOLDER", pretrained=True)``. Any checkpoint of a run exports the same way:

    python -m tract.export RUN/checkpoints/epoch-0003 OUT    # the model after epoch 3
    python -m tract.export RUN/checkpoints/last OUT --ema    # the EMA of the newest checkpoint
    python -m tract.export RUN OUT                            # the run's best

The weights are read once, from the bytes that match the checkpoint's manifest; nothing read runs code (safetensors
and JSON only), and nothing is written through a link.
"""
import argparse
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from tract.checkpoint import CheckpointError, checkpoint_weights, export_weights, link_target, name_position
from tract.errors import ConfigError, WeightsError, run_cli
from tract.safe_files import MAX_JSON_BYTES, read_bytes, refuse_link, write_atomic

__all__ = ["CONFIG", "find_checkpoint", "export_checkpoint", "export_run", "describe_exports", "main"]

CONFIG = "config.json"  # the run's timm config, written by train.py when training starts


def find_checkpoint(path: str) -> Path:
    """The checkpoint folder ``path`` names: a checkpoint (``checkpoints/epoch-NNNN``, ``best``, ``last``), or a run
    folder, which means its ``best``."""
    p = Path(path).expanduser()
    if (p / "checkpoints").is_dir():
        if link_target(p / "checkpoints", "best") is None:
            raise CheckpointError(f"{p} has no best checkpoint yet (no epoch evaluated): name one of its checkpoints, "
                                  f"e.g. python -m tract.export {p / 'checkpoints' / 'last'} OUT")
        p = p / "checkpoints" / "best"
    if not (p.is_dir() and name_position(p.resolve().name) is not None):
        raise CheckpointError(f"{path}: not a train.py run folder or checkpoint folder (RUN/checkpoints/epoch-NNNN, "
                              "RUN/checkpoints/best or RUN/checkpoints/last)")
    return p.resolve()


def export_checkpoint(checkpoint: Path, out: Path, *, ema: bool = False) -> Path:
    """Write ``out/model.safetensors`` (the checkpoint's model, or its EMA) and ``out/config.json`` (its run's); returns
    ``out``. ``checkpoint`` is a checkpoint folder inside its run's ``checkpoints/``."""
    checkpoint, out = Path(checkpoint), Path(out)
    run = checkpoint.parent.parent
    config = run / CONFIG
    if not config.is_file():
        raise CheckpointError(f"{run} has no {CONFIG}, which tells timm the architecture: train.py writes it when "
                              f"training starts (a run of an older train.py has one only once it ended). Finish the "
                              f"run, python train.py --resume {run}, then export")
    try:
        state = checkpoint_weights(checkpoint, "ema.safetensors" if ema else "model.safetensors")
    except (ConfigError, WeightsError) as e:  # damaged or replaced: one message naming the file
        raise CheckpointError(f"cannot export {checkpoint}: {e}") from None
    if state is None:
        raise CheckpointError(f"{checkpoint} holds no EMA weights (the run was trained without --model-ema): export "
                              "its model, without --ema")
    if ema:  # timm's ModelEmaV3 keeps the averaged model as its submodule `module`
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} is a file: choose a folder to export into")
    out.mkdir(parents=True, exist_ok=True)
    refuse_link(out, "Delete the link (or choose another folder), then export again")
    export_weights(state, out / "model.safetensors", run=run)
    if os.path.realpath(out / CONFIG) != os.path.realpath(config):
        write_atomic(out / CONFIG, read_bytes(config, MAX_JSON_BYTES))
    return out


def export_run(output_dir: Path, *, ema: bool) -> Dict[str, Path]:
    """The end of train.py: the last checkpoint's model into ``output_dir``, the best one's into ``output_dir/best``,
    the last one's EMA into ``output_dir/ema`` (with ``ema``); returns {'last' | 'best' | 'ema': folder}."""
    output_dir = Path(output_dir)
    checkpoints = output_dir / "checkpoints"
    exports = {"last": export_checkpoint((checkpoints / "last").resolve(), output_dir)}
    if link_target(checkpoints, "best") is not None:
        exports["best"] = export_checkpoint((checkpoints / "best").resolve(), output_dir / "best")
    if ema:
        exports["ema"] = export_checkpoint((checkpoints / "last").resolve(), output_dir / "ema", ema=True)
    return exports


def describe_exports(exports: Dict[str, Path], records: List[dict], best_acc1: float, best_epoch: int) -> str:
    """The run's last line: which folder holds which weights, with their accuracy: the best from the verified train
    state (``best_acc1`` at the 0-based ``best_epoch``), the last epoch's and the EMA's from the run's last log line."""
    last = records[-1] if records else {}

    def accuracy(record: Optional[dict], key: str) -> str:
        return f"{key} {record[key]:.2f}%, epoch {record['epoch']}" if record and key in record else "not evaluated"

    parts = []
    if "best" in exports:
        parts.append(f"the best weights ({accuracy({'test_acc1': best_acc1, 'epoch': best_epoch + 1}, 'test_acc1')}) "
                     f"in {exports['best']}/")
    parts.append(f"the last epoch's ({accuracy(last, 'test_acc1')}) in {exports['last']}/")
    if "ema" in exports:
        parts.append(f"their EMA ({accuracy(last, 'test_ema_acc1')}) in {exports['ema']}/")
    return ("done: " + "; ".join(parts) + ". Each folder is a model.safetensors with its config.json: "
            "timm.create_model(\"local-dir:FOLDER\", pretrained=True)")


def _export(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tract.export", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="RUN/checkpoints/epoch-NNNN, RUN/checkpoints/best or /last, or a run folder (its best)")
    parser.add_argument("out", metavar="OUT", help="the folder to write model.safetensors and config.json into")
    parser.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights instead of its model")
    args = parser.parse_args(argv)
    checkpoint = find_checkpoint(args.checkpoint)
    out = export_checkpoint(checkpoint, Path(args.out), ema=args.ema)
    print(f"exported {'the EMA of ' if args.ema else ''}{checkpoint} to {out}/: "
          f"timm.create_model(\"local-dir:{out}\", pretrained=True)")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m tract.export CHECKPOINT OUT [--ema]``: one message and a non-zero status on a bad checkpoint."""
    run_cli(_export, "python -m tract.export", argv)


if __name__ == "__main__":
    main()
