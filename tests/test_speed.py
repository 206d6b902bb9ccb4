"""The speed switches of issue 12: fused optimizers and --opt-kwargs, the uint8 input path normalised on the device,
per-batch seeded augmentation (persistent workers, resume), torch.compile with TrAct, and the host syncs per update.
"""
import json
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

import train
from tract.config import parse_args
from tract.data import DeviceLoader, SeededBatches, SeededBatchSampler, build_transform
from tract.engine import build_optimizer
from tract.errors import ConfigError
from tract.run_log import describe_optimizer
from test_multiprocess import accelerate_launch, launch_env, uniform_imagefolder  # noqa: F401 (a fixture)
from test_train import fresh_accelerate_state, log_lines, tiny_run  # noqa: F401 (an autouse fixture)

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def optimizer_for(*argv):
    model = timm.create_model("vit_tiny_patch16_224", patch_size=8, embed_dim=32, depth=1, num_heads=2, img_size=32)
    return build_optimizer(parse_args(["--dry-run", *argv]), model, 1e-3, device=torch.device("cpu"))


def test_fused_names_reach_torchs_fused_kernel_and_fusedlamb_says_timms_lamb_has_none():
    adamw = optimizer_for("--opt", "fusedadamw")
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["fused"] is True
    assert describe_optimizer(adamw) == "torch.optim.adamw.AdamW, fused kernel"
    plain = optimizer_for("--opt", "adamw")
    assert not plain.defaults["fused"] and "default" in describe_optimizer(plain)
    lamb = optimizer_for("--opt", "fusedlamb")
    assert type(lamb) is timm.optim.Lamb and "no fused version" in describe_optimizer(lamb)


def test_opt_kwargs_reach_the_optimizer_and_a_bad_one_is_a_config_error():
    sgd = optimizer_for("--opt", "sgd", "--opt-kwargs", "foreach=True", "maximize=True")
    assert sgd.defaults["foreach"] is True and sgd.defaults["maximize"] is True
    with pytest.raises(ConfigError, match="--opt-kwargs"):
        optimizer_for("--opt", "adamw", "--opt-kwargs", "no_such_option=1")
    with pytest.raises(SystemExit):
        parse_args(["--opt-kwargs", "fused"])


def test_tf32_and_cudnn_benchmark_are_on_by_default_and_each_has_an_opt_out():
    from tract.runtime import set_cuda_speed_flags

    assert vars(parse_args([])).items() >= {"tf32": True, "cudnn_benchmark": True}.items()
    assert vars(parse_args(["--no-tf32", "--no-cudnn-benchmark"])).items() >= {"tf32": False,
                                                                               "cudnn_benchmark": False}.items()
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        set_cuda_speed_flags(True, True)
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32,
                torch.backends.cudnn.benchmark) == ("high", True, True)
        set_cuda_speed_flags(False, False)
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32,
                torch.backends.cudnn.benchmark) == ("highest", False, False)
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = before[1:]


