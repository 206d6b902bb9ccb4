"""Files a person can edit or swap, tried as a hostile or unlucky cluster user would: checkpoint files swapped after
their verification, forged with a manifest rewritten to match, doctored run files (log.txt, args.yaml), FIFOs where
files are expected, links planted while a checkpoint is written, foreign folders, and output paths TensorBoard cannot
write. Each attack is a case of a table below; README's "Trust and recovery" counts them."""
import json
import os
import re
import signal
import struct
from pathlib import Path

import pytest
import torch
from test_train import fresh_accelerate_state, log_lines  # noqa: F401  (fresh_accelerate_state: autouse)
from test_trust import copy_run, resume_argv, rewrite_manifest, same_weights, two_epoch_run  # noqa: F401

import train
import tract.run_folder
from tract.errors import ConfigError, DatasetError


@pytest.fixture
def deadline():
    """Fail a test that would wait forever (on a FIFO) after 60 s, instead of hanging the suite."""
    def expire(signum, frame):
        raise TimeoutError("still waiting after 60 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def resumed_from(said: str) -> str:
    """The checkpoint a run said it resumed from."""
    return re.search(r"resumed from (\S+):", said)[1]


# ---- each checkpoint file is opened once: what was verified is what is loaded ---------------------------------------

def foreign_weights(folder: Path) -> Path:
    """Someone else's weights for the same model, outside the run (all zeros, so the swap shows)."""
    from safetensors.torch import load_file, save_file

    path = folder.parent.parent.parent / "foreign.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in load_file(folder / "model.safetensors").items()}, str(path))
    return path


def swap_to_link(folder: Path, name: str) -> None:
    target = foreign_weights(folder) if name.endswith(".safetensors") else folder.parent.parent.parent / "other.bin"
    if not target.exists():
        target.write_bytes((folder / name).read_bytes())
    (folder / name).unlink()
    (folder / name).symlink_to(target)


def swap_to_fifo(folder: Path, name: str) -> None:
    (folder / name).unlink()
    os.mkfifo(folder / name)


SWAPS = {"model.safetensors -> link to foreign weights": ("model.safetensors", swap_to_link),
         "optimizer.bin -> FIFO": ("optimizer.bin", swap_to_fifo),
         "random_states_0.pkl -> FIFO": ("random_states_0.pkl", swap_to_fifo),
         "ema.safetensors -> link": ("ema.safetensors", swap_to_link)}


@pytest.mark.parametrize("case", list(SWAPS))
def test_a_checkpoint_file_swapped_after_its_verification_is_never_loaded_and_the_run_falls_back(
        two_epoch_run, tmp_path, monkeypatch, capsys, deadline, case):
    name, swap = SWAPS[case]
    out = copy_run(two_epoch_run[0], tmp_path / "run")
    newest = out / "checkpoints" / "epoch-0002"
    verify = tract.run_folder.resolve_resume

    def verify_then_swap(*args, **kwargs):
        found = verify(*args, **kwargs)
        swap(newest, name)  # the instant after verification: what a watcher of train_state.json can do
        return found

    monkeypatch.setattr(tract.run_folder, "resolve_resume", verify_then_swap)
    train.main([*resume_argv(two_epoch_run[1], out), "--eval"])
    said = capsys.readouterr().out
    assert re.search(f"skipped {newest / name}", said), said[-2000:]
    assert resumed_from(said) == str(out / "checkpoints" / "epoch-0001")


# ---- forged files with the manifest rewritten to match: one message, and the previous checkpoint ---------------------

def safetensors_parts(path: Path):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_safetensors(path: Path, header: dict, body: bytes, length: int = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + body)


def tensor_names(header: dict):
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def forge_header(change):
    def forge(folder: Path) -> None:
        path = folder / "model.safetensors"
        header, body = safetensors_parts(path)
        change(header)
        write_safetensors(path, header, body)
    return forge


def header_length(value: int):
    def forge(folder: Path) -> None:
        path = folder / "model.safetensors"
        header, body = safetensors_parts(path)
        write_safetensors(path, header, body, length=value)
    return forge


def past_the_end(header):
    last = tensor_names(header)[-1]
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin + 64, end + 64]


