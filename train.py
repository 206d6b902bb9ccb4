"""Train a timm image model from scratch with the DeiT III recipe, optionally with TrAct on its first layer.

    python train.py                                                    # Fashion-MNIST demo, a few CPU minutes
    python train.py -c configs/deit3_vit_s_400ep.yaml --data-path /data/imagenet
    accelerate launch --multi_gpu --num_processes 4 train.py -c configs/deit3_vit_s_400ep.yaml --data-path ...

The run folder (``--output-dir``) gets ``args.yaml`` (``-c`` takes it back), ``log.txt`` (one JSON line per epoch),
TensorBoard events, ``checkpoints/`` (``last``, ``best``; Accelerate save_state) and, at the end,
``model.safetensors``: the trained model's plain state_dict, with the keys of the vanilla timm model.

Preemption: on SIGUSR1 or SIGTERM every process finishes its current optimizer update, all agree to stop after the
same one, ``checkpoints/last`` is written with the position inside the epoch, and train.py exits with status 75
(EX_TEMPFAIL, "requeue me"). ``--resume OUTPUT`` continues from there, skipping the batches already seen.
"""
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, DistributedSampler

from tract.checkpoint import TrainState, export_weights, resolve_resume, save_checkpoint
from tract.config import ConfigError, parse_args, save_args
from tract.data import RASampler, build_dataset, build_transform, check_dataset, default_mean_std
from tract.engine import (build_criterion, build_mixup, build_optimizer, build_scheduler, evaluate,
                          train_one_epoch)
from tract.models import build_model, count_parameters, plain_state_dict, resolve_model_name
from tract.run_log import RunLog
from tract.runtime import EXIT_REQUEUE, Preemption, build_accelerator, default_num_workers, run_cli


def default_output_dir(args, accelerator) -> Path:
    """timm's naming: output/train/<YYYYmmdd-HHMMSS>-<model>-<size>, the same on every process."""
    from accelerate.utils import broadcast_object_list

    stamp = [time.strftime("%Y%m%d-%H%M%S")]
    broadcast_object_list(stamp)
    return Path("output") / "train" / f"{stamp[0]}-{resolve_model_name(args.model)[0]}-{args.input_size}"


def holds_run(folder: Path) -> bool:
    """Whether a folder already holds a train.py run (never written over without --resume)."""
    return (folder / "args.yaml").exists() or (folder / "checkpoints").exists() or (folder / "log.txt").exists()


def changed_args(saved: Path, args) -> dict:
    """{key: (saved value, current value)} for the arguments that differ from a run's args.yaml."""
    import yaml

    before = yaml.safe_load(saved.read_text()) or {}
    now = vars(args)
    return {k: (v, now[k]) for k, v in before.items() if k in now and now[k] != v}


