"""README.md works as written: its test command is CI's, its commands parse, and the files it names exist.

Commands are read from the README's ```bash blocks (backslash continuations joined, `<placeholders>` replaced by a
word). The options after train.py / finetune.py go through the scripts' own parsers (YAML configs included), the
options of `accelerate launch` through Accelerate's; nothing is trained.
"""
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
SCRIPTS = ("train.py", "finetune.py")


def bash_commands() -> list:
    """Every command line of the README's bash blocks, continuations joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def words(command: str) -> list:
    return shlex.split(re.sub(r"<[^>]*>", "RUN", command))


def script_commands() -> list:
    return [c for c in bash_commands() if any(s in words(c) for s in SCRIPTS)]


def test_the_readme_test_command_is_exactly_what_ci_runs():
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith(("#", "set ", "cd "))]
    quick_start = re.search(r"## Quick start\n+```bash\n(.*?)```", README, flags=re.S).group(1).splitlines()
    assert len(quick_start) == 2, "the quick start is exactly two commands"
    assert ci_lines == [quick_start[1].split("#")[0].strip()]


def test_readme_shows_commands_for_every_paper_config_and_launch_script():
    shown = " ".join(bash_commands())
    for path in [*sorted((REPO / "configs").glob("deit3_*.yaml")), *sorted((REPO / "configs").glob("transfer_*")),
                 *sorted((REPO / "launch" / "slurm").glob("*.sbatch")), REPO / "launch" / "multinode.sh"]:
        assert str(path.relative_to(REPO)) in shown, f"no README command uses {path.relative_to(REPO)}"


@pytest.mark.parametrize("command", script_commands(), ids=lambda c: c[:90])
def test_readme_command_parses_with_the_scripts_own_parser(command, monkeypatch):
    import finetune
    from tract.config import parse_args

    monkeypatch.chdir(REPO)
    argv = words(command)
    script = next(i for i, w in enumerate(argv) if w in SCRIPTS)
    if argv[0] == "accelerate":
        from accelerate.commands.launch import launch_command_parser

        launch_command_parser().parse_args(argv[2:])  # exits non-zero on an option Accelerate does not know
    args = parse_args(argv[script + 1:]) if argv[script] == "train.py" else finetune.parse_finetune_args(
        argv[script + 1:])
    if "--tract" in argv:
        assert args.tract


def test_every_repository_path_the_readme_names_exists():
    paths = set(re.findall(r"(?<![\w/.-])((?:tract|configs|launch|benchmarks|scripts|tests|\.ci)/[\w./-]*[\w/])",
                           README))
    assert paths, "the README names no files?"
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, f"README names files that do not exist: {missing}"