def overlapping(header):
    first, second = tensor_names(header)[:2]
    header[second]["data_offsets"] = [header[first]["data_offsets"][0] + 4,
                                      header[first]["data_offsets"][0] + 4 + (header[second]["data_offsets"][1] -
                                                                              header[second]["data_offsets"][0])]


def out_of_range(header):
    name = tensor_names(header)[0]
    header[name]["data_offsets"] = [2**62, 2**62 + 4]


def wrong_dtype(header):  # I32 has F32's size: safetensors reads it, load_state_dict would cast it silently
    name = next(k for k in tensor_names(header) if header[k]["dtype"] == "F32")
    header[name]["dtype"] = "I32"


def wrong_shape(header):  # the same number of values in another shape
    name = next(k for k in tensor_names(header) if header[k]["shape"] == [32])
    header[name]["shape"] = [4, 8]


def forge_optimizer(change):
    def forge(folder: Path) -> None:
        path = folder / "optimizer.bin"
        state = torch.load(path, weights_only=True)
        change(state)
        torch.save(state, path)
    return forge


def set_state(key, make):
    def change(state):
        state["state"][0][key] = make(state["state"][0][key])
    return change


def forge_rng(change):
    def forge(folder: Path) -> None:
        from accelerate.utils.other import TORCH_SAFE_GLOBALS

        path = folder / "random_states_0.pkl"
        with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
            state = torch.load(path, weights_only=True)
        change(state)
        torch.save(state, path)
    return forge


