"""Every snippet in the README, its Chinese twin and docs/ either runs here (on the sample, offline, small budgets)
or says why not in its info string: ```bash needs-data / needs-gpu / needs-network / no-run (a server) / bench (a
benchmark: timed work runs alone, not inside the suite)."""

from __future__ import annotations

import ast
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import REPO, make_dataset

DOCS = [REPO / "README.md", REPO / "README.zh-CN.md", *sorted((REPO / "docs").glob("*.md"))]
MARKERS = {"needs-data", "needs-gpu", "needs-network", "no-run", "bench"}
RUNNABLE = {"bash", "python"}
NOT_CODE = {"text", "json", "yaml", "toml", "csv", "markdown", ""}
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.DOTALL | re.MULTILINE)
# a command in the docs trains for real; here each one trains a single epoch on top of what it asks for
SMALL = ["--epochs", "1", "--train-per-class", "20"]
SMALL_BUDGET = {
    "scripts/train.py": [*SMALL, "--time-budget", "0"], "scripts/sweep.py": SMALL, "scripts/compare.py": SMALL,
    "scripts/study.py": [*SMALL, "--time-budget", "0"],
    "bench/deploy_speed.py": ["--n-test", "50", "--reps", "5"],  # timing figures come from bench runs, not the suite
}  # fmt: skip


# the documented CPU launch: two processes of imports and gloo setup, so it runs in test_distributed, not twice
DOC_TORCHRUN = "torchrun --nproc_per_node 2 scripts/train.py --data sample --arch tiny --epochs 1 --bs 128"


def blocks(path: Path) -> list[tuple[str, set[str], str, int]]:
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        lang, *words = m.group(1).split()
        out.append((lang if m.group(1).strip() else "", set(words), m.group(2), text[: m.start()].count("\n") + 1))
    return out


