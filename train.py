"""Train a timm image model from scratch with the DeiT III recipe, optionally with TrAct on its first layer.

    python train.py                                                    # Fashion-MNIST demo, a few CPU minutes
    python train.py -c configs/deit3_vit_s_400ep.yaml --data-path /data/imagenet
    accelerate launch --config_file launch/accelerate/a40x4.yaml train.py -c configs/deit3_vit_s_400ep.yaml --data-path ...

The run folder (``--output-dir``) gets ``args.yaml`` (``-c`` takes it back), ``log.txt`` (one JSON line per epoch),
TensorBoard events, ``checkpoints/`` (``last``, ``best``; Accelerate save_state), ``config.json`` (timm's, written at
the start) and, at the end, the exports that ``timm.create_model("local-dir:FOLDER", pretrained=True)`` loads: the last
epoch's ``model.safetensors`` (the vanilla timm model's keys) in the run folder, the best weights in ``best/``, the
EMA's in ``ema/`` (``python -m tract.export`` exports any other checkpoint).

Preemption: on SIGUSR1 or SIGTERM every process finishes its current optimizer update, all agree to stop after the
same one, ``checkpoints/last`` is written with the position inside the epoch, and train.py exits with status 75
(EX_TEMPFAIL, "requeue me"); a first Ctrl-C does the same and exits 130, a second one stops at once. ``--resume
OUTPUT`` alone continues from there (the run's args.yaml is its base), skipping the batches already seen.
"""
import sys

from tract.config import parse_args
from tract.errors import ConfigError, run_cli

if __name__ == "__main__":  # the command line first: a bad one is told before torch and timm load (well under 1 s)
    ARGS = run_cli(parse_args, "train.py", sys.argv[1:], prog="train.py")

# What the run needs, imported once its command line has been read
from functools import partial

import torch
from accelerate.utils import set_seed

from tract.checkpoint import TrainState, export_timm_config, load_checkpoint, save_checkpoint, settle_resume
from tract.config import inactive_tract_options
from tract.data import build_train_data
from tract.engine import (build_criterion, build_mixup, build_optimizer, build_scheduler, evaluate, evaluate_and_log,
                          lr_warning, save_every, scaled_lr, train_one_epoch)
from tract.export import CONFIG, describe_exports, export_run
from tract.models import build_ema, build_model, count_parameters, resolve_model_name
from tract.run_folder import place_run
from tract.run_log import RunLog, run_summary
from tract.runtime import EXIT_INTERRUPTED, Preemption, StartUpStopped, build_accelerator


