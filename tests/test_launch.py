"""launch/: Accelerate configs, SLURM scripts and multinode.sh, run against fake srun / scontrol / scancel / accelerate.

The fakes are tiny Python scripts on PATH that record their argv and environment as JSON; the fake srun runs its
command once per node with that node's SLURM_NODEID, as SLURM does. Expected command lines are read back with
Accelerate's own `accelerate launch` parser and the project's train.py parser.
"""
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SHELL_SCRIPTS = sorted([*LAUNCH.rglob("*.sh"), *LAUNCH.rglob("*.sbatch")])
SBATCH = sorted(LAUNCH.glob("slurm/*.sbatch"))
JOB_ID = 4242

# name -> (processes per machine, multi-machine, mixed precision, CPU), as the file names promise
ACCELERATE_CONFIGS = {
    "a40x4.yaml": (4, False, "bf16", False),
    "a40x4_multinode.yaml": (4, True, "bf16", False),
    "v100x8.yaml": (8, False, "fp16", False),
    "v100x8_multinode.yaml": (8, True, "fp16", False),
    "gpu1.yaml": (1, False, "bf16", False),
    "cpu.yaml": (2, False, "no", True),
}

# sbatch script -> (training script, train config, Accelerate config, GPUs per node, global batch, max per GPU)
SLURM_JOBS = {
    "pretrain_vit_s_a40.sbatch": ("train.py", "configs/deit3_vit_s_400ep.yaml", "a40x4_multinode.yaml", 4, 2048, 256),
    "pretrain_vit_b_v100.sbatch": ("train.py", "configs/deit3_vit_b_400ep_192.yaml", "v100x8_multinode.yaml", 8, 2048,
                                   256),
    "finetune_vit_b_v100.sbatch": ("finetune.py", "configs/deit3_vit_b_ft224.yaml", "v100x8_multinode.yaml", 8, 512,
                                   64),
    "finetune_vit_s_a40.sbatch": ("finetune.py", "configs/deit3_vit_s_ft224.yaml", "a40x4_multinode.yaml", 4, 512,
                                  128),
    "transfer_vit_s_a40.sbatch": ("finetune.py", "configs/transfer_cifar100.yaml", "a40x4_multinode.yaml", 4, 768, 192),
}
# Arguments a user gives after the script name: (job arguments, the finetune weights among them or None)
JOB_ARGS = {
    "pretrain_vit_s_a40.sbatch": ([], None),
    "pretrain_vit_b_v100.sbatch": ([], None),
    "finetune_vit_b_v100.sbatch": (["output/slurm/vit_b_192"], "output/slurm/vit_b_192"),
    "finetune_vit_s_a40.sbatch": (["output/slurm/vit_s_400"], "output/slurm/vit_s_400"),
    "transfer_vit_s_a40.sbatch": (["cifar100", "output/slurm/vit_s_800"], "output/slurm/vit_s_800"),
}


# ---------------------------------------------------------------------------------------------- Accelerate configs
def test_every_accelerate_config_is_listed_with_its_expectations():
    assert sorted(p.name for p in LAUNCH.rglob("*.yaml")) == sorted(ACCELERATE_CONFIGS)


