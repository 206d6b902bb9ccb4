"""The dead ends a new user met (issue 24's smaller points): each checked against what the user sees."""
import json
import os
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from test_train import fresh_accelerate_state, tiny_run  # noqa: F401  (an autouse fixture)

import datagen
import train
from tract.data import DatasetError, build_dataset

REPO = Path(__file__).resolve().parents[1]


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_a_mid_epoch_checkpoint_is_named_by_the_epochs_done_plus_its_updates_and_old_names_still_resume(
        tiny_imagefolder, tmp_path):
    straight = tmp_path / "straight"
    # 6 updates per epoch: a checkpoint after update 4 of epoch 1 (no epoch done yet), then epoch 1's own
    train.main(tiny_run(tiny_imagefolder, straight, "--checkpoint-interval-updates", "4", "--checkpoint-hist", "9"))
    reset_accelerate()
    names = sorted(p.name for p in (straight / "checkpoints").iterdir() if not p.is_symlink())
    assert names == ["epoch-0000-plus-000004-updates", "epoch-0001"]
    state = json.loads((straight / "checkpoints" / names[0] / "train_state.json").read_text())
    assert (state["epoch"], state["update_in_epoch"]) == (0, 4)
    # the name an earlier train.py gave that checkpoint: still resumed from, to the same weights
    old = tmp_path / "old"
    shutil.copytree(straight, old, symlinks=True)
    os.rename(old / "checkpoints" / names[0], old / "checkpoints" / "epoch-0000-update-000004")
    branch = tmp_path / "branch"
    train.main(tiny_run(tiny_imagefolder, branch, "--checkpoint-interval-updates", "4", "--resume",
                        str(old / "checkpoints" / "epoch-0000-update-000004")))
    a, b = load_file(straight / "model.safetensors"), load_file(branch / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_from_scratch_runs_config_json_claims_no_pretrained_tag_or_licence(tiny_imagefolder, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(tiny_run(tiny_imagefolder, out))
    timms = timm.create_model("vit_tiny_patch16_224").pretrained_cfg  # what timm says of its own hub weights
    assert timms["tag"] and timms["license"]
    config = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert "tag" not in config and "license" not in config
    assert config["input_size"] == [3, 32, 32]  # the rest of the config is there
    reset_accelerate()
    capsys.readouterr()
    train.main(tiny_run(tiny_imagefolder, tmp_path / "unused", "--eval", "--resume", str(out)))
    assert f"resumed from {(out / 'checkpoints' / 'epoch-0001').resolve()}: 1 epoch and 0 updates done" in \
        capsys.readouterr().out


def test_an_image_folder_given_by_data_path_alone_is_reported_as_a_folder_not_imagenet(tiny_imagefolder, capsys):
    train.main(["--data-path", str(tiny_imagefolder), "--batch-size", "4", "--dry-run", "--num-workers", "0"])
    headline = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("dry run:"))
    assert headline == "dry run: vit_pico_convstem_28 on FOLDER"


@pytest.mark.parametrize("name", ["CIFAR10", "FLOWERS"])
def test_a_torchvision_dataset_that_fails_its_checksum_names_the_check_and_the_folder_alternative(name, tmp_path):
    if name == "CIFAR10":
        datagen.write_cifar(tmp_path, num_classes=10, n_train=8, n_test=2)  # real format, not the official bytes
    else:
        datagen.write_flowers(tmp_path, n_train=2, n_val=2, n_test=2, size=(8, 8))
    with pytest.raises(DatasetError) as e:
        build_dataset(name, str(tmp_path), True)
    message = str(e.value)
    assert "MD5 checksum of the official release" in message and "subset" in message
    assert "pass --data-set FOLDER" in message