def nan_weight(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


FORGED = {
    "header length 2^62": (header_length(2**62), "model.safetensors.*header length"),
    "header length past the end": (header_length(10**6), "model.safetensors.*header length"),
    "data past the end": (forge_header(past_the_end), "model.safetensors.*gap before it"),
    "overlapping data_offsets": (forge_header(overlapping), "model.safetensors.*overlaps"),
    "data_offsets out of range": (forge_header(out_of_range), "model.safetensors.*"),
    "a dtype not the model's": (forge_header(wrong_dtype), "model.safetensors does not fit the model.*I32"),
    "a shape not the model's": (forge_header(wrong_shape), r"model.safetensors does not fit the model.*\[4, 8\]"),
    "NaN weights": (nan_weight, "model.safetensors.*not finite"),
    "exp_avg of another shape": (forge_optimizer(set_state("exp_avg", lambda t: torch.zeros(3))),
                                 "optimizer.bin.*exp_avg has shape"),
    "exp_avg 0-d": (forge_optimizer(set_state("exp_avg", lambda t: torch.tensor(0.0))),
                    "optimizer.bin.*exp_avg has shape"),
    "exp_avg NaN": (forge_optimizer(set_state("exp_avg", lambda t: torch.full_like(t, float("nan")))),
                    "optimizer.bin.*not finite"),
    "step NaN": (forge_optimizer(set_state("step", lambda t: torch.tensor(float("nan")))),
                 "optimizer.bin.*step is not a count"),
    "a param group dropped": (forge_optimizer(lambda s: s.update(param_groups=s["param_groups"][:1])),
                              "optimizer.bin.*1 parameter group"),
    "a param group's lr NaN": (forge_optimizer(lambda s: s["param_groups"][0].update(lr=float("nan"))),
                               "optimizer.bin.*lr is not a finite setting"),
    "a 5-byte torch RNG state": (forge_rng(lambda s: s.update(torch_manual_seed=torch.zeros(5, dtype=torch.uint8))),
                                 "random_states_0.pkl.*torch_manual_seed"),
    "a short Python RNG state": (forge_rng(lambda s: s.update(random_state=(3, (1, 2, 3), None))),
                                 "random_states_0.pkl.*random_state"),
    "numpy RNG state of another type": (forge_rng(lambda s: s.update(numpy_random_seed="MT19937")),
                                        "random_states_0.pkl.*numpy_random_seed"),
}


@pytest.mark.parametrize("case", list(FORGED))
def test_a_forged_checkpoint_file_with_a_matching_manifest_is_one_message_and_the_previous_one_is_used(
        two_epoch_run, tmp_path, capsys, case):
    forge, reason = FORGED[case]
    out = copy_run(two_epoch_run[0], tmp_path / "run")
    newest = out / "checkpoints" / "epoch-0002"
    forge(newest)
    rewrite_manifest(newest)  # a forger, not damage: the manifest matches
    train.main([*resume_argv(two_epoch_run[1], out), "--eval"])
    said = capsys.readouterr().out
    notes = [line for line in said.splitlines() if line.startswith("note: skipped")]
    assert len(notes) == 1 and re.search(reason, notes[0]), said[-2000:]
    assert resumed_from(said) == str(out / "checkpoints" / "epoch-0001")


def test_a_forged_checkpoint_named_explicitly_is_one_message_naming_the_file(two_epoch_run, tmp_path):
    out = copy_run(two_epoch_run[0], tmp_path / "run")
    newest = out / "checkpoints" / "epoch-0002"
    header_length(2**62)(newest)
    rewrite_manifest(newest)
    with pytest.raises(ConfigError, match=f"{newest / 'model.safetensors'}: its safetensors header length .*pass "
                                          "its run folder instead"):
        train.main([*resume_argv(two_epoch_run[1], out)[:-1], str(newest), "--eval"])


def test_the_last_good_checkpoint_named_after_a_divergence_has_finite_weights(two_epoch_run, tmp_path, monkeypatch,
                                                                               capsys):
    from test_trust import dataset_hook

    out = copy_run(two_epoch_run[0], tmp_path / "run")
    newest = out / "checkpoints" / "epoch-0002"
    nan_weight(newest)
    rewrite_manifest(newest)
    dataset_hook(monkeypatch, lambda n, sample: (sample[0] * float("nan"), sample[1]))  # the run now diverges
    with pytest.raises(FloatingPointError, match="last good checkpoint is (\\S+) ") as e:
        train.main([*resume_argv(two_epoch_run[1], out), "--epochs", "3"])
    good = Path(re.search("last good checkpoint is (\\S+) ", str(e.value))[1])
    assert "skipped" in capsys.readouterr().out and good == (out / "checkpoints" / "epoch-0001").resolve()
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(good / "model.safetensors").values())


# ---- log.txt: typed lines, named when wrong; the best accuracy from the verified train state ------------------------

BAD_LOG_VALUES = {"test_acc1 1000": '"test_acc1": 1000', "test_acc1 NaN": '"test_acc1": NaN',
                  "test_acc1 Infinity": '"test_acc1": Infinity', "test_acc1 a string": '"test_acc1": "99"',
                  "test_acc1 -5": '"test_acc1": -5', "epoch 1.5": '"epoch": 1.5', "epoch 0": '"epoch": 0',
                  "epoch true": '"epoch": true', "not an object": None}