def commands(code: str) -> list[str]:
    """The shell commands of a block: comment-only lines dropped, `\\` continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def meaning(lang: str, code: str) -> str:
    """What a snippet does, without its comments: the README's translation repeats the same commands and code with
    comments in another language, and runs them once."""
    if lang == "python":
        return ast.dump(ast.parse(code))
    return "\n".join(cmd.split("  #")[0].strip() for cmd in commands(code))


ALL = [(p, *b) for p in DOCS for b in blocks(p)]
RUN, _seen = [], set()
for _p, _lang, _marks, _code, _line in ALL:
    if _lang in RUNNABLE and not _marks and (_lang, meaning(_lang, _code)) not in _seen:
        _seen.add((_lang, meaning(_lang, _code)))
        RUN.append((_p, _lang, _code, _line))


def test_every_code_block_is_runnable_or_marked():
    assert (REPO / "README.zh-CN.md").is_file() and len(RUN) > 5
    for path, lang, marks, code, line in ALL:
        where = f"{path.relative_to(REPO)}:{line}"
        assert lang in RUNNABLE | NOT_CODE, f"{where}: ```{lang}: use bash or python (or text for output)"
        assert marks <= MARKERS, f"{where}: unknown marker(s) {marks - MARKERS}; use {sorted(MARKERS)}"
        if lang == "bash" and not marks:
            assert "../shared" not in code, f"{where}: a path users do not have"
            for cmd in commands(code):
                assert not cmd.startswith("#"), f"{where}: output or comments belong in a ```text block"


APPS = {
    "scripts/train.py": ("cifar_fastai.cli", "train_app"),
    "scripts/sweep.py": ("cifar_fastai.cli", "sweep_app"),
    "scripts/compare.py": ("cifar_fastai.cli", "compare_app"),
    "scripts/study.py": ("cifar_fastai.cli", "study_app"),
}


def run_script_in_process(script: str, args: list[str]) -> str:
    """`python scripts/X.py args` inside this process (the imports are paid once for the whole suite)."""
    if script in APPS:
        module, name = APPS[script]
        app = getattr(__import__(module, fromlist=[name]), name)
    else:  # the script's own typer app, loaded without running its __main__ block
        found = runpy.run_path(str(REPO / script), run_name="snippet")
        app = found.get("app")
        if app is None and callable(found.get("main")):  # `typer.run(main)`: the same command, as an app
            import typer

            app = typer.Typer()
            app.command()(found["main"])
    if app is None:  # a script with neither: in a process of its own
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        res = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, check=False)
        assert res.returncode == 0, f"python {script} {' '.join(args)}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
        return res.stdout
    res = CliRunner().invoke(app, [*args, *SMALL_BUDGET.get(script, [])])
    assert res.exit_code == 0, f"python {script} {' '.join(args)}\n{res.output}\n{res.exception!r}"
    return res.output


# a command that names the shipped sample's folder as "any other folder" reads the small sample too (its 1,000
# test images cost a test pass and TTA each; test_data checks the shipped sample itself)
SHIPPED_SAMPLE = "cifar_fastai/sample/cifar10_sample"


def run_bash_block(code: str, env: dict[str, str]) -> None:
    from cifar_fastai.data import sources

    for cmd in commands(code):
        cmd = cmd.split("  #")[0].strip()  # a trailing comment
        for part in cmd.split("&&"):
            part = part.strip()
            if part.startswith("pip install"):
                continue  # installed already: the suite runs in the installed project
            if m := re.fullmatch(r"(\w+)=\$\((.*)\)", part):  # RUN=$(ls -td runs/*/ | head -1)
                out = subprocess.run(["bash", "-c", m.group(2)], env=env, capture_output=True, text=True, check=True)
                env[m.group(1)] = out.stdout.strip()
                continue
            words = shlex.split(expand(part, env))
            words = [str(sources.SAMPLE_DIR) if w == SHIPPED_SAMPLE else w for w in words]
            if words[:1] == ["python"] and len(words) > 1 and words[1].endswith(".py"):
                run_script_in_process(words[1], words[2:])
            elif words[:3] == ["python", "-m", "pytest"]:
                continue  # the suite is what runs this
            elif words[:1] == ["torchrun"]:  # the one CPU launch is test_distributed's, run once there
                assert part == DOC_TORCHRUN, f"{part}: a torchrun command test_distributed does not run"
            else:
                res = subprocess.run(["bash", "-c", part], env=env, capture_output=True, text=True, check=False)
                assert res.returncode == 0, f"{part}\n{res.stdout}\n{res.stderr}"


def expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: env.get(m.group(1) or m.group(2), ""), text)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A user's checkout: the repository's folders, and runs/ that the snippets fill as they go."""
    root = tmp_path_factory.mktemp("checkout")
    for name in ("cifar_fastai", "scripts", "demo", "bench", "notebooks"):
        if (REPO / name).exists():
            (root / name).symlink_to(REPO / name)
    return root


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory) -> Path:
    """`--data sample` inside this test: the same layout and classes, 10 test images per class instead of 100, so a
    snippet's test pass and TTA take a fraction of the time (the shipped sample itself is checked in test_data)."""
    return make_dataset(tmp_path_factory.mktemp("sample") / "cifar10_sample", n_train=30, n_test=10, corrupt=False)


@pytest.mark.parametrize("path", [p for p in DOCS if any(r[0] == p for r in RUN)], ids=lambda p: p.name)
def test_snippets_run_as_written(path, workdir, small_sample, monkeypatch):
    from cifar_fastai.data import sources
    from cifar_fastai.studies import study
    from cifar_fastai.studies.compare import run_row
    from cifar_fastai.training.resolve import resolve

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sources, "SAMPLE_DIR", small_sample)  # every command runs in this process
    # a study's rows in this process too: the row process itself is test_cifar_resnets' (compare) to check
    monkeypatch.setattr(study, "spawn_row", lambda cfg, explicit, measure=None: run_row(resolve(cfg, explicit), measure))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for doc, lang, code, line in RUN:
        if doc != path:
            continue
        try:
            if lang == "bash":
                run_bash_block(code, env)
            else:
                exec(compile(code, f"{path.name}:{line}", "exec"), {"__name__": "snippet"})  # noqa: S102 - our own docs
        except AssertionError as e:
            raise AssertionError(f"{path.relative_to(REPO)}:{line}: {e}") from None
