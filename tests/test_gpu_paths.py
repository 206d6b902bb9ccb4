"""The CUDA paths of issue 15, tested on the CPU: through train.py where a CPU shows the defect, else through their
logic on constructed inputs (mocked device counts and capabilities, constructed checkpoint files), as each says."""
import os
import sys
from pathlib import Path

import pytest
import torch

import train
from test_train import fresh_accelerate_state, log_lines, tiny_run  # noqa: F401 (an autouse fixture)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.fixture(autouse=True)
def no_accelerate_state_from_before():
    """Accelerate keeps process-wide singletons: a run of another test module must not decide this one's precision."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch's own inductor internals
def test_compile_with_tract_under_bf16_autocast_trains(tiny_imagefolder, tmp_path):
    # Every GPU launch config sets bf16 or fp16; dynamo refused TrAct's autocast-off block in backward.
    train.main(tiny_run(tiny_imagefolder, tmp_path / "o", "--mixed-precision", "bf16", "--torchcompile", "aot_eager",
                        "--tract", "--max-updates-per-epoch", "2"))
    assert log_lines(tmp_path / "o")[0]["train_loss"] > 0


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch's own inductor internals
def test_compiled_tract_builds_its_gram_in_full_float32_whatever_the_matmul_precision(monkeypatch):
    import timm

    import tract.method as method
    from tract import apply_tract

    seen = []
    add_gram = method._add_gram

    def recording(gram, rows):
        seen.append(torch.get_float32_matmul_precision())  # when the product runs, not when a graph is traced
        return add_gram(gram, rows)

    monkeypatch.setattr(method, "_add_gram", recording)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 allowed, as train.py sets it on CUDA
    try:
        model = timm.create_model("vit_tiny_patch16_224", patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                  img_size=32)
        apply_tract(model, lam=0.1)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="inductor", fullgraph=True)
        for _ in range(2):  # the first call traces, the second only runs the compiled graphs
            seen.clear()
            compiled(torch.randn(16, 3, 32, 32)).sum().backward()  # b = 256 > n = 192: the Gram form
            assert seen == ["highest"]
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)


def test_seeded_batches_in_the_main_process_leave_the_cuda_generators_alone(monkeypatch):
    from torch.utils.data import TensorDataset

    from tract.data import SeededBatches

    data = SeededBatches(TensorDataset(torch.arange(6)))
    torch.manual_seed(1)
    before = torch.get_rng_state()
    touched = []
    for name in ("manual_seed", "manual_seed_all", "set_rng_state", "set_rng_state_all"):  # what would reseed CUDA
        monkeypatch.setattr(torch.cuda, name, lambda *a, _name=name, **k: touched.append(_name))
    assert [int(x[0]) for x in data.__getitems__([(7, 0), (7, 3)])] == [0, 3]
    monkeypatch.undo()
    assert touched == [] and torch.equal(torch.get_rng_state(), before)  # CPU state put back, CUDA never touched
    torch.manual_seed(7)
    expected = torch.rand(1)
    random_dataset = SeededBatches([None])
    random_dataset.dataset = type("Draw", (), {"__getitem__": lambda self, i: torch.rand(1)})()
    assert torch.equal(random_dataset.__getitems__([(7, 0)])[0], expected)  # seeded as torch.manual_seed(7) seeds


def philox(seed: int, offset: int) -> torch.Tensor:
    """A CUDA generator state as torch writes it: the uint64 seed, then the int64 offset, little-endian bytes."""
    return torch.tensor(list(seed.to_bytes(8, "little") + offset.to_bytes(8, "little")), dtype=torch.uint8)


@pytest.mark.parametrize("saved, expected", [
    ([philox(5, 0)] * 3 + [philox(5, 48)] + [philox(5, 0)] * 4, philox(5, 48)),  # 1 x 8 GPUs saved, process 3's GPU
    ([philox(6, 96)], philox(6, 96)),  # one GPU per task saved, restored on a machine where 4 are visible
    ([philox(7, 0)] * 4, philox(7, 0)),  # nothing drawn on a GPU yet
], ids=["more_states_than_visible", "fewer_states_than_visible", "none_advanced"])
def test_resume_restores_only_this_processs_gpu_generator_from_the_state_that_advanced(monkeypatch, saved,
                                                                                        expected):
    from tract.checkpoint import _restore_cuda_rng

    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((state, device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("every GPU's state set"))
    device = torch.device("cuda", 2)
    _restore_cuda_rng(saved, device, "random_states_3.pkl", exact=True, log=pytest.fail)
    assert len(calls) == 1 and torch.equal(calls[0][0], expected) and calls[0][1] == device


@pytest.mark.parametrize("saved", [[philox(5, 48), philox(5, 0), philox(5, 64)], []], ids=["ambiguous", "none"])
def test_resume_without_a_recognisable_gpu_state_is_refused_or_told_inexact(monkeypatch, saved):
    from tract.checkpoint import CheckpointError, _restore_cuda_rng

    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: pytest.fail("a state was guessed"))
    with pytest.raises(CheckpointError, match="--resume-inexact"):
        _restore_cuda_rng(saved, torch.device("cuda", 0), "random_states_0.pkl", exact=True, log=print)
    told = []
    _restore_cuda_rng(saved, torch.device("cuda", 0), "random_states_0.pkl", exact=False, log=told.append)
    assert len(told) == 1 and "no longer exact" in told[0]


def test_a_model_evaluated_off_the_accelerators_device_is_gathered_on_that_device():
    # --model-ema-force-cpu --model-ema-eval on GPUs: the EMA runs on the CPU, but NCCL gathers only device tensors.
    # The accelerator's device is mocked as "meta" (only the CPU is here): what reaches the gather must be on it.
    from torch import nn

    from tract.engine import evaluate

    gathered = []

    class Accelerator:
        device = torch.device("meta")
        is_main_process = True

        @staticmethod
        def autocast():
            import contextlib

            return contextlib.nullcontext()

        @staticmethod
        def gather_for_metrics(tensors):
            gathered.extend(t.device for t in tensors)
            return tensors

    loader = [(torch.randn(4, 6), torch.tensor([0, 1, 2, 1]))]
    with pytest.raises(NotImplementedError):  # the meta totals cannot be read back: the gather is what is checked
        evaluate(nn.Linear(6, 3), loader, Accelerator(), progress=False)
    assert gathered == [torch.device("meta")] * 3


def test_the_ema_is_built_from_the_model_on_its_device_and_follows_it(tiny_imagefolder, tmp_path, monkeypatch):
    # timm's ModelEmaV3 turns foreach updates off when built from a model on another device than the EMA's
    import timm.utils

    built = []
    real = timm.utils.ModelEmaV3

    def recording(model, **kwargs):
        built.append((next(model.parameters()).device, kwargs.get("device")))
        return real(model, **kwargs)

    monkeypatch.setattr(timm.utils, "ModelEmaV3", recording)
    train.main(tiny_run(tiny_imagefolder, tmp_path / "o", "--model-ema", "--max-updates-per-epoch", "1"))
    assert built == [(torch.device("cpu"), None)]  # the accelerator's device; the EMA on the model's own


CUDA13_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # torch 2.14's PyPI wheel


def fake_gpus(monkeypatch, capability, arch_list, name="NVIDIA GPU"):
    """torch.cuda as it answers on a machine with one GPU of ``capability`` and a torch built for ``arch_list``."""
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arch_list)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)


def test_a_v100_under_a_torch_without_sm_70_is_refused_naming_the_cuda_12_6_build(monkeypatch):
    from tract.errors import ConfigError
    from tract.runtime import LEGACY_INDEX_URL, check_cuda

    fake_gpus(monkeypatch, (7, 0), CUDA13_ARCHS, "Tesla V100-SXM2-32GB")
    with pytest.raises(ConfigError, match=r"V100.*sm_70.*no kernels") as told:
        check_cuda()
    assert f"TORCH_INDEX_URL={LEGACY_INDEX_URL} bash scripts/env.sh" in str(told.value)
    assert LEGACY_INDEX_URL == "https://download.pytorch.org/whl/cu126"


@pytest.mark.parametrize("capability, arch_list, runs", [
    ((8, 6), CUDA13_ARCHS, True),  # A40
    ((8, 9), ["sm_80", "sm_86"], True),  # binary code of the same major, lower minor
    ((9, 0), ["sm_80", "sm_86"], False),
    ((9, 0), ["sm_80", "compute_80"], True),  # PTX: compiled by the driver
    ((7, 0), ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"], True),  # the CUDA 12.6 build
])
def test_gpu_architectures_are_checked_against_the_torch_builds_kernels(monkeypatch, capability, arch_list, runs):
    from tract.errors import ConfigError
    from tract.runtime import check_cuda

    fake_gpus(monkeypatch, capability, arch_list)
    if runs:
        check_cuda()
    else:
        with pytest.raises(ConfigError, match=f"sm_{capability[0]}{capability[1]}.*get_arch_list"):
            check_cuda()


TORCHRUN = {"WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}


# What each launch puts in a process's environment (accelerate 1.15, read from a real launch of each on this machine)
@pytest.mark.parametrize("env, refused, made_cpu", [
    ({**TORCHRUN, "ACCELERATE_MIXED_PRECISION": "fp16"}, True, False),  # v100x8.yaml, and v100x8_multinode.yaml
    ({**TORCHRUN, "ACCELERATE_MIXED_PRECISION": "bf16"}, True, False),  # a40x4.yaml, and a40x4_multinode.yaml
    ({"ACCELERATE_USE_CPU": "False", "ACCELERATE_MIXED_PRECISION": "bf16"}, True, False),  # gpu1.yaml: one process
    ({**TORCHRUN, "ACCELERATE_MIXED_PRECISION": "no"}, False, True),  # cpu.yaml: its use_cpu is not passed on
    ({"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "bf16"}, False, False),  # gpu1.yaml with --cpu
    ({**TORCHRUN, "ACCELERATE_USE_CPU": "1", "ACCELERATE_MIXED_PRECISION": "fp16"}, False, False),  # asked in env
    ({}, False, False),  # plain python train.py on a CPU machine
], ids=["v100x8", "a40x4", "gpu1", "cpu_yaml", "gpu1_with_cpu_flag", "env_asks_cpu", "plain_python"])
def test_a_gpu_launch_without_usable_cuda_is_refused_and_only_a_cpu_launch_is_made_one(monkeypatch, env, refused,
                                                                                        made_cpu):
    from tract.errors import ConfigError
    from tract.runtime import check_cuda, cpu_launch

    for key in ("ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION", *TORCHRUN):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("sys.argv", ["train.py", "--epochs", "1", "--data-path", "my data"])
    monkeypatch.chdir(REPO)
    if refused:
        with pytest.raises(ConfigError, match=r"configured for GPUs.*no usable GPU.*nvidia-smi.*TORCH_INDEX_URL=") as e:
            check_cuda()
        assert str(e.value).endswith("To train on the CPU: accelerate launch --config_file launch/accelerate/cpu.yaml "
                                     "train.py --epochs 1 --data-path 'my data'")
    else:
        check_cuda()
    assert cpu_launch() is made_cpu
    assert os.environ.get("ACCELERATE_USE_CPU") == ("1" if made_cpu else env.get("ACCELERATE_USE_CPU"))


def test_bf16_with_gpu1_yaml_on_a_gpu_without_bf16_is_refused(monkeypatch):
    # gpu1.yaml's launcher sets ACCELERATE_USE_CPU=False, which a check for a non-empty value took for True
    from tract.errors import ConfigError
    from tract.runtime import check_precision

    fake_gpus(monkeypatch, (7, 0), CUDA13_ARCHS, "Tesla V100-SXM2-32GB")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")
    with pytest.raises(ConfigError, match="--mixed-precision fp16"):
        check_precision("bf16")


def test_a_launch_whose_processes_accelerate_does_not_join_is_refused(monkeypatch):
    from types import SimpleNamespace

    from tract.errors import ConfigError
    from tract.runtime import check_world_size

    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="started 4 processes, but Accelerate runs 1"):
        check_world_size(SimpleNamespace(num_processes=1, distributed_type="NO"))
    check_world_size(SimpleNamespace(num_processes=4, distributed_type="MULTI_GPU"))


def test_version_floors_agree_and_the_apis_the_code_needs_from_them_are_there():
    from packaging.version import Version

    from gpu_env import floors  # what gpu_check.sh's env step checks on the GPU machine

    required = floors((REPO / "requirements.txt").read_text())
    declared = floors((REPO / "pyproject.toml").read_text())
    assert {k: required[k] for k in declared} == declared  # the package and the environment ask for the same
    assert {k: required[k] for k in ("torch", "torchvision", "timm", "accelerate")} == {
        "torch": "2.5", "torchvision": "0.20", "timm": "1.0.30", "accelerate": "1.1"}
    import accelerate
    import timm
    import torchvision

    for module in (torch, torchvision, timm, accelerate):
        assert Version(module.__version__.split("+")[0]) >= Version(required[module.__name__])
    # torch 2.5: what tract uses that 2.1-2.4 lack
    with torch.serialization.safe_globals([]):
        pass
    assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and not torch.is_autocast_enabled("cpu")
    assert callable(torch.library.custom_op) and callable(torch.compiler.is_compiling)
    # accelerate 1.1: the numpy globals an RNG-state file needs under weights_only=True
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    assert TORCH_SAFE_GLOBALS
    # timm 1.0.30: PrefetchLoader keeps one side stream (made lazily) for its lifetime
    from timm.data.loader import PrefetchLoader

    assert PrefetchLoader([], device=torch.device("cpu")).stream is None


GPU_CHECK_TABLES = ["env.txt", "overhead.md", "throughput.md", "syncs.txt", "convergence.txt"]


def timm_wheel(folder: Path) -> Path:
    """A wheel of the timm installed here (the GPU machine is offline, and so is CI: built from site-packages)."""
    import zipfile

    import timm

    site = Path(timm.__file__).parents[1]
    info = site / f"timm-{timm.__version__}.dist-info"
    folder.mkdir(parents=True)
    wheel = folder / f"timm-{timm.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path in [*(site / "timm").rglob("*"), *info.rglob("*")]:
            if path.is_file() and "__pycache__" not in path.parts and path.name not in ("INSTALLER", "RECORD"):
                z.write(path, path.relative_to(site))
        z.writestr(f"{info.name}/RECORD", "")
    return wheel


def gpu_check_env(tmp_path: Path) -> dict:
    """gpu_check.sh's environment on a machine whose timm is older than the floor, with a newer one carried."""
    old = tmp_path / "old-site" / "timm-1.0.0.dist-info"
    old.mkdir(parents=True)
    (old / "METADATA").write_text("Metadata-Version: 2.1\nName: timm\nVersion: 1.0.0\n")
    timm_wheel(tmp_path / "carry" / "wheels")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "PYTHONPATH", "TORCHINDUCTOR"))}
    return {**env, "PYTHON": sys.executable, "PYTHONPATH": str(tmp_path / "old-site"),
            "GPU_CHECK_CARRY": str(tmp_path / "carry"), "TMPDIR": str(tmp_path / "tmp")}