@pytest.mark.parametrize("case", list(BAD_LOG_VALUES))
def test_a_doctored_log_line_is_one_message_naming_the_file_and_line_before_compute(two_epoch_run, tmp_path, case):
    out = copy_run(two_epoch_run[0], tmp_path / "run")
    lines = (out / "log.txt").read_text().splitlines()
    replacement = BAD_LOG_VALUES[case]
    if replacement is None:
        lines[0] = "[1, 2, 3]"
    else:
        key = replacement.split(":")[0]
        lines[0] = re.sub(f'{key}: [^,}}]+', replacement, lines[0])
    (out / "log.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=f"{out / 'log.txt'} line 1.*Restore or delete that line.*--resume {out}"):
        train.main(resume_argv(two_epoch_run[1], out) + ["--epochs", "3"])
    assert len((out / "log.txt").read_text().splitlines()) == 2


def test_the_best_accuracy_comes_from_the_verified_train_state_not_from_the_log(two_epoch_run, tmp_path, capsys):
    out = copy_run(two_epoch_run[0], tmp_path / "run")
    state = json.loads((out / "checkpoints" / "epoch-0002" / "train_state.json").read_text())
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    real_best = max(line["test_acc1"] for line in lines)
    fake = 100.0 if real_best < 100 else 50.0
    lines[0]["test_acc1"] = fake  # a plausible, typed value: only the train state can tell it is not the run's
    (out / "log.txt").write_text("".join(json.dumps(line) + "\n" for line in lines))
    train.main(resume_argv(two_epoch_run[1], out) + ["--epochs", "3"])
    said = capsys.readouterr().out
    done = re.search(r"done: the best weights \(test_acc1 ([0-9.]+)%", said)
    assert float(done[1]) != fake
    best3 = json.loads((out / "checkpoints" / "epoch-0003" / "train_state.json").read_text())["best_acc1"]
    assert best3 >= state["best_acc1"] and best3 != fake


# ---- args.yaml is covered by the run's integrity --------------------------------------------------------------------

def edit_args(out: Path, **values) -> None:
    import yaml

    args = yaml.safe_load((out / "args.yaml").read_text())
    args.update(values)
    (out / "args.yaml").write_text(yaml.safe_dump(args))


ARGS_EDITS = {"lr 1e-3 -> 4.0": {"lr": 4.0}, "weight decay": {"weight_decay": 0.5},
              "TrAct off": {"tract": False}, "seed": {"seed": 7}, "mixup on": {"mixup": 0.8}}


@pytest.mark.parametrize("case", list(ARGS_EDITS))
def test_an_args_yaml_edited_since_the_run_started_is_refused_naming_the_keys(two_epoch_run, tmp_path, case):
    out = copy_run(two_epoch_run[0], tmp_path / "run")
    edit_args(out, **ARGS_EDITS[case])
    key = next(iter(ARGS_EDITS[case]))
    with pytest.raises(ConfigError, match=f"args.yaml was edited since the run started: {key} .*cp .*epoch-0002/"
                                          "run_args.yaml .*--resume-override"):
        train.main(resume_argv(two_epoch_run[1], out)[-2:] + ["--epochs", "3"])  # --resume RUN alone
    assert len(log_lines(out)) == 2


def test_an_args_yaml_edit_taken_with_resume_override_is_recorded_in_the_log(two_epoch_run, tmp_path):
    out = copy_run(two_epoch_run[0], tmp_path / "run")
    edit_args(out, lr=4e-3)
    train.main(["--resume", str(out), "--epochs", "3", "--resume-override"])
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line.get("epoch") for line in lines] == [1, 2, None, 3]
    assert lines[2]["after_epoch"] == 2 and lines[2]["resume_override"] == "lr 0.001 -> 0.004"
    train.main(["--resume", str(out), "--epochs", "4"])  # the run now started from the edited args.yaml: no refusal
    assert len(log_lines(out)) == 5


SOURCE_KWARGS = {"checkpoint_path": {"checkpoint_path": "/etc/hostname"},
                 "pretrained + cache_dir": {"pretrained": True, "cache_dir": "/tmp/elsewhere"},
                 "pretrained_cfg": {"pretrained_cfg": {"file": "/etc/hostname"}},
                 "pretrained_cfg_overlay": {"pretrained_cfg_overlay": {"hf_hub_id": "timm/x"}}}


