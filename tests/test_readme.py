"""Every `python scripts/...` / `python benchmarks/...` command in README.md runs as written.

Commands are found generically (fenced code blocks with line continuations, and inline code spans
such as table captions), so the test follows the README as it changes. For each command: the script
exists, its own argument parser accepts the arguments (nothing is run), and inputs that another
README command produces (a zoo, a VAE, a backbone) name what that command really writes, e.g. zoo
model ids of the full zoo vs the --quick one.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from _scripts import ROOT, parse_script_args

README = ROOT / "README.md"
SCRIPT_RE = re.compile(r"^(scripts|benchmarks)/[\w.-]+\.py$")
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# input directories that some README command must write (or the repository must hold)
INPUT_DIRS = ("--zoo", "--vae", "--backbone")


@dataclass(frozen=True)
class Command:
    script: str
    argv: tuple[str, ...]
    line: int
    text: str

    def option(self, name: str) -> str | None:
        values = self.options(name)
        return values[0] if values else None

    def options(self, name: str) -> list[str]:
        """Every value given to ``name`` (options like --vae may repeat)."""
        argv, values = list(self.argv), []
        for i, token in enumerate(argv):
            if token == name and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                values.append(argv[i + 1])
            elif token.startswith(name + "="):
                values.append(token.split("=", 1)[1])
        return values

    def __str__(self) -> str:
        return f"README.md:{self.line}: {self.text}"


def _snippets(text: str) -> list[tuple[int, str]]:
    """(line number, shell text) of every fenced block line (continuations joined) and code span."""
    out: list[tuple[int, str]] = []
    lines = text.splitlines()
    in_block, pending, start = False, "", 0
    prose: list[tuple[int, str]] = []
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            prose.append((number, line))
            continue
        if line.lstrip().startswith("#") and not pending:
            continue  # a comment line
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    for number, line in prose:
        out += [(number, span) for span in re.findall(r"`([^`]+)`", line)]
    return out


def readme_commands(text: str) -> list[Command]:
    commands = []
    for number, snippet in _snippets(text):
        for part in re.split(r"&&|\|\||;|\|", snippet):
            try:
                tokens = shlex.split(part, comments=True)
            except ValueError:
                continue
            while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):
                tokens.pop(0)  # environment assignments such as OMP_NUM_THREADS=1
            if len(tokens) >= 2 and re.match(r"^python(3(\.\d+)?)?$", tokens[0]) and SCRIPT_RE.match(tokens[1]):
                commands.append(Command(tokens[1], tuple(tokens[2:]), number, part.strip()))
    return commands


COMMANDS = readme_commands(README.read_text())


def test_the_readme_has_commands():
    scripts = {c.script for c in COMMANDS}
    assert {"scripts/generate_weights.py", "scripts/build_zoo.py", "scripts/train_vae.py"} <= scripts, scripts


def test_the_parser_finds_continued_lines_chained_commands_and_spans():
    text = ("```bash\n# a comment\npython scripts/a.py --x 1 \\\n    --y 2\n"
            "python scripts/b.py --out zoo && OMP_NUM_THREADS=1 python scripts/c.py --zoo zoo\n```\n"
            "A table caption (`python benchmarks/d.py --threads 1` -> `docs/d.md`), `pip install -e .`\n")
    found = [(c.script, c.argv, c.line) for c in readme_commands(text)]
    assert found == [("scripts/a.py", ("--x", "1", "--y", "2"), 3),
                     ("scripts/b.py", ("--out", "zoo"), 5), ("scripts/c.py", ("--zoo", "zoo"), 5),
                     ("benchmarks/d.py", ("--threads", "1"), 7)]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"L{c.line}-{Path(c.script).stem}")
def test_command_is_accepted_by_its_script(command):
    assert (ROOT / command.script).is_file(), f"{command}: {command.script} does not exist"
    parse_script_args(command.script, list(command.argv))


# ---------------------------------------------------------------- consistency between commands


def _zoo_specs(command: Command) -> dict:
    """model id -> spec of what a README build_zoo command writes (full or --quick zoo, at its seed)."""
    from weightgen.zoo import default_zoo_specs, quick_zoo_specs

    args = parse_script_args(command.script, list(command.argv))
    specs = quick_zoo_specs(args.seed) if args.quick else default_zoo_specs(args.seed)
    return {s.model_id: s for s in specs}


def _kwargs_problem(command: Command, spec) -> str | None:
    """An --arch / --model-kwargs given next to a zoo model must be that model's."""
    from weightgen.cli import parse_kwargs

    arch = command.option("--arch")
    if arch is not None and arch != spec.arch:
        return f"--arch {arch}, but zoo model {spec.model_id} is a {spec.arch}"
    argv = list(command.argv)
    if "--model-kwargs" in argv:
        items = []
        for token in argv[argv.index("--model-kwargs") + 1:]:
            if token.startswith("--"):
                break
            items.append(token)
        for key, value in parse_kwargs(items).items():
            if spec.model_kwargs.get(key) != value:
                return (f"--model-kwargs {key}={value!r}, but zoo model {spec.model_id} has "
                        f"{key}={spec.model_kwargs.get(key)!r}")
    return None