def main(argv=None, args=None) -> None:
    """Parse (or take finetune.py's ``args``), build, train, save; every user error is a ConfigError/DatasetError/
    WeightsError before any write."""
    args = args if args is not None else parse_args(argv, prog="train.py")
    preemption = Preemption(interval=args.sync_interval)
    place = None
    try:
        preemption.install()  # before the first write: a signal during the start-up exits 75 too
        accelerator = build_accelerator(args)
        say = accelerator.print

        # ---- where the run lives: decided (and refused) before anything is built; held by this run from here on
        place = place_run(args, accelerator, log=say)
        checkpoint, output_dir = place.checkpoint, place.output_dir
        checkpoints = output_dir / "checkpoints"

        # ---- data, model, optimizer, schedule, loss
        data = build_train_data(args, accelerator, log=say)
        set_seed(args.seed)  # python, numpy and torch: the same init on every process, and with or without --tract
        model, tract_layer = build_model(args, data.num_classes, log=say)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        n_parameters = count_parameters(model)
        lr = scaled_lr(args, global_batch=args.batch_size * accelerator.num_processes * args.accum_steps)
        optimizer = build_optimizer(args, model, lr, device=accelerator.device)
        scheduler = build_scheduler(args, optimizer, data.updates_per_epoch)
        criterion = build_criterion(args, data.num_classes)
        mixup_fn = build_mixup(args, data.num_classes)

        say(f"{'dry run: ' if args.dry_run else ''}{args.model} on {data.name}")
        summary = run_summary(args, accelerator, data, place, n_parameters=n_parameters, lr=lr, optimizer=optimizer,
                              criterion=criterion, tract_layer=tract_layer)
        for key, value in summary.items():
            say(f"  {key}: {value}")
        for warning in (lr_warning(args, lr), inactive_tract_options(args)):
            if warning:
                say(f"warning: {warning}")
        if args.dry_run:
            return

        # ---- onto the devices; the checkpoint's state
        ema = build_ema(args, model, accelerator.device)
        if args.torchcompile:  # in place, after the EMA's copy: parameter names and state_dict keys stay timm's
            model.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        model, optimizer, val_loader = accelerator.prepare(model, optimizer, data.val_loader)
        state = TrainState()
        set_seed(args.seed + accelerator.process_index)  # different augmentations and mixup on every process
        if checkpoint is not None:
            checkpoint = load_checkpoint(accelerator, checkpoint, model=model, optimizer=optimizer, state=state,
                                         ema=ema, exact=not args.resume_inexact, fallbacks=place.fallbacks, log=say)
            if state.epoch > args.epochs or state.update_in_epoch >= data.updates_per_epoch:  # a forged train state
                raise ConfigError(f"{checkpoint} is at update {state.update_in_epoch} of epoch {state.epoch}, beyond "
                                  f"this run's {args.epochs} epochs of {data.updates_per_epoch} updates: resume with "
                                  "the run's --epochs and batch options, or from another checkpoint")
            say(f"resumed from {checkpoint}: {state.epoch} epoch{'' if state.epoch == 1 else 's'} and "
                f"{state.update_in_epoch} update{'' if state.update_in_epoch == 1 else 's'} done")
        if args.eval:
            stats = evaluate(model, val_loader, accelerator, channels_last=args.channels_last, progress=args.progress)
            say(f"eval on {len(data.val_set)} images: acc1 {stats['acc1']:.2f}%  acc5 {stats['acc5']:.2f}%  "
                f"loss {stats['loss']:.4f}")
            return

        if accelerator.is_main_process:  # what the exports of its checkpoints load with (tract/export.py)
            export_timm_config(accelerator.unwrap_model(model), output_dir / CONFIG,
                               architecture=resolve_model_name(args.model)[0], label_names=data.class_names,
                               data_config=data.timm_data_config(args))
        resumed = checkpoint is not None or place.continues
        run_log = RunLog(output_dir, enabled=accelerator.is_main_process, resume_epoch=state.epoch if resumed else None,
                         resume_step=state.num_updates, hparams=vars(args))
        save = partial(save_checkpoint, accelerator, checkpoints, state, model=model, ema=ema,
                       keep=args.checkpoint_hist, run_args=place.args_yaml)
        # Epochs are numbered from 1 wherever a user reads them (log.txt, messages, the checkpoint folder written
        # after epoch N is epoch-000N); `epoch` below is the 0-based index that seeds the data order and schedule.
        end_epoch = partial(evaluate_and_log, args=args, model=model, ema=ema, loader=val_loader,
                            accelerator=accelerator, state=state, run_log=run_log, checkpoints=checkpoints,
                            n_parameters=n_parameters, log=say)

        # ---- the loop
        if checkpoint is not None and settle_resume(accelerator, checkpoints, state, checkpoint):
            end_epoch(state.epoch, state.pending)  # the checkpoint came before its epoch's evaluation
        preemption.arm()  # from here on a signal stops the run after an update, with a checkpoint
        if preemption.should_stop(accelerator):  # signalled in the instant before: nothing new to save
            preemption.stop("before training started", output_dir, log=say)
        try:
            for epoch in range(state.epoch, args.epochs):
                # resumed inside the epoch: the batches already seen are skipped, unloaded
                loader = data.epoch_loader(epoch, skip_batches=state.update_in_epoch * args.accum_steps)
                try:
                    train_stats = train_one_epoch(
                        model, loader, optimizer, scheduler, criterion, accelerator, state, data.updates_per_epoch,
                        mixup_fn=mixup_fn, ema=ema, clip_grad=args.clip_grad,
                        should_stop=lambda: preemption.should_stop(accelerator, state.update_in_epoch),
                        after_update=partial(save_every, args.checkpoint_interval_updates, state, save),
                        channels_last=args.channels_last, sync_interval=args.sync_interval, progress=args.progress,
                        log_interval=args.log_interval, epochs=args.epochs,
                        log_updates=run_log.updates if accelerator.is_main_process else None)
                except FloatingPointError as e:
                    last = checkpoints / "last"
                    good = f"the last good checkpoint is {last.resolve()}" if last.is_symlink() else "no checkpoint"
                    raise FloatingPointError(f"{e}; {good} (continue with --resume {output_dir} --resume-override "
                                             "and a lower --lr)") from None
                if train_stats.pop("preempted"):
                    save()
                    preemption.stop(f"at update {state.update_in_epoch} of epoch {epoch + 1} (saved "
                                    f"{checkpoints / 'last'})", output_dir, log=say)

                # The epoch's checkpoint comes before its evaluation, so an evaluation that fails loses no training.
                state.epoch, state.update_in_epoch, state.pending = epoch + 1, 0, train_stats
                save()
                end_epoch(state.epoch, train_stats)
                if preemption.should_stop(accelerator):  # signalled during eval or saving: the checkpoint is written
                    preemption.stop(f"after epoch {state.epoch}", output_dir, log=say)
        finally:
            run_log.close()

        # ---- save: the last, best and EMA weights, each in a folder timm.create_model("local-dir:...") loads
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            say(describe_exports(export_run(output_dir, ema=ema is not None), run_log.records, state.best_acc1,
                                 state.best_epoch))
        accelerator.end_training()
    except StartUpStopped:  # signalled before the first update, however far the start-up got: nothing to save
        if place is not None:
            place.release(keep=True)  # what the requeued job resumes: its args.yaml holds the command's options
        preemption.stop("before training started", place.output_dir if place is not None else None)
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, in one line rather than a traceback
        last = place.output_dir / "checkpoints" / "last" if place is not None else None
        kept = (f"the newest checkpoint is {last.resolve()} (resume with --resume {place.output_dir})"
                if last is not None and last.is_symlink() else "no checkpoint was written")
        print(f"train.py: stopped at once by a second Ctrl-C; {kept}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    finally:
        preemption.uninstall()
        if place is not None:
            place.release()


def cli(argv=None, args=None) -> None:
    """Entry point: user errors end with one message and a non-zero status, not a traceback."""
    run_cli(main, "train.py", argv, args=args)


if __name__ == "__main__":
    cli(args=ARGS)