@pytest.mark.parametrize("case", list(SOURCE_KWARGS))
def test_model_kwargs_that_make_timm_read_files_are_refused_from_files_and_taken_from_the_command_line(
        two_epoch_run, tmp_path, case):
    import yaml

    import finetune
    from tract.config import parse_args

    values = SOURCE_KWARGS[case]
    out = copy_run(two_epoch_run[0], tmp_path / "run")
    args = yaml.safe_load((out / "args.yaml").read_text())
    edit_args(out, model_kwargs={**args["model_kwargs"], **values})
    first = next(iter(values))
    with pytest.raises(ConfigError, match=f"model_kwargs {first}=.*args.yaml.*read a file or the network"):
        train.main(["--resume", str(out), "--epochs", "3"])
    with pytest.raises(ConfigError, match=f"model_kwargs {first}=.*read a file or the network"):
        finetune.main(["--finetune", str(out), "--dry-run"])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model_kwargs": values}))
    with pytest.raises(ConfigError, match=f"model_kwargs {first}=.*{config}"):
        parse_args(["-c", str(config)])
    typed = [f"{k}={v!r}" for k, v in values.items()]
    assert parse_args(["-c", str(config), "--model-kwargs", *typed]).model_kwargs == values


# ---- FIFOs, sockets and devices where a file is expected; signals while the start-up hangs -------------------------

def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def special_path(tmp_path: Path, kind: str, name: str) -> Path:
    """A path named ``name`` that is a FIFO, a socket, or (a link to) a character device."""
    import socket

    path = tmp_path / name
    if kind == "FIFO":
        return fifo(path)
    if kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        return path
    path.symlink_to("/dev/zero")
    return path


SPECIAL_INPUTS = {f"--finetune {kind} {name}": ("--finetune", kind, name, kind.split()[0])
                  for kind in ("FIFO", "socket", "character device") for name in ("w.safetensors", "w.pth")}
SPECIAL_INPUTS.update({f"{flag} FIFO": (flag, "FIFO", name, "FIFO") for flag, name in (
    ("-c", "config.yaml"), ("--resume", "run"), ("--data-path", "data"))})


@pytest.mark.parametrize("case", list(SPECIAL_INPUTS))
def test_a_user_given_path_that_is_a_fifo_socket_or_device_is_refused_before_it_is_opened(tiny_imagefolder, tmp_path,
                                                                                         case):
    import subprocess
    import sys

    from test_train import tiny_run

    flag, kind, name, said = SPECIAL_INPUTS[case]
    path = special_path(tmp_path, kind, name)
    out = tmp_path / "out"
    script = "finetune" if flag == "--finetune" else "train"
    # in a process of its own: a reader stuck in open() inside safetensors' Rust never returns to Python's handlers
    code = f"import sys; sys.path.insert(0, {str(Path(train.__file__).parent)!r}); import {script}; {script}.cli()"
    proc = subprocess.run([sys.executable, "-c", code, *tiny_run(tiny_imagefolder, out, flag, str(path))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and re.search(f"{flag} {path} is a {said}.*nothing is read from it", proc.stderr), \
        proc.stderr[-2000:]
    assert not out.exists()


def test_a_fifo_in_an_image_folder_is_one_message_naming_it_not_a_hang(tiny_imagefolder, tmp_path, deadline):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_imagefolder, data)
    evil = fifo(data / "train" / "class_0" / "zz_evil.png")
    with pytest.raises(DatasetError, match=f"cannot read image {evil}.*FIFO.*replace or delete the file"):
        train.main(["--data-set", "FOLDER", "--data-path", str(data), "--input-size", "32", "--batch-size", "4",
                    "--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=8", "embed_dim=32", "depth=1",
                    "num_heads=2", "--num-workers", "0", "--no-progress", "--output-dir", str(tmp_path / "run")])


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 75), (signal.SIGINT, 130)])
def test_a_signal_while_the_start_up_hangs_ends_the_process_at_once(tiny_imagefolder, tmp_path, monkeypatch, capsys,
                                                                     deadline, sig, code):
    import time

    import tract.data
    from test_train import tiny_run

    build = tract.data.build_dataset

    def hang(*args, **kwargs):  # a start-up that never ends (a stalled file system), signalled by the cluster
        os.kill(os.getpid(), sig)
        while True:
            time.sleep(0.1)
        return build(*args, **kwargs)

    monkeypatch.setattr(tract.data, "build_dataset", hang)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(tiny_run(tiny_imagefolder, out))
    assert e.value.code == code
    assert f"resume with --resume {out}" in capsys.readouterr().out