def _outputs(commands: list[Command], script: str) -> dict[str, Command]:
    """Output directory (normalised) -> the README command of ``script`` that writes it (its --out;
    generate_weights' default name when it has none)."""
    outs = {}
    for command in commands:
        if command.script != script:
            continue
        out = command.option("--out")
        if out is None and script == "scripts/generate_weights.py":
            from weightgen.generate import GenerateOptions

            args = parse_script_args(script, list(command.argv))
            out = str(GenerateOptions(arch=args.arch, checkpoint=args.checkpoint, pretrained=args.pretrained,
                                      method=args.method, seed=args.seed).output_dir())
        if out is not None:
            outs[_norm(out)] = command
    return outs


def _norm(path: str) -> str:
    return str(Path(path)).rstrip("/")


def _consistency_problems(commands: list[Command]) -> list[str]:
    problems = []
    builds = _outputs(commands, "scripts/build_zoo.py")
    zoos = {out: _zoo_specs(c) for out, c in builds.items()}
    written = {out for script in {c.script for c in commands} for out in _outputs(commands, script)}
    for command in commands:
        for option in INPUT_DIRS:
            for value in command.options(option):
                path = value.split("=", 1)[1] if option == "--vae" and "=" in value else value  # NAME=DIR
                if _norm(path) not in written and not (ROOT / path).exists():
                    problems.append(f"{command}: {option} {value} is neither written by a README command "
                                    f"(--out) nor part of the repository")
        zoo = command.option("--zoo")
        for token in command.argv:  # zoo/<id>.safetensors paths into a README zoo
            head, _, name = token.rpartition("/")
            if _norm(head) in zoos and name.endswith(CHECKPOINT_SUFFIXES):
                model_id = name.rsplit(".", 1)[0]
                if model_id not in zoos[_norm(head)]:
                    problems.append(f"{command}: {token} is not a model of the zoo the README builds "
                                    f"in {head} ({builds[_norm(head)].text})")
                elif (why := _kwargs_problem(command, zoos[_norm(head)][model_id])) is not None:
                    problems.append(f"{command}: {why}")
        if zoo is not None and _norm(zoo) in zoos:  # --a/--b as zoo model ids
            for end in ("--a", "--b"):
                value = command.option(end)
                if value and not value.endswith(CHECKPOINT_SUFFIXES) and value not in zoos[_norm(zoo)]:
                    problems.append(f"{command}: {end} {value} is not a model of the zoo built in {zoo}")
                elif value in zoos[_norm(zoo)] and (why := _kwargs_problem(command, zoos[_norm(zoo)][value])):
                    problems.append(f"{command}: {why}")
    return problems


def test_commands_use_what_other_readme_commands_write():
    problems = _consistency_problems(COMMANDS)
    assert not problems, "\n".join(problems)


def test_the_consistency_check_catches_a_quick_zoo_mismatch():
    text = ("```bash\npython scripts/build_zoo.py --out zoo --quick\n"
            "python scripts/interpolate.py --a zoo/resnet18-w16-d1-s0.safetensors "
            "--b zoo/resnet18-w16-d1-s1.safetensors --steps 6 --out o --vae my_vae\n```\n")
    problems = _consistency_problems(readme_commands(text))
    assert any("resnet18-w16-d1-s0.safetensors is not a model of the zoo" in p for p in problems), problems
    assert any("--vae my_vae" in p for p in problems), problems


def test_the_consistency_check_catches_kwargs_that_are_not_the_zoo_models():
    text = ("```bash\npython scripts/build_zoo.py --out zoo\n"
            "python scripts/interpolate.py --arch resnet18 --model-kwargs \"layers=[1,1,1,1]\" "
            "\"channels=[8,16,32,64]\" --a zoo/resnet18-w16-d1-s0.safetensors "
            "--b zoo/resnet18-w16-d1-s1.safetensors --steps 6 --out o\n```\n")
    problems = _consistency_problems(readme_commands(text))
    assert len(problems) == 2 and all("channels=[8, 16, 32, 64]" in p for p in problems), problems


def test_the_consistency_check_reads_every_named_vae():
    text = ("```bash\npython scripts/train_vae.py --zoo tests/data --out vae-a\n"
            "python benchmarks/bench_rate_distortion.py --zoo tests/data --vae a=vae-a --vae b=vae-b\n```\n")
    problems = _consistency_problems(readme_commands(text))
    assert len(problems) == 1 and "--vae b=vae-b" in problems[0], problems