@pytest.mark.parametrize("name", sorted(ACCELERATE_CONFIGS))
def test_accelerate_config_loads_with_accelerate_and_has_the_gpus_and_precision_of_its_name(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    per_machine, multinode, precision, cpu = ACCELERATE_CONFIGS[name]
    cfg = load_config_from_file(str(LAUNCH / "accelerate" / name))
    assert isinstance(cfg, ClusterConfig)
    assert cfg.mixed_precision == precision
    assert cfg.use_cpu is cpu
    assert cfg.num_processes == per_machine * cfg.num_machines  # num_processes is the total over all machines
    if multinode:
        assert cfg.num_machines >= 2 and cfg.rdzv_backend == "c10d" and cfg.same_network is False
    else:
        assert cfg.num_machines == 1
    expected_type = DistributedType.NO if per_machine == 1 else DistributedType.MULTI_GPU
    assert cfg.distributed_type == expected_type


@pytest.mark.parametrize("name", sorted(ACCELERATE_CONFIGS))
def test_accelerate_launch_resolves_each_config_to_its_process_count(name):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    per_machine, multinode, precision, _ = ACCELERATE_CONFIGS[name]
    argv = ["--config_file", str(LAUNCH / "accelerate" / name), "--main_process_ip", "10.0.0.1", "train.py"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    assert args.num_processes == per_machine * (2 if multinode else 1)
    assert args.mixed_precision == precision
    assert bool(args.multi_gpu) == (per_machine > 1)


# ------------------------------------------------------------------------------------------------- shell scripts
def test_there_are_the_five_sbatch_scripts_and_multinode_sh():
    assert sorted(p.name for p in SBATCH) == sorted(SLURM_JOBS)
    assert (LAUNCH / "multinode.sh").stat().st_mode & stat.S_IXUSR


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_script_passes_bash_n_and_shellcheck_without_any_finding(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed (Debian package shellcheck; scripts/env.sh installs it)")
    out = subprocess.run(["shellcheck", "-x", "--severity=style", str(script.relative_to(REPO))], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_sbatch_header_asks_one_task_per_node_a_warning_signal_requeue_and_per_job_logs(script):
    header = [line.split(None, 1)[1] for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    for directive in ("--ntasks-per-node=1", "--requeue", "--open-mode=append", "--output=logs/%x-%j.out"):
        assert directive in header
    # B: sends the warning to the batch shell only, which forwards it; without B: it would reach the agent too
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", d) for d in header)
    gpus = SLURM_JOBS[script.name][3]
    assert f"--gres=gpu:{gpus}" in header


# ------------------------------------------------------------------------------------------------------ the fakes
_RECORD = """\
import json, os, sys, time
def record(name, **extra):
    path = os.path.join(os.environ["FAKE_REC"], f"{name}.{time.time_ns()}.{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump({"argv": sys.argv[1:], "env": dict(os.environ), **extra}, f)
"""
FAKES = {
    "accelerate": _RECORD + """
import signal
ignored = int(next(l for l in open("/proc/self/status") if l.startswith("SigIgn:")).split()[1], 16)
record("accelerate", usr1_ignored=bool(ignored >> (signal.SIGUSR1 - 1) & 1))
""",
    "scontrol": _RECORD + """
if sys.argv[1:3] == ["show", "hostnames"]:
    print("\\n".join(os.environ["FAKE_HOSTS"].split()))
else:
    record("scontrol")
""",
    "scancel": _RECORD + "record('scancel')\n",
    # srun: run the command once per node with that node's SLURM_NODEID, as SLURM does; FAKE_PREEMPT plays SLURM's
    # time-limit warning (USR1 to the batch shell) and then exits as accelerate launch does after its workers
    # checkpointed and exited with 75 (with 1), once the batch shell has passed the signal on (scancel). FAKE_PREEMPT=2
# sends the warning twice.
    "srun": _RECORD + """
import signal, subprocess
argv = sys.argv[1:]
first = next(i for i, a in enumerate(argv) if not a.startswith("-"))
record("srun")
if os.environ.get("FAKE_PREEMPT"):
    for _ in range(int(os.environ["FAKE_PREEMPT"])):
        os.kill(os.getppid(), signal.SIGUSR1)
        deadline = time.time() + 20
        while not any(n.startswith("scancel") for n in os.listdir(os.environ["FAKE_REC"])) and time.time() < deadline:
            time.sleep(0.02)
    if os.environ.get("FAKE_CHECKPOINT"):
        os.makedirs(os.environ["FAKE_CHECKPOINT"])
    sys.exit(int(os.environ.get("FAKE_SRUN_EXIT", 1)))
status = 0
for node in range(int(os.environ["SLURM_NNODES"])):
    status = max(status, subprocess.call(argv[first:], env=dict(os.environ, SLURM_NODEID=str(node))))
sys.exit(int(os.environ.get("FAKE_SRUN_EXIT", status)))
""",
}


@pytest.fixture
def fakes(tmp_path):
    """A bin folder of fake SLURM / accelerate commands, and a function that reads back their records."""
    bin_dir, rec = tmp_path / "bin", tmp_path / "rec"
    bin_dir.mkdir()
    rec.mkdir()
    for name, body in FAKES.items():
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(0o755)

    def records(name):
        files = sorted(rec.glob(f"{name}.*.json"), key=lambda p: int(p.name.split(".")[1]))
        return [json.loads(p.read_text()) for p in files]

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PET_", "TORCH_ELASTIC", "NODE_RANK",
                                                                     "NNODES", "MASTER_", "GPUS_PER_NODE"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_REC=str(rec))
    return env, records


def run_sbatch(env, script, nodes, args, tmp_path, **extra_env):
    """Run an sbatch script as SLURM runs it on the batch node of an allocation of `nodes` nodes."""
    hosts = " ".join(f"gpu-node{i + 1:02d}" for i in range(nodes))
    env = dict(env, SLURM_JOB_ID=str(JOB_ID), SLURM_NNODES=str(nodes), SLURM_JOB_NODELIST=f"gpu-node[01-{nodes:02d}]",
               SLURM_JOB_NAME="myjob", SLURM_SUBMIT_DIR=str(REPO), SLURM_CPUS_ON_NODE="32", FAKE_HOSTS=hosts,
               RUN_DIR=str(tmp_path / "run"), **extra_env)
    return subprocess.run(["bash", str(LAUNCH / "slurm" / script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)


def accelerate_command(record, monkeypatch=None):
    """Parse a recorded accelerate argv with accelerate's own parser, and the training args with train.py's (as each
    of the launch's processes parses them, when given ``monkeypatch``: with WORLD_SIZE, the --global-batch layout)."""
    from accelerate.commands.launch import launch_command_parser

    from tract.config import parse_args

    assert record["argv"][0] == "launch"
    acc = launch_command_parser().parse_args(record["argv"][1:])
    if monkeypatch is not None:
        monkeypatch.setenv("WORLD_SIZE", str(acc.num_processes))
    cwd = os.getcwd()
    os.chdir(REPO)  # the recorded -c paths are relative to the submit dir
    try:
        train = parse_args(acc.training_script_args)
    finally:
        os.chdir(cwd)
    return acc, train


# ---------------------------------------------------------------------------------------------------- SLURM scripts
@pytest.mark.parametrize("nodes", [1, 2, 4])
@pytest.mark.parametrize("script", sorted(SLURM_JOBS))
def test_sbatch_runs_one_accelerate_launch_per_node_with_the_right_ranks_head_and_global_batch(fakes, tmp_path, script,
                                                                                               nodes, monkeypatch):
    env, records = fakes
    job_args, weights = JOB_ARGS[script]
    out = run_sbatch(env, script, nodes, [*job_args, "--epochs", "7", "--dry-run"], tmp_path)
    assert out.returncode == 0, out.stderr
    training_script, config, acc_config, gpus, global_batch, max_per_gpu = SLURM_JOBS[script]

    (srun,) = records("srun")
    for option in (f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                   "--cpus-per-task=32"):
        assert option in srun["argv"]
    launches = records("accelerate")
    assert sorted(int(r["env"]["SLURM_NODEID"]) for r in launches) == list(range(nodes))
    for record in launches:
        node = int(record["env"]["SLURM_NODEID"])
        acc, train = accelerate_command(record, monkeypatch)
        assert acc.machine_rank == node  # evaluated on the node, not in the batch shell
        assert (acc.num_machines, acc.num_processes) == (nodes, nodes * gpus)
        assert (acc.main_process_ip, acc.main_process_port) == ("gpu-node01", 15000 + JOB_ID % 20000)
        assert acc.rdzv_backend == "c10d" and acc.rdzv_conf == f"is_host={int(node == 0)}"
        assert acc.config_file == f"launch/accelerate/{acc_config}" and acc.training_script == training_script
        assert train.config == config and train.epochs == 7 and train.dry_run
        # no batch arithmetic in the script: train.py keeps the config's global batch on the processes it has
        assert not {"--batch-size", "--accum-steps", "--global-batch"} & set(acc.training_script_args)
        assert train.batch_size <= max_per_gpu and train.batch_size * nodes * gpus * train.accum_steps == global_batch
        assert (train.output_dir, train.resume, train.finetune) == (str(tmp_path / "run"), None, weights)
        # the agent forwards SIGUSR1 to its workers and waits for their checkpoint; if it cannot, it ignores it
        assert "SIGUSR1" in record["env"]["PET_SIGNALS_TO_HANDLE"].split(",")
        assert int(record["env"]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) >= 60
        assert record["usr1_ignored"]
        assert "--mixed-precision" not in acc.training_script_args  # the precision guard sees the config's choice
    assert records("scontrol") == [] and records("scancel") == []


@pytest.mark.parametrize("script", ["pretrain_vit_s_a40.sbatch", "finetune_vit_b_v100.sbatch"])
@pytest.mark.parametrize("left_behind", ["checkpoints/epoch-0003-update-000120/", "args.yaml"])
def test_sbatch_resumes_the_run_folder_when_it_holds_a_run_instead_of_starting_over(fakes, tmp_path, script,
                                                                                    left_behind):
    env, records = fakes
    path = tmp_path / "run" / left_behind
    if left_behind.endswith("/"):  # a checkpoint
        path.mkdir(parents=True)
    else:  # a run stopped before its first checkpoint
        path.parent.mkdir()
        path.write_text("epochs: 3\n")
    out = run_sbatch(env, script, 2, JOB_ARGS[script][0], tmp_path)
    assert out.returncode == 0, out.stderr
    for record in records("accelerate"):
        _, train = accelerate_command(record)
        assert (train.resume, train.finetune) == (str(tmp_path / "run"), None)


def test_sbatch_ignores_an_incomplete_checkpoint_and_starts_fresh(fakes, tmp_path):
    env, records = fakes
    (tmp_path / "run" / "checkpoints" / ".tmp-epoch-0001").mkdir(parents=True)
    assert run_sbatch(env, "pretrain_vit_s_a40.sbatch", 1, [], tmp_path).returncode == 0
    (record,) = records("accelerate")
    assert accelerate_command(record)[1].resume is None


def test_sbatch_command_line_overrides_config_and_node_gpus(fakes, tmp_path, monkeypatch):
    env, records = fakes
    out = run_sbatch(env, "pretrain_vit_s_a40.sbatch", 2, ["--batch-size", "64", "--no-tract"], tmp_path,
                     CONFIG="configs/deit3_vit_s_800ep.yaml", SLURM_GPUS_ON_NODE="2")
    assert out.returncode == 0, out.stderr
    for record in records("accelerate"):
        acc, train = accelerate_command(record, monkeypatch)
        assert acc.num_processes == 4 and train.config == "configs/deit3_vit_s_800ep.yaml"
        assert train.batch_size == 64 and train.tract is False  # the user's flags come last and win
        assert train.accum_steps == 2048 // (64 * 4)  # the config's global batch, kept with the user's batch


@pytest.mark.parametrize("script", [s for s in sorted(SLURM_JOBS) if "a40" in s])
def test_a40_sbatch_reaches_the_papers_fp16_with_one_option(fakes, tmp_path, script):
    env, records = fakes
    assert "--mixed-precision fp16" in (LAUNCH / "slurm" / script).read_text()  # documented in the script's header
    out = run_sbatch(env, script, 1, [*JOB_ARGS[script][0], "--mixed-precision", "fp16"], tmp_path)
    assert out.returncode == 0, out.stderr
    (record,) = records("accelerate")
    acc, train = accelerate_command(record)
    assert acc.config_file.endswith("a40x4_multinode.yaml") and train.mixed_precision == "fp16"


@pytest.mark.parametrize("warnings", [1, 2])
def test_preempted_job_forwards_the_warning_to_the_step_once_and_requeues_itself(fakes, tmp_path, warnings):
    env, records = fakes
    out = run_sbatch(env, "pretrain_vit_s_a40.sbatch", 2, [], tmp_path, FAKE_PREEMPT=str(warnings),
                     FAKE_CHECKPOINT=str(tmp_path / "run" / "checkpoints" / "epoch-0002-update-000017"))
    assert out.returncode == 0, out.stderr
    assert [r["argv"] for r in records("scancel")] == [["--signal=USR1", str(JOB_ID)]]
    assert [r["argv"] for r in records("scontrol")] == [["requeue", str(JOB_ID)]]


def test_job_that_finished_as_the_warning_came_is_not_requeued(fakes, tmp_path):
    env, records = fakes
    (tmp_path / "run" / "checkpoints" / "epoch-0400").mkdir(parents=True)
    out = run_sbatch(env, "pretrain_vit_s_a40.sbatch", 1, [], tmp_path, FAKE_PREEMPT="1", FAKE_SRUN_EXIT="0")
    assert out.returncode == 0 and records("scontrol") == []


def test_preempted_job_before_its_run_started_is_not_requeued(fakes, tmp_path):
    env, records = fakes
    out = run_sbatch(env, "pretrain_vit_s_a40.sbatch", 1, [], tmp_path, FAKE_PREEMPT="1")
    assert out.returncode != 0 and "preempted before the run started" in out.stderr
    assert records("scontrol") == []


def test_failed_job_without_a_warning_is_not_requeued_and_keeps_its_status(fakes, tmp_path):
    env, records = fakes
    (tmp_path / "run" / "checkpoints" / "epoch-0001").mkdir(parents=True)
    out = run_sbatch(env, "pretrain_vit_s_a40.sbatch", 1, [], tmp_path, FAKE_SRUN_EXIT="3")
    assert out.returncode == 3 and records("scontrol") == [] and records("scancel") == []


@pytest.mark.parametrize("nodes,script,args,message", [
    (1, "transfer_vit_s_a40.sbatch", ["imagenet21k", "w"], "transfer_cifar10.yaml"),
    (1, "finetune_vit_b_v100.sbatch", [], "WEIGHTS"),
])
def test_sbatch_bad_input_fails_before_srun_with_the_fix(fakes, tmp_path, nodes, script, args, message):
    env, records = fakes
    out = run_sbatch(env, script, nodes, args, tmp_path)
    assert out.returncode != 0 and message in out.stderr
    assert records("srun") == []


# ---------------------------------------------------------------------------------------------------- multinode.sh
def run_multinode(env, args, cwd, **extra_env):
    return subprocess.run([str(LAUNCH / "multinode.sh"), *args], cwd=cwd, env=dict(env, **extra_env),
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_multinode_with_machine_rank_launches_this_machines_share(fakes, rank):
    env, records = fakes
    out = run_multinode(env, ["--config", "launch/accelerate/v100x8_multinode.yaml", "--nnodes", "3", "--machine-rank",
                              str(rank), "--main-ip", "10.0.0.1", "train.py",
                              "-c", "configs/deit3_vit_b_400ep_192.yaml", "--batch-size", "128"], REPO,
                        MASTER_PORT="29555")
    assert out.returncode == 0, out.stderr
    (record,) = records("accelerate")
    acc, train = accelerate_command(record)
    assert (acc.machine_rank, acc.num_machines, acc.num_processes) == (rank, 3, 24)
    assert (acc.main_process_ip, acc.main_process_port, acc.rdzv_backend) == ("10.0.0.1", 29555, "c10d")
    assert acc.rdzv_conf == f"is_host={int(rank == 0)}"
    assert acc.config_file == "launch/accelerate/v100x8_multinode.yaml" and train.batch_size == 128
    assert record["usr1_ignored"] and "SIGUSR1" in record["env"]["PET_SIGNALS_TO_HANDLE"]


def test_multinode_with_a_hostfile_takes_rank_nodes_and_main_ip_from_it(fakes, tmp_path):
    env, records = fakes
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text(f"# the main machine first\nhead-node slots=4\n\n{socket.gethostname()}\nthird-node\n")
    out = run_multinode(env, ["--config", str(LAUNCH / "accelerate" / "a40x4_multinode.yaml"), "--hostfile",
                              str(hostfile), "--", "train.py", "--epochs", "2"], REPO)
    assert out.returncode == 0, out.stderr
    (record,) = records("accelerate")
    acc, train = accelerate_command(record)
    assert (acc.machine_rank, acc.num_machines, acc.num_processes) == (1, 3, 12)
    assert (acc.main_process_ip, acc.main_process_port) == ("head-node", 29500)
    assert acc.training_script == "train.py" and train.epochs == 2


@pytest.mark.parametrize("args,message", [
    (["--config", "launch/accelerate/a40x4_multinode.yaml", "--nnodes", "2", "--main-ip", "h", "train.py"],
     "--machine-rank"),
    (["--config", "launch/accelerate/a40x4_multinode.yaml", "--nnodes", "2", "--machine-rank", "2", "--main-ip", "h",
      "train.py"], "below the node count"),
    (["--nnodes", "2", "--machine-rank", "0", "--main-ip", "h", "train.py"], "--config"),
    (["--config", "launch/accelerate/a40x4_multinode.yaml", "--hostfile", "HOSTS", "train.py"], "is not in --hostfile"),
    (["--config", "launch/accelerate/a40x4_multinode.yaml", "--bogus", "1", "train.py"], "unknown option --bogus"),
])
def test_multinode_bad_input_fails_before_launching_with_the_fix(fakes, tmp_path, args, message):
    env, records = fakes
    (tmp_path / "hosts").write_text("node-a\nnode-b\n")
    out = run_multinode(env, [str(tmp_path / "hosts") if a == "HOSTS" else a for a in args], REPO)
    assert out.returncode == 2 and message in out.stderr
    assert records("accelerate") == []


# ------------------------------------------------------------------------- real launches on this machine (no GPU)
GPU_CONFIGS = sorted(n for n, (_, multinode, _, cpu) in ACCELERATE_CONFIGS.items() if not cpu and not multinode)
MULTINODE_CONFIGS = sorted(n for n, (_, multinode, _, _) in ACCELERATE_CONFIGS.items() if multinode)
REFUSAL = "train.py: error: this launch is configured for GPUs"
CPU_FIX = "To train on the CPU: "


def no_gpu_env() -> dict:
    """A user's environment on a machine without a usable GPU: no Accelerate variables, CUDA hidden if there is one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "PET_", "TORCH_ELASTIC"))}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    return env


def tiny_training(data: Path) -> list:
    """train.py arguments of a 2-update run on the conftest ImageFolder, as the issue's user would start one."""
    return ["--data-set", "FOLDER", "--data-path", str(data), "--model", "vit_pico_patch7_28", "--input-size", "28",
            "--batch-size", "4", "--epochs", "1", "--max-updates-per-epoch", "2", "--num-workers", "0",
            "--no-progress", "--output-dir", "run"]


def cpu_command(data: Path) -> list:
    """What a refusal must tell the user to run instead: the same train.py command under cpu.yaml."""
    return ["accelerate", "launch", "--config_file", str(LAUNCH / "accelerate" / "cpu.yaml"), str(REPO / "train.py"),
            *tiny_training(data)]


def assert_refused_before_anything_was_built(stdout: str, stderr: str, status: int, cwd: Path, data: Path):
    assert status != 0, stdout[-2000:] + stderr[-3000:]
    # once per machine, by its first process (accelerate's one-process launcher quotes it again in its traceback)
    (told,) = [line for line in stderr.splitlines() if line.startswith(REFUSAL)]
    assert shlex.split(told.split(CPU_FIX, 1)[1]) == cpu_command(data)
    assert stdout == ""  # train.py said nothing else: no data, model or run summary was built
    assert not (cwd / "run").exists()  # and nothing was written


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_a_gpu_config_launched_on_a_machine_without_a_gpu_stops_every_process_with_one_message(name, tiny_imagefolder,
                                                                                              tmp_path):
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(LAUNCH / "accelerate" / name), "--num_processes", "2", "--main_process_port", "0",
                          str(REPO / "train.py"), *tiny_training(tiny_imagefolder)],
                         cwd=tmp_path, env=no_gpu_env(), capture_output=True, text=True, timeout=120)
    assert_refused_before_anything_was_built(out.stdout, out.stderr, out.returncode, tmp_path, tiny_imagefolder)
    assert f"mixed precision {ACCELERATE_CONFIGS[name][2]}), but torch" in out.stderr and "nvidia-smi" in out.stderr


@pytest.mark.parametrize("name", MULTINODE_CONFIGS)
def test_multinode_sh_with_a_gpu_config_on_two_loopback_machines_without_a_gpu_stops_both(name, tiny_imagefolder,
                                                                                          tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    machines = [subprocess.Popen(
        [str(LAUNCH / "multinode.sh"), "--config", str(LAUNCH / "accelerate" / name), "--gpus-per-node", "1",
         "--nnodes", "2", "--machine-rank", str(rank), "--main-ip", "127.0.0.1", "--main-port", str(port),
         str(REPO / "train.py"), *tiny_training(tiny_imagefolder)],
        cwd=tmp_path, env=no_gpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)]
    for machine in machines:
        stdout, stderr = machine.communicate(timeout=120)
        assert_refused_before_anything_was_built(stdout, stderr, machine.returncode, tmp_path, tiny_imagefolder)
        assert f"(2 process(es), mixed precision {ACCELERATE_CONFIGS[name][2]})" in stderr


def test_the_cpu_command_a_refusal_names_trains_on_the_cpu(tiny_imagefolder, tmp_path):
    done = subprocess.run(cpu_command(tiny_imagefolder), cwd=tmp_path, env=no_gpu_env(), capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "processes: 2" in done.stdout and "device: cpu" in done.stdout
    assert (tmp_path / "run" / "model.safetensors").is_file()