# ---- no write of a checkpoint, a rewind or an export follows a link planted during the run --------------------------

def plant_as_another_user(folder: Path, names, target: Path) -> None:
    """What a co-user of a shared (group-writable) run folder can do while train.py writes: plant links named
    ``names`` to ``target`` in every ``.tmp-*`` folder and ``.*`` temporary file name it can see in ``folder``. Run as
    uid 65534 (nobody) where this process may change its uid (root); as the same user otherwise, where only what a
    name tells (and the folder's mode) can be checked."""
    import subprocess

    script = ('for d in "$1"/.tmp-* "$1"/.model.safetensors*; do for n in ' + " ".join(names) +
              '; do ln -s "$2" "$d/$n" 2>/dev/null; done; done; ln -s "$2" "$1/.model.safetensors.tmp" 2>/dev/null; '
              "true")
    become = (lambda: (os.setgid(65534), os.setuid(65534))) if os.geteuid() == 0 else None
    subprocess.run(["sh", "-c", script, "sh", str(folder), str(target)], preexec_fn=become, check=True, timeout=30)


@pytest.fixture
def shared_folder(tmp_path):
    """A run's parent folder others can enter and a umask of 0, as a group-writable shared project folder gives;
    the outside file a co-user points links at, and its content."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(dir="/tmp"))
    os.chmod(base, 0o777)
    outside = base / "outside.txt"
    outside.write_text("someone else's")
    os.chmod(outside, 0o666)
    umask = os.umask(0)
    yield base, outside
    os.umask(umask)
    shutil.rmtree(base)


def test_a_checkpoint_is_written_in_a_folder_no_one_else_can_enter_so_no_planted_link_is_written_through(
        two_epoch_run, shared_folder, monkeypatch):
    from accelerate import Accelerator

    base, outside = shared_folder
    out = copy_run(two_epoch_run[0], base / "run")
    for path in [out, *out.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, 0o777 if path.is_dir() else 0o666)
    save, modes = Accelerator.save_state, []

    def save_while_planted(self, folder, *args, **kwargs):
        modes.append(os.stat(folder).st_mode & 0o777)
        plant_as_another_user(out / "checkpoints", ["optimizer.bin", "random_states_0.pkl", "model.safetensors"],
                              outside)
        return save(self, folder, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_while_planted)
    train.main(["--resume", str(out), "--epochs", "3"])
    assert outside.read_text() == "someone else's"
    assert modes == [0o700] and os.readlink(out / "checkpoints" / "last") == "epoch-0003"
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_the_final_export_is_written_in_a_private_folder_never_through_a_planted_link(two_epoch_run, shared_folder,
                                                                                      monkeypatch):
    import safetensors.torch

    base, outside = shared_folder
    out = copy_run(two_epoch_run[0], base / "run")
    os.chmod(out, 0o777)
    (out / "model.safetensors").unlink()
    save, modes = safetensors.torch.save_file, []

    def save_while_planted(tensors, filename, *args, **kwargs):
        if "checkpoints" not in filename:
            modes.append(os.stat(Path(filename).parent).st_mode & 0o777)
            plant_as_another_user(out, ["model.safetensors"], outside)
        return save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_while_planted)
    train.main(["--resume", str(out)])  # the kill came before the export: the resume writes it
    assert outside.read_text() == "someone else's"
    assert modes and set(modes) == {0o700}
    assert not (out / "model.safetensors").is_symlink() and same_weights(out / "model.safetensors",
                                                                        two_epoch_run[0] / "model.safetensors")


def test_rewind_picks_a_fresh_folder_and_never_copies_the_log_through_a_planted_link(two_epoch_run, tmp_path,
                                                                                    capsys):
    import time

    out = copy_run(two_epoch_run[0], tmp_path / "run")
    outside = tmp_path / "outside.txt"
    outside.write_text("someone else's")
    now = time.time()
    for second in range(-1, 30):  # every name --rewind could choose in the next half minute, pre-planted
        planted = out / f"rewound-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now + second))}"
        planted.mkdir()
        (planted / "log.txt").symlink_to(outside)
    argv = ["--resume", str(out / "checkpoints" / "epoch-0001"), "--rewind", "--epochs", "2"]
    train.main(argv)
    assert outside.read_text() == "someone else's"
    aside = re.search(r"its log as it was are in (\S+)", capsys.readouterr().out)[1]
    assert not Path(aside, "log.txt").is_symlink() and [json.loads(line)["epoch"] for line in
                                                       Path(aside, "log.txt").read_text().splitlines()] == [1, 2]
    train.main(argv)  # rewound again within the same second: another fresh folder
    assert outside.read_text() == "someone else's"
    assert re.search(r"its log as it was are in (\S+)", capsys.readouterr().out)[1] != aside


# ---- someone else's folder, someone else holding the lock ----------------------------------------------------------

def test_a_new_run_refuses_a_folder_that_holds_files_but_no_run_and_takes_an_empty_one(tiny_imagefolder, tmp_path):
    from test_train import tiny_run

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    files = {"model.safetensors": b"their weights", "config.json": b"{}", "summary.csv": b"epoch,their_metric\n"}
    for name, content in files.items():
        (theirs / name).write_bytes(content)
    with pytest.raises(ConfigError, match=f"--output-dir {theirs} holds files that are not a train.py run's .*config.json"
                                          ".*Choose another --output-dir"):
        train.main(tiny_run(tiny_imagefolder, theirs))
    assert {p.name: p.read_bytes() for p in theirs.iterdir()} == files
    empty = tmp_path / "empty"
    empty.mkdir()
    train.main(tiny_run(tiny_imagefolder, empty))
    assert len(log_lines(empty)) == 1


def test_the_lock_is_readable_by_its_owner_only(two_epoch_run, tmp_path):
    out = copy_run(two_epoch_run[0], tmp_path / "run")
    os.chmod(out / "run.lock", 0o644)  # as an earlier version left it
    train.main(["--resume", str(out), "--epochs", "3"])
    assert os.stat(out / "run.lock").st_mode & 0o777 == 0o600
    assert os.stat(two_epoch_run[0] / "run.lock").st_mode & 0o777 == 0o600


def test_a_lock_held_by_another_process_does_not_blame_the_owners_own_dead_run(two_epoch_run, tmp_path):
    import subprocess
    import sys

    out = copy_run(two_epoch_run[0], tmp_path / "run")
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(ended.stdout)
    (out / "run.lock").write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": dead,
                                              "started": "2024-01-01 00:00:00"}))
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); "
                               "time.sleep(60)", str(out / "run.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError) as e:
            train.main(["--resume", str(out), "--epochs", "3"])
    finally:
        holder.kill()
        holder.wait()
    assert f"process {dead} on" not in str(e.value)
    assert re.search(f"in use by process {holder.pid} on .*not the run that wrote run.lock \\(its process {dead} has "
                     "ended\\)", str(e.value))


# ---- output paths TensorBoard cannot write: refused before anything is created -------------------------------------

def test_an_output_dir_that_is_not_utf8_or_too_long_is_one_message_and_nothing_is_left(tiny_imagefolder, tmp_path):
    from test_train import tiny_run

    before = sorted(tmp_path.iterdir())
    not_utf8 = os.fsdecode(bytes(tmp_path) + b"/run-\xff")
    with pytest.raises(ConfigError, match="is not UTF-8.*choose another --output-dir"):
        train.main(tiny_run(tiny_imagefolder, not_utf8))
    deep = tmp_path.joinpath(*["d" * 200] * 20)  # each name within NAME_MAX, the whole beyond PATH_MAX with the files
    with pytest.raises(ConfigError, match="is too long.*choose a shorter --output-dir"):
        train.main(tiny_run(tiny_imagefolder, deep))
    assert sorted(tmp_path.iterdir()) == before