def main(argv=None) -> None:
    """Parse, build, train, save; every user error is a ConfigError/DatasetError/WeightsError before any write."""
    args = parse_args(argv)
    accelerator = build_accelerator(args)
    say = accelerator.print
    world = accelerator.num_processes

    # ---- where the run lives: decided (and refused) before anything is built or written
    checkpoint, run_dir = resolve_resume(args.resume) if args.resume else (None, None)
    output_dir = Path(args.output_dir) if args.output_dir else run_dir or default_output_dir(args, accelerator)
    writes = not (args.eval or args.dry_run)
    if writes and holds_run(output_dir) and output_dir.resolve() != (run_dir.resolve() if run_dir else None):
        raise ConfigError(f"{output_dir} already holds a run: pass --resume {output_dir} to continue it, or choose "
                          "another --output-dir")
    args.output_dir = str(output_dir)

    # ---- data
    data_set = args.data_set or ("IMNET" if args.data_path else "FMNIST")
    mean, std = default_mean_std(args.in_chans)
    mean, std = args.mean or mean, args.std or std
    train_tf = build_transform(True, args.input_size, three_augment=args.three_augment, simple_random_crop=args.src,
                               color_jitter=args.color_jitter, auto_augment=args.aa, reprob=args.reprob,
                               remode=args.remode, recount=args.recount, mean=mean, std=std,
                               interpolation=args.train_interpolation)
    eval_tf = build_transform(False, args.input_size, eval_crop_ratio=args.eval_crop_ratio, mean=mean, std=std,
                              interpolation=args.train_interpolation)
    with accelerator.main_process_first():  # only one process downloads
        check_dataset(data_set, args.data_path, download=args.download)
        train_set, num_classes = build_dataset(data_set, args.data_path, True, train_tf, download=args.download,
                                               in_chans=args.in_chans)
        val_set, _ = build_dataset(data_set, args.data_path, False, eval_tf, in_chans=args.in_chans)

    if args.repeated_aug and world > 1:
        sampler = RASampler(train_set, world, accelerator.process_index, shuffle=True, seed=args.seed)
    else:
        if args.repeated_aug:
            say("note: --repeated-aug works across processes only; it is off in this single-process run")
        # Per-process shards seeded by (seed, epoch): a resumed run sees the same order as an uninterrupted one.
        sampler = DistributedSampler(train_set, world, accelerator.process_index, shuffle=True, seed=args.seed,
                                     drop_last=True)
    workers = args.num_workers if args.num_workers is not None else default_num_workers()
    pin = args.pin_mem and torch.cuda.is_available()
    # The train loader is built per process (the sampler already shards), so it is NOT given to accelerator.prepare,
    # which would shard it a second time; batches are moved to the device in the loop.
    loader_rng = torch.Generator()  # seeds the workers; re-seeded every epoch, so they never depend on RNG history
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, num_workers=workers,
                              pin_memory=pin, drop_last=True, generator=loader_rng)
    val_loader = DataLoader(val_set, batch_size=int(1.5 * args.batch_size), shuffle=False, num_workers=workers,
                            pin_memory=pin, drop_last=False)
    updates_per_epoch = min(len(train_loader) // args.accum_steps, args.max_updates_per_epoch or len(train_loader))
    if updates_per_epoch == 0:
        raise ConfigError(f"{len(train_set)} training images over {world} process(es) give no full update of "
                          f"--batch-size {args.batch_size} x --accum-steps {args.accum_steps}: lower them")

    # ---- model, optimizer, schedule, loss
    set_seed(args.seed)  # python, numpy and torch: the same init on every process, and with or without --tract
    model, tract_layer = build_model(args, num_classes, log=say)
    n_parameters = count_parameters(model)
    global_batch = args.batch_size * world * args.accum_steps
    lr = args.lr if args.unscale_lr else args.lr * global_batch / 512  # DeiT's linear scaling rule
    optimizer = build_optimizer(args, model, lr)
    scheduler = build_scheduler(args, optimizer, updates_per_epoch)
    criterion = build_criterion(args, num_classes)
    mixup_fn = build_mixup(args, num_classes)

    say(f"{'dry run: ' if args.dry_run else ''}{args.model} on {data_set}")
    summary = {
        "parameters": n_parameters, "classes": num_classes, "train images": len(train_set),
        "val images": len(val_set), "processes": world, "global batch": global_batch,
        "per-process batch": args.batch_size, "accumulation steps": args.accum_steps,
        "updates per epoch": updates_per_epoch, "epochs": args.epochs, "lr": f"{lr:.6g}",
        "tract": f"on, layer {tract_layer}, lambda {args.tract_lambda}" if tract_layer else "off",
        "precision": accelerator.mixed_precision, "device": str(accelerator.device), "output": output_dir,
    }
    for key, value in summary.items():
        say(f"  {key}: {value}")
    if args.dry_run:
        return

    ema = None
    if args.model_ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=args.model_ema_decay,
                         device="cpu" if args.model_ema_force_cpu else accelerator.device)
    model, optimizer, val_loader = accelerator.prepare(model, optimizer, val_loader)
    state = TrainState()
    accelerator.register_for_checkpointing(state, scheduler, *([ema] if ema is not None else []))
    set_seed(args.seed + accelerator.process_index)  # different augmentations and mixup on every process
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))  # restores RNG states too
        say(f"resumed from {checkpoint}: {state.epoch} epochs and {state.update_in_epoch} updates done")

    progress = args.progress
    if args.eval:
        stats = evaluate(model, val_loader, accelerator, progress=progress)
        say(f"eval on {len(val_set)} images: acc1 {stats['acc1']:.2f}%  acc5 {stats['acc5']:.2f}%  "
            f"loss {stats['loss']:.4f}")
        return

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if (output_dir / "args.yaml").exists():  # a resumed run keeps its record; say what this invocation changed
            for key, (then, now) in changed_args(output_dir / "args.yaml", args).items():
                say(f"note: resuming with {key} = {now!r} (the run started with {then!r})")
        else:
            save_args(args, output_dir / "args.yaml")
    run_log = RunLog(output_dir, enabled=accelerator.is_main_process)
    checkpoints = output_dir / "checkpoints"
    preemption = Preemption().install()
    try:
        for epoch in range(state.epoch, args.epochs):
            sampler.set_epoch(epoch)
            loader_rng.manual_seed(args.seed + 1_000_003 * epoch + accelerator.process_index)
            loader = train_loader
            if state.update_in_epoch:  # resumed inside the epoch: skip the batches already seen, without loading them
                from accelerate import skip_first_batches

                loader = skip_first_batches(train_loader, state.update_in_epoch * args.accum_steps)
            train_stats = train_one_epoch(model, loader, optimizer, scheduler, criterion, accelerator, state,
                                          updates_per_epoch, mixup_fn=mixup_fn, ema=ema, clip_grad=args.clip_grad,
                                          should_stop=lambda: preemption.should_stop(accelerator), progress=progress)
            if train_stats.pop("preempted"):
                save_checkpoint(accelerator, checkpoints, state, keep=args.checkpoint_hist)
                say(f"preempted: saved {checkpoints / 'last'} at update {state.update_in_epoch} of epoch {epoch}; "
                    f"exiting with {EXIT_REQUEUE} (resume with --resume {output_dir})")
                raise SystemExit(EXIT_REQUEUE)

            test_stats = evaluate(model, val_loader, accelerator, progress=progress)
            stats = {**train_stats, **{f"test_{k}": v for k, v in test_stats.items()}}
            if ema is not None and args.model_ema_eval:
                stats.update({f"test_ema_{k}": v for k, v in evaluate(ema.module, val_loader, accelerator,
                                                                      progress=progress).items()})
            state.epoch, state.update_in_epoch = epoch + 1, 0
            is_best = test_stats["acc1"] > state.best_acc1
            if is_best:
                state.best_acc1, state.best_epoch = test_stats["acc1"], epoch
            save_checkpoint(accelerator, checkpoints, state, is_best=is_best, keep=args.checkpoint_hist)
            run_log.write({"epoch": epoch, **stats, "n_parameters": n_parameters})
            say(f"epoch {epoch}: train_loss {stats['train_loss']:.4f}  test_acc1 {stats['test_acc1']:.2f}%  "
                f"test_acc5 {stats['test_acc5']:.2f}%  ({stats['epoch_time']:.0f} s, "
                f"{stats['images_per_sec']:.0f} img/s)  best {state.best_acc1:.2f}%")
            if preemption.should_stop(accelerator):  # signalled during eval or saving: the checkpoint is written
                say(f"preempted after epoch {epoch}: exiting with {EXIT_REQUEUE} (resume with --resume {output_dir})")
                raise SystemExit(EXIT_REQUEUE)
    finally:
        preemption.uninstall()
        run_log.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        export_weights(plain_state_dict(accelerator.unwrap_model(model)), output_dir / "model.safetensors")
        if ema is not None:
            export_weights(plain_state_dict(ema.module), output_dir / "model_ema.safetensors")
    say(f"done: best test_acc1 {state.best_acc1:.2f}% (epoch {state.best_epoch}); weights in "
        f"{output_dir / 'model.safetensors'}")
    accelerator.end_training()


def cli(argv=None) -> None:
    """Entry point: user errors end with one message and a non-zero status, not a traceback."""
    run_cli(main, "train.py", argv)


if __name__ == "__main__":
    cli()