def picture(size=(41, 37), seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def test_uint8_eval_batch_normalised_on_the_device_equals_a_float64_reference():
    img = picture((32, 32))
    uint8 = build_transform(False, 32, eval_crop_ratio=1.0, mean=MEAN, std=STD, use_prefetcher=True)(img)
    assert uint8.dtype == torch.uint8 and uint8.shape == (3, 32, 32)
    loader = torch.utils.data.DataLoader([(uint8, 0)], batch_size=1)
    (batch, _), = list(DeviceLoader(loader, MEAN, STD, torch.device("cpu")))
    pixels = np.asarray(img, dtype=np.float64).transpose(2, 0, 1) / 255.0  # 32 px at ratio 1: no resize, no crop
    reference = (pixels - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
    torch.testing.assert_close(batch[0].double(), torch.from_numpy(reference), rtol=0, atol=1e-5)


@pytest.mark.parametrize("train_mode", [True, False])
def test_device_path_gives_the_float_paths_images_for_the_same_random_draws(train_mode):
    options = dict(three_augment=True, simple_random_crop=False) if train_mode else dict(eval_crop_ratio=0.875)
    float_tf = build_transform(train_mode, 32, mean=MEAN, std=STD, **options)
    uint8_tf = build_transform(train_mode, 32, mean=MEAN, std=STD, use_prefetcher=True, **options)
    for seed in range(4):
        img = picture(seed=seed)
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
        expected = float_tf(img)
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
        raw = uint8_tf(img)
        (got, _), = list(DeviceLoader(torch.utils.data.DataLoader([(raw, 0)]), MEAN, STD, torch.device("cpu")))
        torch.testing.assert_close(got[0], expected, rtol=0, atol=1e-5)


def test_random_erasing_on_the_device_erases_a_box_and_keeps_the_rest():
    raw = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    loader = torch.utils.data.DataLoader(list(zip(raw, range(8))), batch_size=8)
    plain, = list(DeviceLoader(loader, MEAN, STD, torch.device("cpu")))
    erased, = list(DeviceLoader(loader, MEAN, STD, torch.device("cpu"), reprob=1.0, remode="const"))
    for a, b in zip(plain[0], erased[0]):
        changed = (a != b).any(dim=0)
        rows, cols = changed.any(dim=1).nonzero(), changed.any(dim=0).nonzero()
        assert changed.sum() > 0 and changed.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert (b[:, changed] == 0).all()  # 'const' fills with 0 after normalisation, as in the transform


class RandomItems(torch.utils.data.Dataset):
    """Each item is three fresh random numbers (python, numpy, torch): what a random augmentation draws."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.tensor([i, random.random(), np.random.rand(), torch.rand(()).item()], dtype=torch.float64)


def epoch_batches(loader, sampler, epoch):
    sampler.set_epoch(epoch)
    return [b.clone() for b in loader]


def test_augmentation_is_a_function_of_seed_epoch_and_batch_position_not_of_workers_or_skipping():
    from accelerate import skip_first_batches

    def loader(workers, **kw):
        sampler = SeededBatchSampler(torch.utils.data.RandomSampler(range(16), generator=torch.Generator()), 4,
                                     drop_last=True, seed=7)
        return torch.utils.data.DataLoader(SeededBatches(RandomItems()), batch_sampler=sampler, num_workers=workers,
                                           generator=torch.Generator(), **kw), sampler

    persistent, p_sampler = loader(2, persistent_workers=True)
    p_sampler.sampler.generator.manual_seed(0)
    epochs = [epoch_batches(persistent, p_sampler, e) for e in range(2)]
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    fresh, f_sampler = loader(0)
    f_sampler.sampler.generator.manual_seed(0)
    epoch_batches(fresh, f_sampler, 0)  # consume the order generator as the first run did
    f_sampler.set_epoch(1)
    resumed = [b.clone() for b in skip_first_batches(fresh, 2)]
    assert all(torch.equal(a, b) for a, b in zip(resumed, epochs[1][2:])) and len(resumed) == 2
    assert not torch.equal(epochs[0][0][:, 1:], epochs[1][0][:, 1:])  # new draws each epoch
    assert random.getstate() == state[0] and torch.equal(torch.get_rng_state(), state[2])  # main RNG untouched


def test_compiled_model_with_tract_has_no_graph_breaks():
    from tract import apply_tract

    model = timm.create_model("vit_tiny_patch16_224", patch_size=8, embed_dim=32, depth=1, num_heads=2, img_size=32)
    apply_tract(model, lam=0.1)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(torch.randn(4, 3, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_compiled_channels_last_device_path_run_keeps_plain_keys_and_resumes_bitwise_from_an_update_checkpoint(
        tiny_imagefolder, tmp_path):
    recipe = ["--epochs", "2", "--torchcompile", "aot_eager", "--channels-last", "--prefetcher", "--reprob", "0.25",
              "--mixup", "0.8", "--drop-path", "0.1", "--tract", "--num-workers", "1", "--val-interval", "2",
              "--checkpoint-interval-updates", "4", "--checkpoint-hist", "9"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(tiny_run(tiny_imagefolder, straight, *recipe))
    checkpoints = sorted(p.name for p in (straight / "checkpoints").iterdir())
    assert checkpoints == ["best", "epoch-0000-plus-000004-updates", "epoch-0001", "epoch-0001-plus-000002-updates",
                           "epoch-0002", "last"]
    assert "test_acc1" not in log_lines(straight)[0] and "test_acc1" in log_lines(straight)[1]
    train.main(tiny_run(tiny_imagefolder, resumed, *recipe, "--resume",
                        str(straight / "checkpoints" / "epoch-0000-plus-000004-updates")))
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert set(a) == set(timm.create_model("vit_tiny_patch16_224", patch_size=8, embed_dim=32, depth=1,
                                           num_heads=2, img_size=32, num_classes=3).state_dict())
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = load_file(straight / "checkpoints" / "epoch-0000-plus-000004-updates" / "model.safetensors")
    assert not [k for k in saved if "_orig_mod" in k or k.startswith("module.")]


def test_two_process_run_agrees_on_preemption_only_every_sync_interval_updates(uniform_imagefolder, tmp_path):
    # 24 images, 2 processes of batch 1: 12 SGD updates per epoch; agreement at updates 4 and 8 (not after the last)
    counts = tmp_path / "counts"
    args = ["--data-set", "IMNET", "--data-path", uniform_imagefolder, "--model", "vit_pico_patch7_28",
            "--model-kwargs", "patch_size=4", "--input-size", "32", "--opt", "sgd", "--epochs", "2",
            "--batch-size", "1", "--num-workers", "0", "--no-progress", "--sync-interval", "4", "--output-dir", "run",
            "--tract", "--tract-sync-gram"]  # TrAct reads back once, at its first backward, and copies nothing
    out = subprocess.run([str(c) for c in accelerate_launch("--multi_gpu", "--num_processes", "2",
                                                            "--main_process_port", "0", REPO / "tests" /
                                                            "sync_counter.py", counts, *args)],
                         cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    updates, interval = 12, 4
    agreements = (updates - 1) // interval  # 2
    # 3: the loss check every interval updates (the last is one of them), summed over processes so all stop together
    loss_checks = updates // interval
    end_of_epoch = {"collectives": 2, "reads": 2}  # loss and count summed over processes, read once
    loader_start = 2  # host tensors once per epoch: the sampler's permutation, the loader iterator's seed
    gram_syncs = updates  # --tract-sync-gram: one all-reduce of the Gram (and its row count, made on the device)
    epoch_copies = 2  # the epoch's loss sum and micro-batch count, made on the device once per epoch
    expected = {"collectives": agreements + loss_checks + end_of_epoch["collectives"] + gram_syncs,
                "reads": agreements + loss_checks + end_of_epoch["reads"] + loader_start,
                "copies": agreements + epoch_copies}  # an agreement sends this process's host-side signal flag
    first = {**expected, "reads": expected["reads"] + 1}  # TrAct's dtype, decided from its first Gram
    for rank in (0, 1):
        assert json.loads((counts / f"rank-{rank}.json").read_text()) == [first, expected]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: sync debug mode exists only on CUDA")
def test_training_updates_on_a_gpu_read_nothing_back_before_the_epochs_last_update(tiny_imagefolder, tmp_path,
                                                                                   monkeypatch):
    original, reached = train.train_one_epoch, []

    def strict(model, loader, optimizer, scheduler, criterion, accelerator, state, updates_per_epoch, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return original(model, loader, optimizer, scheduler, criterion, accelerator, state, updates_per_epoch,
                            **kwargs)
        except RuntimeError:  # the first device->host read: where did it come?
            reached.append((state.update_in_epoch, updates_per_epoch))
            raise
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(train, "train_one_epoch", strict)
    with pytest.raises(RuntimeError, match="synchroniz"):
        train.main(tiny_run(tiny_imagefolder, tmp_path / "o", "--prefetcher", "--reprob", "0.25", "--mixup", "0.8",
                            "--opt", "fusedadamw", "--pin-mem", "--sync-interval", "100"))
    assert reached == [(6, 6)]  # the loss read after the last update is the first sync
