"""The CUDA paths of issue 15, tested on the CPU: through train.py where a CPU shows the defect, else through their
logic on constructed inputs (mocked device counts and capabilities, constructed checkpoint files), as each says."""
import os
from pathlib import Path

import pytest
import torch

import train
from test_train import fresh_accelerate_state, log_lines, tiny_run  # noqa: F401 (an autouse fixture)


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
    from tract.config import ConfigError
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
    from tract.config import ConfigError
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
    from tract.config import ConfigError
    from tract.runtime import check_cuda, cpu_launch

    for key in ("ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION", *TORCHRUN):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("sys.argv", ["train.py", "--epochs", "1", "--data-path", "my data"])
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
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
    from tract.config import ConfigError
    from tract.runtime import check_precision

    fake_gpus(monkeypatch, (7, 0), CUDA13_ARCHS, "Tesla V100-SXM2-32GB")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")
    with pytest.raises(ConfigError, match="--mixed-precision fp16"):
        check_precision("bf16")


def test_a_launch_whose_processes_accelerate_does_not_join_is_refused(monkeypatch):
    from types import SimpleNamespace

    from tract.config import ConfigError
    from tract.runtime import check_world_size

    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="started 4 processes, but Accelerate runs 1"):
        check_world_size(SimpleNamespace(num_processes=1, distributed_type="NO"))
    check_world_size(SimpleNamespace(num_processes=4, distributed_type="MULTI_GPU"))


def floors(text: str) -> dict:
    """{package: minimum version} of the 'name>=version' requirements in ``text``."""
    import re

    return {m[1]: m[2] for m in re.finditer(r'(?m)^\s*"?([A-Za-z0-9_.-]+)>=([0-9.]+)', text)}


def test_version_floors_agree_and_the_apis_the_code_needs_from_them_are_there():
    from pathlib import Path

    from packaging.version import Version

    repo = Path(__file__).resolve().parents[1]
    required = floors((repo / "requirements.txt").read_text())
    declared = floors((repo / "pyproject.toml").read_text())
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


def test_gpu_check_runs_its_whole_plan_at_toy_size_on_the_cpu(tmp_path):
    import csv
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "check"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    done = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_check.sh"), "--cpu", str(out)], cwd=tmp_path,
                          env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()[1:]]
    assert [(name, status) for name, status, _ in steps] == [
        ("env", "0"), ("overhead", "0"), ("throughput", "0"), ("syncs", "0"), ("convergence", "0")]
    assert "no CUDA GPU" in (out / "env.txt").read_text()
    assert "| cifar_vit | 4 |" in (out / "overhead.md").read_text()
    assert "| compile + TrAct |" in (out / "throughput.md").read_text()
    syncs = (out / "syncs.txt").read_text()
    assert "TrAct, eager: 3 updates" in syncs and "TrAct, compiled (aot_eager): 3 updates" in syncs
    with open(out / "convergence" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {row["lam"] for row in rows} >= {"0.1"} and len({row["lam"] for row in rows}) == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["steps.tsv", "convergence", *(f"{s}.{e}" for s in ("env", "overhead", "throughput", "syncs", "convergence")
                                       for e in (("txt" if s in ("env", "syncs", "convergence") else "md"), "log"))])