def archive(out: Path) -> dict:
    """{member name: text} of the folder gpu_check/ in out/gpu_check.tar.gz."""
    import tarfile

    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        return {m.name: tar.extractfile(m).read().decode(errors="replace") for m in tar.getmembers() if m.isfile()}


def test_gpu_check_runs_its_whole_plan_at_toy_size_on_the_cpu_into_one_archive_and_one_summary(tmp_path):
    import csv
    import io
    import subprocess

    env = gpu_check_env(tmp_path)
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "check"
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu", str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    # what comes back from the lent GPU machine: at most 8 files, here 2
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tar.gz", "summary.md"]
    files = archive(out)
    steps = [line.split("\t") for line in files["gpu_check/steps.tsv"].splitlines()[1:]]
    assert [(name, status) for name, status, _, _ in steps] == [
        ("env", "0"), ("overhead", "0"), ("throughput", "0"), ("syncs", "0"), ("convergence", "0")]
    assert sorted(files) == sorted(["gpu_check/steps.tsv", "gpu_check/convergence/results.csv",
                                    "gpu_check/convergence/results.md", "gpu_check/convergence/convergence.png",
                                    *(f"gpu_check/{t}" for t in GPU_CHECK_TABLES),
                                    *(f"gpu_check/{t.split('.')[0]}.log" for t in GPU_CHECK_TABLES)])
    # the machine's timm was below the floor: the carried wheel was installed into a temporary folder and used
    import timm

    env_txt = files["gpu_check/env.txt"]
    (timm_row,) = [line for line in env_txt.splitlines() if line.startswith("| timm |")]
    cells = [c.strip() for c in timm_row.strip("|").split("|")]
    assert cells[:3] == ["timm", "1.0.30", timm.__version__] and cells[4] == "yes"
    assert cells[3].startswith(str(tmp_path / "tmp")) and cells[3].endswith("/site")
    assert "no CUDA GPU" in env_txt and "| torch | 2.5 |" in env_txt and "| safetensors | 0.4 |" in env_txt
    assert "| cifar_vit |" in files["gpu_check/overhead.md"]
    assert "| base |" in files["gpu_check/throughput.md"] and "| compile + TrAct |" in files["gpu_check/throughput.md"]
    syncs = files["gpu_check/syncs.txt"]
    assert "TrAct, eager: 3 updates" in syncs and "TrAct, compiled (aot_eager): 3 updates" in syncs
    rows = list(csv.DictReader(io.StringIO(files["gpu_check/convergence/results.csv"])))
    assert len(rows) == 2 and {row["lam"] for row in rows} >= {"0.1"} and len({row["lam"] for row in rows}) == 2
    summary = (out / "summary.md").read_text()
    for name in ("env", "overhead", "throughput", "syncs", "convergence"):
        assert f"| {name} | 0 |" in summary
    assert syncs in summary and files["gpu_check/throughput.md"] in summary
    assert list((tmp_path / "tmp").iterdir()) == []  # the scratch folder (caches, data, runs) is gone


