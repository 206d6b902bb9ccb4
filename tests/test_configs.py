"""The paper-run configs of Table 1, Table 2 and Figs. 3-4: each value against the paper (written out here), each
config dry-run on tiny data in its dataset's real format, and the schedules they need against torch's own."""
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import write_image_folder
from test_train import fresh_accelerate_state  # noqa: F401  (an autouse fixture)

import datagen
import train
from tract.config import parse_args
from tract.engine import build_scheduler
from tract.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# The paper's values (arXiv:2410.23970): name -> (model, timm optimizer, lr, epochs, weight decay, batch).
PAPER = {}
for depth in (18, 34, 50):  # section 4.3: SGD m0.9, wd 1e-4, lr 0.141 for 30 epochs, 0.1 for 60 and 90, batch 256
    for epochs in (30, 60, 90):
        PAPER[f"imagenet_resnet{depth}_{epochs}ep.yaml"] = (f"resnet{depth}", "momentum",
                                                             0.141 if epochs == 30 else 0.1, epochs, 1e-4, 256)
for epochs in (100, 200, 400, 800):  # section 4.1: SGD lr 0.08; Adam 1e-2 (100, 200) / 1e-3 (400, 800); ViT 10^-3 ...
    PAPER[f"cifar10_resnet18_sgd_{epochs}ep.yaml"] = ("resnet18_cifar", "momentum", 0.08, epochs, 0.0, 128)
    PAPER[f"cifar10_resnet18_adam_{epochs}ep.yaml"] = ("resnet18_cifar", "adam", 1e-2 if epochs <= 200 else 1e-3,
                                                       epochs, 0.0, 128)
    vit_lr = {100: 1e-3, 200: 10 ** -3.2, 400: 10 ** -3.5, 800: 10 ** -3.5}[epochs]
    PAPER[f"cifar10_vit_adam_{epochs}ep.yaml"] = ("vit_cifar_patch4_32", "adam", vit_lr, epochs, 0.0, 128)
PAPER["cifar100_resnet18_200ep.yaml"] = ("resnet18_cifar", "momentum", 0.1, 200, 5e-4, 128)  # section 4.2


def test_every_paper_config_is_in_the_table_above():
    on_disk = {p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith(("deit3_", "transfer_", "fmnist_"))}
    assert on_disk == set(PAPER)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_config_holds_the_papers_values(name):
    model, opt, lr, epochs, weight_decay, batch = PAPER[name]
    args = parse_args(["-c", str(CONFIGS / name)])
    assert (args.model, args.opt, args.epochs, args.batch_size) == (model, opt, epochs, batch)
    assert args.lr == pytest.approx(lr, rel=1e-6) and args.unscale_lr  # the paper's lr at its batch, as is
    assert args.weight_decay == weight_decay and args.tract and args.tract_lambda == 0.1
    assert args.momentum == 0.9 and args.accum_steps == 1 and args.mixup == args.cutmix == 0
    assert args.smoothing == (0.1 if "vit" in name else 0.0)  # the ViT's label smoothing (section 4.1)
    if name.startswith("imagenet"):  # decayed by 0.1 after 1/3 and 2/3 of training, per epoch
        assert (args.sched, args.decay_epochs, args.decay_rate, args.warmup_epochs) == ("step", epochs / 3, 0.1, 0)
        assert (args.data_set, args.input_size, args.sched_on_updates) == ("IMNET", 224, False)
    elif name.startswith("cifar10_"):  # the official script: per-update cosine to 0, no warmup
        assert (args.sched, args.min_lr, args.warmup_epochs, args.sched_on_updates) == ("cosine", 0.0, 0, True)
        assert (args.data_set, args.input_size, args.src) == ("CIFAR10", 32, True)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """CIFAR-10 / CIFAR-100 pickles and an ImageNet ImageFolder, each with one full update of the configs' batch."""
    root = tmp_path_factory.mktemp("paper_data")
    datagen.write_cifar(root / "cifar10", num_classes=10, n_train=128, n_test=4)
    datagen.write_cifar(root / "cifar100", num_classes=100, n_train=128, n_test=4)
    write_image_folder(root / "imagenet", num_classes=2, train_per_class=128, val_per_class=1, size=8)
    return root


@pytest.mark.parametrize("name", sorted(PAPER))
def test_dry_run_of_each_paper_config_prints_its_recipe(name, tiny_data, tmp_path, capsys, monkeypatch):
    datagen.skip_md5_checks(monkeypatch)
    folder = {"IMNET": "imagenet", "CIFAR10": "cifar10", "CIFAR100": "cifar100"}
    data = folder[parse_args(["-c", str(CONFIGS / name)]).data_set]
    out = tmp_path / "never"
    train.main(["-c", str(CONFIGS / name), "--data-path", str(tiny_data / data), "--num-workers", "0",
                "--output-dir", str(out), "--dry-run"])
    printed = dict(re.findall(r"^  ([a-z -]+): (.*)$", capsys.readouterr().out, flags=re.M))
    model, opt, lr, epochs, weight_decay, batch = PAPER[name]
    assert float(printed["lr"].split()[0]) == pytest.approx(lr, rel=1e-6)
    assert printed["optimizer"].startswith({"momentum": "SGD,", "adam": "Adam, eps 1e-08"}[opt])
    assert printed["global batch"].split()[0] == str(batch) and printed["epochs"] == str(epochs)
    assert printed["tract"] == f"on, layer {'patch_embed.proj' if 'vit' in name else 'conv1'}, lambda 0.1"
    assert not out.exists()


