"""Every choice the command line lists works: each value of each option with `choices` (as --help lists them) trains
one update and evaluates, on tiny data of the dataset's real format. finetune.py reads the same parser and runs the
same pipeline, so the walk covers its options too."""
from pathlib import Path

import pytest
from conftest import write_image_folder
from test_train import fresh_accelerate_state  # noqa: F401  (an autouse fixture)

import datagen
import train
from tract.config import get_args_parser

# what makes a choice matter: random erasing on for its modes, mixup on for its modes, a drop path to schedule, ...
COMPANIONS = {"remode": ["--reprob", "0.5"], "mixup_mode": ["--mixup", "0.8"],
              "drop_path_schedule": ["--drop-path", "0.1"], "sgd": ["--first-layer-lr-mult", "2"],
              "multistep": ["--decay-milestones", "1"]}
# the dataset of each --data-set choice, written on the fly in its real format
WRITERS = {
    "IMNET": lambda root: write_image_folder(root, train_per_class=2, val_per_class=1, size=8),
    "FOLDER": lambda root: write_image_folder(root, train_per_class=2, val_per_class=1, size=8),
    "CIFAR10": lambda root: datagen.write_cifar(root, 10, n_train=10, n_test=2),
    "CIFAR100": lambda root: datagen.write_cifar(root, 100, n_train=4, n_test=2),
    "FMNIST": lambda root: datagen.write_fmnist(root, n_train=4, n_test=2),
    "FLOWERS": lambda root: datagen.write_flowers(root, n_train=2, n_val=2, n_test=2, size=(8, 8)),
    "CARS": lambda root: datagen.write_cars(root, n_train=4, n_test=2, size=(8, 8)),
}


def listed_choices():
    """(option, choice, resize) for every option of the parser that lists its choices; the interpolations both with
    --src's resize and with RandomResizedCrop's."""
    return [(action, choice, src) for action in get_args_parser()._actions if action.choices
            for choice in action.choices
            for src in (("--src", "--no-src") if action.dest == "train_interpolation" else ("--src",))]


CHOICES = listed_choices()


def test_the_walk_covers_every_dataset_and_the_options_a_new_user_met():
    assert {c for a, c, _ in CHOICES if a.dest == "data_set"} == set(WRITERS)
    assert ("random" in {c for a, c, _ in CHOICES if a.dest == "train_interpolation"})


@pytest.mark.parametrize("option,choice,src", CHOICES,
                         ids=[f"{a.option_strings[0]}={c}" + (f" {s}" if a.dest == "train_interpolation" else "")
                              for a, c, s in CHOICES])
def test_every_listed_choice_of_every_option_trains_an_update_and_evaluates(option, choice, src, tmp_path, monkeypatch):
    datagen.skip_md5_checks(monkeypatch)
    dataset = choice if option.dest == "data_set" else "FOLDER"
    WRITERS[dataset](tmp_path / "data")
    out = tmp_path / "run"
    train.main(["--data-set", dataset, "--data-path", str(tmp_path / "data"), "--model", "vit_pico_patch7_28",
                "--input-size", "28", "--batch-size", "2", "--epochs", "1", "--max-updates-per-epoch", "1",
                "--num-workers", "0", "--no-progress", "--output-dir", str(out), src, option.option_strings[0],
                choice, *COMPANIONS.get(option.dest, []), *COMPANIONS.get(choice, [])])
    assert Path(out / "best" / "model.safetensors").is_file()
