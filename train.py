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
import torch
from accelerate.utils import broadcast_object_list, set_seed
from timm.data.loader import fast_collate
from torch.utils.data import DataLoader, DistributedSampler

from tract.checkpoint import TrainState, export_weights, load_checkpoint, repair_links, save_checkpoint
from tract.config import ConfigError, parse_args, save_args
from tract.data import (DeviceLoader, RASampler, SeededBatches, SeededBatchSampler, build_dataset, build_transform,
                        check_dataset, default_mean_std)
from tract.engine import (build_criterion, build_mixup, build_optimizer, build_scheduler, describe_optimizer, evaluate,
                          train_one_epoch)
from tract.models import build_model, count_parameters, plain_state_dict
from tract.run_folder import place_run
from tract.run_log import RunLog
from tract.runtime import EXIT_REQUEUE, Preemption, build_accelerator, default_num_workers, run_cli


def main(argv=None) -> None:
    """Parse, build, train, save; every user error is a ConfigError/DatasetError/WeightsError before any write."""
    args = parse_args(argv)
    preemption = Preemption(interval=args.sync_interval).install()  # before the first write: start-up exits 75 too
    place = None
    try:
        accelerator = build_accelerator(args)
        say = accelerator.print
        world = accelerator.num_processes

        # ---- where the run lives: decided (and refused) before anything is built; held by this run from here on
        place = place_run(args, accelerator, log=say)
        checkpoint, output_dir = place.checkpoint, place.output_dir

        # ---- data
        data_set = args.data_set or ("IMNET" if args.data_path else "FMNIST")
        mean, std = default_mean_std(args.in_chans)
        mean, std = args.mean or mean, args.std or std
        # GPU input path (timm's): workers hand over uint8, normalisation and random erasing run on the device
        prefetcher = args.prefetcher if args.prefetcher is not None else accelerator.device.type == "cuda"
        try:
            train_tf = build_transform(True, args.input_size, three_augment=args.three_augment,
                                       simple_random_crop=args.src, color_jitter=args.color_jitter,
                                       auto_augment=args.aa, reprob=args.reprob, remode=args.remode,
                                       recount=args.recount, mean=mean, std=std,
                                       interpolation=args.train_interpolation, use_prefetcher=prefetcher)
        except (AssertionError, KeyError, ValueError) as e:  # timm's policy parser asserts on what it cannot read
            if not args.aa:
                raise
            raise ConfigError(f"--aa {args.aa}: timm cannot read this augmentation policy ({e or type(e).__name__}); "
                              "e.g. --aa rand-m9-mstd0.5-inc1") from None
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
        # Augmentation seeded per batch from (seed, process, epoch, position): the same with persistent workers and
        # after a resume that skips batches.
        batches = SeededBatchSampler(sampler, args.batch_size, drop_last=True, seed=args.seed,
                                     rank=accelerator.process_index)
        workers = args.num_workers if args.num_workers is not None else default_num_workers()
        loader_kwargs = dict(num_workers=workers, pin_memory=args.pin_mem and torch.cuda.is_available(),
                             persistent_workers=args.persistent_workers and workers > 0,
                             prefetch_factor=args.prefetch_factor if workers > 0 else None)
        # The train loader is built per process (the sampler already shards), so it is NOT given to
        # accelerator.prepare, which would shard it a second time; batches are moved to the device in the loop.
        # Its own generator: making an iterator draws a seed, which must not come from the training RNG (a resumed
        # run makes one more, for the skipping loader).
        train_loader = DataLoader(SeededBatches(train_set), batch_sampler=batches, generator=torch.Generator(),
                                  collate_fn=fast_collate if prefetcher else None, **loader_kwargs)
        val_loader = DataLoader(val_set, batch_size=int(1.5 * args.batch_size), shuffle=False, drop_last=False,
                                **loader_kwargs)
        updates_per_epoch = min(len(train_loader) // args.accum_steps,
                                args.max_updates_per_epoch or len(train_loader))
        if updates_per_epoch == 0:
            raise ConfigError(f"{len(train_set)} training images over {world} process(es) give no full update of "
                              f"--batch-size {args.batch_size} x --accum-steps {args.accum_steps}: lower them")

        # ---- model, optimizer, schedule, loss
        set_seed(args.seed)  # python, numpy and torch: the same init on every process, and with or without --tract
        model, tract_layer = build_model(args, num_classes, log=say)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        n_parameters = count_parameters(model)
        global_batch = args.batch_size * world * args.accum_steps
        lr = args.lr if args.unscale_lr else args.lr * global_batch / 512  # DeiT's linear scaling rule
        optimizer = build_optimizer(args, model, lr, device=accelerator.device)
        scheduler = build_scheduler(args, optimizer, updates_per_epoch)
        criterion = build_criterion(args, num_classes)
        mixup_fn = build_mixup(args, num_classes)

        say(f"{'dry run: ' if args.dry_run else ''}{args.model} on {data_set}")
        summary = {
            "parameters": n_parameters, "classes": num_classes, "train images": len(train_set),
            "val images": len(val_set), "processes": world, "global batch": global_batch,
            "per-process batch": args.batch_size, "accumulation steps": args.accum_steps,
            "updates per epoch": updates_per_epoch, "epochs": args.epochs, "lr": f"{lr:.6g}",
            "optimizer": f"{type(optimizer).__name__}, eps {optimizer.defaults.get('eps', 'none')}",
            "tract": f"on, layer {tract_layer}, lambda {args.tract_lambda}" if tract_layer else "off",
            "precision": accelerator.mixed_precision, "device": str(accelerator.device), "output": output_dir,
            "resume": checkpoint or ("from the start (no checkpoint yet)" if place.continues else "no"),
            "optimizer implementation": describe_optimizer(optimizer),
            "compile": (f"torch.compile, backend {args.torchcompile}, mode {args.torchcompile_mode or 'default'}"
                        if args.torchcompile else "off (eager)"),
            "channels last": "on" if args.channels_last else "off",
            "input path": (f"uint8 from {workers} workers, normalised on {accelerator.device} one batch ahead "
                           "(timm's PrefetchLoader)" if prefetcher else f"float32 normalised in {workers} workers") +
                          (f", persistent, {args.prefetch_factor or 2} batches ahead per worker"
                           if loader_kwargs["persistent_workers"] else ""),
            "tf32, cudnn.benchmark": (f"{'on' if args.tf32 else 'off'}, {'on' if args.cudnn_benchmark else 'off'}"
                                      if torch.cuda.is_available() else "n/a (no CUDA)"),
            "host syncs": f"every {args.sync_interval} updates" + (" (TrAct adds none)" if tract_layer else ""),
            "evaluation": f"every {args.val_interval} epoch(s) and after the last",
            "mid-epoch checkpoints": (f"every {args.checkpoint_interval_updates} updates"
                                      if args.checkpoint_interval_updates else "off"),
        }
        for key, value in summary.items():
            say(f"  {key}: {value}")
        if args.dry_run:
            return

        ema = None
        if args.model_ema:
            from timm.utils import ModelEmaV3

            # The model on its device first: an EMA built from a model on another device has foreach updates off
            model.to(accelerator.device)
            ema = ModelEmaV3(model, decay=args.model_ema_decay, device="cpu" if args.model_ema_force_cpu else None)
        if args.torchcompile:  # in place, after the EMA's copy: parameter names and state_dict keys stay timm's
            model.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        model, optimizer, val_loader = accelerator.prepare(model, optimizer, val_loader)
        state = TrainState()
        set_seed(args.seed + accelerator.process_index)  # different augmentations and mixup on every process
        checkpoints = output_dir / "checkpoints"
        if checkpoint is not None:
            load_checkpoint(accelerator, checkpoint, model=model, optimizer=optimizer, state=state, ema=ema,
                            exact=not args.resume_inexact, log=say)
            say(f"resumed from {checkpoint}: {state.epoch} epochs and {state.update_in_epoch} updates done")

        progress = args.progress
        if args.eval:
            stats = evaluate(model, val_loader, accelerator, channels_last=args.channels_last, progress=progress)
            say(f"eval on {len(val_set)} images: acc1 {stats['acc1']:.2f}%  acc5 {stats['acc5']:.2f}%  "
                f"loss {stats['loss']:.4f}")
            return

        if accelerator.is_main_process and not (output_dir / "args.yaml").exists():
            save_args(args, output_dir / "args.yaml")
        run_log = RunLog(output_dir, enabled=accelerator.is_main_process,
                         resume_epoch=state.epoch if checkpoint or place.continues else None)

        def evaluate_and_log(epoch: int, train_stats: dict) -> None:
            """Evaluate the model after ``epoch`` (if --val-interval says so), log the epoch, repoint ``best``."""
            stats, evaluated = dict(train_stats), (epoch + 1) % args.val_interval == 0 or epoch + 1 == args.epochs
            # The eval loader draws its seed from the global RNG: forked, so training's random stream is the same
            # whether or not an evaluation ran in between (a resume may or may not have to redo one).
            with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
                for prefix, net in (("test", model), ("test_ema", ema.module if ema is not None else None)):
                    if evaluated and net is not None and (prefix == "test" or args.model_ema_eval):
                        stats.update({f"{prefix}_{k}": v for k, v in evaluate(
                            net, val_loader, accelerator, channels_last=args.channels_last, progress=progress).items()})
            if evaluated and stats["test_acc1"] > state.best_acc1:
                state.best_acc1, state.best_epoch = stats["test_acc1"], epoch
                if accelerator.is_main_process:
                    repair_links(checkpoints, state)
            run_log.write({"epoch": epoch, **stats, "n_parameters": n_parameters})
            state.pending = {}
            tested = (f"test_acc1 {stats['test_acc1']:.2f}%  test_acc5 {stats['test_acc5']:.2f}%" if evaluated
                      else "not evaluated (--val-interval)")
            say(f"epoch {epoch}: train_loss {stats['train_loss']:.4f}  {tested}  ({stats['epoch_time']:.0f} s, "
                f"{stats['images_per_sec']:.0f} img/s)  best " +
                (f"{state.best_acc1:.2f}%" if state.best_acc1 >= 0 else "none yet"))

        if checkpoint is not None:  # the log is the record of evaluations: take the best from it, finish a pending one
            logged = [run_log.has(state.epoch - 1)] if accelerator.is_main_process else [None]
            broadcast_object_list(logged)
            if accelerator.is_main_process:
                evaluated = [r for r in run_log.records if "test_acc1" in r]
                if evaluated:
                    best = max(evaluated, key=lambda r: r["test_acc1"])
                    state.best_acc1, state.best_epoch = best["test_acc1"], best["epoch"]
                    repair_links(checkpoints, state)
            if state.pending and not logged[0]:
                evaluate_and_log(state.epoch - 1, state.pending)

        def stop_now(where: str) -> None:
            say(f"preempted {where}: exiting with {EXIT_REQUEUE} (resume with --resume {output_dir})")
            raise SystemExit(EXIT_REQUEUE)

        def after_update():
            """The checkpoint every --checkpoint-interval-updates, written as preemption writes it."""
            if args.checkpoint_interval_updates and state.num_updates % args.checkpoint_interval_updates == 0:
                save_checkpoint(accelerator, checkpoints, state, model=model, ema=ema, keep=args.checkpoint_hist)

        def on_device(loader):  # built once per loader: PrefetchLoader keeps one CUDA stream for its lifetime
            return DeviceLoader(loader, mean, std, accelerator.device, reprob=args.reprob, remode=args.remode,
                                recount=args.recount) if prefetcher else loader

        if preemption.should_stop(accelerator):  # signalled during start-up: nothing new to save
            stop_now("before training started")
        epoch_loader = on_device(train_loader)
        try:
            for epoch in range(state.epoch, args.epochs):
                batches.set_epoch(epoch)
                loader = epoch_loader
                if state.update_in_epoch:  # resumed inside the epoch: skip the batches already seen, unloaded
                    from accelerate import skip_first_batches

                    loader = on_device(skip_first_batches(train_loader, state.update_in_epoch * args.accum_steps))
                try:
                    train_stats = train_one_epoch(
                        model, loader, optimizer, scheduler, criterion, accelerator, state, updates_per_epoch,
                        mixup_fn=mixup_fn, ema=ema, clip_grad=args.clip_grad,
                        should_stop=lambda: preemption.should_stop(accelerator, state.update_in_epoch),
                        after_update=after_update, channels_last=args.channels_last,
                        sync_interval=args.sync_interval, progress=progress)
                except FloatingPointError as e:
                    last = checkpoints / "last"
                    good = f"the last good checkpoint is {last.resolve()}" if last.is_symlink() else "no checkpoint"
                    raise FloatingPointError(f"{e}; {good} (rerun the command with --resume {output_dir} and a "
                                             "lower --lr)") from None
                if train_stats.pop("preempted"):
                    save_checkpoint(accelerator, checkpoints, state, model=model, ema=ema, keep=args.checkpoint_hist)
                    stop_now(f"at update {state.update_in_epoch} of epoch {epoch} (saved {checkpoints / 'last'})")

                # The epoch's checkpoint comes before its evaluation, so an evaluation that fails loses no training.
                state.epoch, state.update_in_epoch, state.pending = epoch + 1, 0, train_stats
                save_checkpoint(accelerator, checkpoints, state, model=model, ema=ema, keep=args.checkpoint_hist)
                evaluate_and_log(epoch, train_stats)
                if preemption.should_stop(accelerator):  # signalled during eval or saving: the checkpoint is written
                    stop_now(f"after epoch {epoch}")
        finally:
            run_log.close()

        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            export_weights(plain_state_dict(accelerator.unwrap_model(model)), output_dir / "model.safetensors")
            if ema is not None:
                export_weights(plain_state_dict(ema.module), output_dir / "model_ema.safetensors")
        say(f"done: best test_acc1 {state.best_acc1:.2f}% (epoch {state.best_epoch}); weights in "
            f"{output_dir / 'model.safetensors'}")
        accelerator.end_training()
    finally:
        preemption.uninstall()
        if place is not None:
            place.release()


def cli(argv=None) -> None:
    """Entry point: user errors end with one message and a non-zero status, not a traceback."""
    run_cli(main, "train.py", argv)


if __name__ == "__main__":
    cli()