def test_the_cifar_vit_has_the_papers_shape_and_vit_cifars_6_3_million_parameters():
    import timm

    import tract.models  # noqa: F401  (registers the model)

    model = timm.create_model("vit_cifar_patch4_32", num_classes=10)
    d, tokens = 384, 64 + 1  # 8 x 8 patches of 4 px and the class token
    block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + 2 * (d * d + d)  # MLP hidden 384 (ViT-CIFAR)
    expected = (3 * 4 * 4 * d + d) + d + tokens * d + 7 * block + 2 * d + (d * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert round(expected / 1e6, 1) == 6.3  # ViT-CIFAR's README: "Number of parameters: 6.3 M"
    assert len(model.blocks) == 7 and model.blocks[0].attn.num_heads == 12


def lrs(args, updates_per_epoch, steps):
    """The lr train.py's loop sets at each of ``steps`` (per update: the update index; per epoch: the epoch)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr)
    scheduler = build_scheduler(args, optimizer, updates_per_epoch)
    out = []
    for t in steps:
        scheduler.step_update(t) if args.sched_on_updates else scheduler.step(t)
        out.append(optimizer.param_groups[0]["lr"])
    return out


def test_table1_schedule_warms_up_over_the_first_epoch_then_runs_60_60_40_40_epochs_at_0_1_to_0_0008():
    args = parse_args(["-c", str(CONFIGS / "cifar100_resnet18_200ep.yaml")])
    u = 3  # updates per epoch
    steps = [0, 1, 2, 3, 60 * u - 1, 60 * u, 120 * u - 1, 120 * u, 160 * u - 1, 160 * u, 200 * u - 1]
    # paper: "60 epochs at 0.1, 60 epochs at 0.02, 40 epochs at 0.004, 40 epochs at 0.0008, and a warmup schedule
    # during the first epoch" (pytorch-cifar100's WarmUpLR: linear from 0 over the first epoch's updates)
    expected = [0.0, 0.1 / 3, 0.2 / 3, 0.1, 0.1, 0.02, 0.02, 0.004, 0.004, 0.0008, 0.0008]
    assert lrs(args, u, steps) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_table2_schedule_decays_by_10_after_a_third_and_two_thirds_of_the_epochs():
    args = parse_args(["-c", str(CONFIGS / "imagenet_resnet50_30ep.yaml")])
    expected = [0.141] * 10 + [0.0141] * 10 + [0.00141] * 10
    assert lrs(args, 5, range(30)) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("name", ["cifar10_resnet18_sgd_100ep.yaml", "cifar10_vit_adam_200ep.yaml"])
def test_cifar10_schedule_is_torchs_per_update_cosine_annealing_as_the_official_script(name):
    args = parse_args(["-c", str(CONFIGS / name), "--epochs", "4"])  # the shape, not the length, is under test
    u = 7
    reference_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(reference_opt, T_max=args.epochs * u)  # [O]: T_max updates
    expected = []
    for _ in range(args.epochs * u):
        expected.append(reference_opt.param_groups[0]["lr"])
        reference_opt.step()
        reference.step()
    assert lrs(args, u, range(args.epochs * u)) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_multistep_in_epochs_decays_after_each_milestone_and_bad_milestones_are_refused():
    args = parse_args(["--sched", "multistep", "--decay-milestones", "2", "3", "--decay-rate", "0.5", "--lr", "1",
                       "--epochs", "5"])
    assert lrs(args, 4, range(5)) == pytest.approx([1.0, 1.0, 0.5, 0.25, 0.25])
    for bad in (["--decay-milestones", "3", "2"], ["--decay-milestones", "0", "2"], []):
        with pytest.raises(ConfigError, match="--sched multistep needs --decay-milestones"):
            parse_args(["--sched", "multistep", *bad])
    assert math.isclose(parse_args(["--sched", "multistep", "--decay-milestones", "1"]).decay_rate, 0.1)


def test_readme_shows_a_command_for_every_paper_config():
    from test_readme import bash_commands

    shown = " ".join(bash_commands())
    assert [name for name in sorted(PAPER) if f"configs/{name}" not in shown] == []


def test_config_comments_cite_the_paper_or_a_public_url_not_a_file_outside_the_repository():
    """A config's sources are the paper (by section or table, or its arXiv URL), public URLs, or this repository's
    files: a document a comment names by path (.md, .txt; not a part of a URL) exists here."""
    for path in sorted(CONFIGS.glob("*.yaml")):
        comments = " ".join(line.split("#", 1)[1] for line in path.read_text().splitlines() if "#" in line)
        named = re.findall(r"(?<![\w/.:-])((?:[\w-]+/)*[\w-]+\.(?:md|txt))\b", comments)
        missing = [n for n in named if not (CONFIGS.parent / n).exists()]
        assert not missing, f"{path.name} cites files not in the repository: {missing}"