def test_gpu_check_stopped_mid_plan_still_leaves_the_archive_of_the_steps_that_ended(tmp_path):
    import signal
    import subprocess
    import time

    env = gpu_check_env(tmp_path)
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "check"
    script = subprocess.Popen(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu", str(out)], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "tmp").glob("*/gpu_check/overhead.log")) and script.poll() is None and \
            time.monotonic() < deadline:
        time.sleep(0.05)  # the second step (overhead) has started: its log is there
    script.send_signal(signal.SIGTERM)
    _, stderr = script.communicate(timeout=60)
    assert script.returncode == 143, stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tar.gz", "summary.md"]
    files = archive(out)
    steps = [line.split("\t")[:2] for line in files["gpu_check/steps.tsv"].splitlines()[1:]]
    assert steps == [["env", "0"], ["overhead", "stopped"]]
    assert "| timm | 1.0.30 |" in files["gpu_check/env.txt"]
    summary = (out / "summary.md").read_text()
    assert "| overhead | stopped |" in summary and "| convergence | not run |" in summary
    assert list((tmp_path / "tmp").iterdir()) == []


def test_gpu_check_prepare_fills_one_ignored_folder_and_prints_the_carry_list_and_command(tmp_path):
    import gzip
    import shutil
    import subprocess

    import timm

    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(REPO / "benchmarks" / "gpu_check.sh", repo / "benchmarks")
    shutil.copy(REPO / ".gitignore", repo)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    fmnist = tmp_path / "fmnist"
    fmnist.mkdir()
    names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz"]
    for name in names:
        (fmnist / name).write_bytes(gzip.compress(name.encode()))
    wheels = repo / "gpu_carry" / "wheels"
    wheels.mkdir(parents=True)
    (wheels / f"timm-{timm.__version__}-py3-none-any.whl").write_bytes(b"a wheel pip download fetched earlier")
    env = {**os.environ, "PYTHON": sys.executable, "FMNIST_DIR": str(fmnist)}
    env.pop("GPU_CHECK_CARRY", None)
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--prepare"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert 'carry: ["gpu_carry"]' in done.stdout.splitlines()
    assert "command: bash benchmarks/gpu_check.sh" in done.stdout.splitlines()
    for name in names:
        assert (repo / "gpu_carry" / "fashion-mnist" / name).read_bytes() == (fmnist / name).read_bytes()
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo, capture_output=True,
                            text=True, check=True).stdout
    assert "gpu_carry" not in status  # ignored: it travels only as carry
    refused = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--prepare"], cwd=repo,
                             env={**env, "GPU_CHECK_CARRY": "benchmarks"}, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "not a folder git ignores" in refused.stderr
