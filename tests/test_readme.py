"""README.md and the pages of docs/ work as written: the README's test command is CI's, their commands parse, and the
files they name exist.

Commands are read from the ```bash blocks of README.md and docs/*.md (backslash continuations joined, `<placeholders>`
replaced by a word). The options after train.py / finetune.py go through the scripts' own parsers (YAML configs
included), the options of `accelerate launch` through Accelerate's; nothing is trained.
"""
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
# README.md and the pages it maps (docs/results/ holds the benchmarks' generated reports, not pages)
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TEXT = "\n".join(page.read_text() for page in PAGES)
SCRIPTS = ("train.py", "finetune.py")


def bash_commands() -> list:
    """Every command line of the bash blocks of README.md and docs/*.md, continuations joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", TEXT, flags=re.S):
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
        assert str(path.relative_to(REPO)) in shown, f"no command of README.md or docs/ uses {path.relative_to(REPO)}"


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
                           TEXT))
    assert paths, "the pages name no files?"
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, f"README.md or docs/ name files that do not exist: {missing}"


def test_the_readme_is_a_front_page_whose_links_all_land():
    """About 250 lines with the two commands, the map of docs/ and the key results; every relative link of the README
    and the task pages split from it points at a file that exists and, with an anchor, at a heading of that file
    (docs/results.md is the benchmarks' report, rewritten by them)."""
    assert len(README.splitlines()) <= 260
    for section in ("## Quick start", "## Documentation", "## Results", "## Tests"):
        assert f"\n{section}\n" in README
    for page in ("train", "finetune", "launch", "trust", "library", "tests", "results"):
        assert f"(docs/{page}.md)" in README, page

    def anchors(path):
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}

    for page in [p for p in PAGES if p.name != "results.md"]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            file, _, anchor = target.partition("#")
            linked = (page.parent / file).resolve() if file else page
            assert linked.exists(), f"{page.name}: {target}"
            if anchor:
                assert anchor in anchors(linked), f"{page.name}: {target}"

