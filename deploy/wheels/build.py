"""Build Muster's wheels: the whole, and the SDK, agent and server parts (parts.toml).

    python deploy/wheels/build.py [--out DIR] [--check]

Each part is staged in a temporary directory (its package copied from the repository,
a pyproject.toml written from parts.toml and the root pyproject.toml) and built there
with the interpreter's own setuptools (no build isolation: the dev extras bring it).
``--check`` then installs each part alone into a fresh virtualenv, the way an agent or
client host would (``pip install muster-fleet-agent``), and proves it needs nothing else:
the distributions a part must not pull are absent, ``muster --help`` offers exactly its
commands, and its own command's ``--help`` runs.

Exit status 0 when everything built (and checked); 1 with a message otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PARTS = Path(__file__).with_name("parts.toml")
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc")


class BuildError(Exception):
    pass


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    if match is None:
        raise BuildError(f"cannot read the requirement {requirement!r}")
    return canonical(match.group(0))


def load() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        whole = tomllib.load(f)
    with PARTS.open("rb") as f:
        parts = tomllib.load(f)
    return whole, parts


def check_drift(whole: dict[str, Any], parts: dict[str, dict[str, Any]]) -> None:
    """The parts' dependencies together are exactly the whole's, range for range."""
    declared = set(whole["project"]["dependencies"])
    used: set[str] = set()
    for key, part in parts.items():
        for requirement in part["dependencies"]:
            if requirement not in declared:
                raise BuildError(
                    f"parts.toml [{key}] needs {requirement!r}, which pyproject.toml does not "
                    "declare (with that exact range)"
                )
            used.add(requirement)
    if unused := sorted(declared - used):
        raise BuildError(f"pyproject.toml dependencies that no part takes: {', '.join(unused)}")
    offered = whole["project"].get("optional-dependencies", {})
    for key, part in parts.items():
        for extra, requirements in part.get("extras", {}).items():
            if sorted(requirements) != sorted(offered.get(extra, [])):
                raise BuildError(
                    f"parts.toml [{key}] extra {extra!r} differs from pyproject.toml's "
                    f"(which is {offered.get(extra)!r})"
                )
    for key, part in parts.items():
        for name in part.get("absent", []):
            if any(requirement_name(r) == canonical(name) for r in part["dependencies"]):
                raise BuildError(f"parts.toml [{key}] both needs and forbids {name}")


def entry_points(whole: dict[str, Any], part: dict[str, Any]) -> dict[str, dict[str, str]]:
    groups: dict[str, dict[str, str]] = {}
    all_groups = whole["project"]["entry-points"]
    commands = all_groups["muster.commands"]
    groups["muster.commands"] = {name: commands[name] for name in part.get("commands", [])}
    if part.get("executors"):
        groups["muster.executors"] = dict(all_groups["muster.executors"])
    return {group: points for group, points in groups.items() if points}


def toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def toml_table(name: str, values: dict[str, str]) -> str:
    lines = [f"[{name}]"]
    lines += [f"{toml_string(key)} = {toml_string(value)}" for key, value in values.items()]
    return "\n".join(lines)


def pyproject(whole: dict[str, Any], parts: dict[str, dict[str, Any]], key: str) -> str:
    project = whole["project"]
    part = parts[key]
    version = project["version"]
    dependencies = list(part["dependencies"])
    if key != "sdk":
        dependencies.insert(0, f"{parts['sdk']['name']}=={version}")
    sections = [
        '[build-system]\nrequires = ["setuptools>=77"]\nbuild-backend = "setuptools.build_meta"',
        "\n".join(
            [
                "[project]",
                f"name = {toml_string(part['name'])}",
                f"version = {toml_string(version)}",
                f"description = {toml_string(part['description'])}",
                f"requires-python = {toml_string(project['requires-python'])}",
                f"license = {toml_string(project['license'])}",
                "dependencies = [" + ", ".join(toml_string(d) for d in dependencies) + "]",
            ]
        ),
    ]
    if extras := part.get("extras"):
        lines = ["[project.optional-dependencies]"]
        lines += [f"{toml_string(name)} = {json.dumps(reqs)}" for name, reqs in extras.items()]
        sections.append("\n".join(lines))
    if scripts := part.get("scripts"):
        sections.append(toml_table("project.scripts", scripts))
    for group, points in entry_points(whole, part).items():
        sections.append(toml_table(f'project.entry-points."{group}"', points))
    package = part["package"]
    sections.append(
        "\n".join(
            [
                "[tool.setuptools.packages.find]",
                "namespaces = true",
                f"include = [{toml_string(package)}, {toml_string(package + '.*')}]",
            ]
        )
    )
    data = part.get("package-data", {})
    if data:
        lines = ["[tool.setuptools.package-data]"]
        lines += [f"{toml_string(name)} = {json.dumps(globs)}" for name, globs in data.items()]
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def stage(whole: dict[str, Any], parts: dict[str, dict[str, Any]], key: str, into: Path) -> Path:
    part = parts[key]
    where = into / key
    target = where.joinpath(*part["package"].split("."))
    source = ROOT / part["source"]
    # The SDK's folder holds links to server/ and agent/: those are other parts.
    shutil.copytree(source, target, ignore=_sdk_ignore if key == "sdk" else SKIP, symlinks=False)
    (where / "pyproject.toml").write_text(pyproject(whole, parts, key))
    return where


def _sdk_ignore(directory: str, names: list[str]) -> set[str]:
    skipped = set(SKIP(directory, names))
    return skipped | {name for name in names if (Path(directory) / name).is_symlink()}


def wheel(source: Path, scratch: Path, out: Path) -> Path:
    """Build one wheel in a directory of its own, then move it to ``out`` (replacing)."""
    own = Path(tempfile.mkdtemp(dir=scratch))
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(own), str(source)])  # fmt: skip
    built = list(own.glob("*.whl"))
    if len(built) != 1:
        raise BuildError(f"building {source} left {len(built)} wheels")
    return Path(shutil.move(built[0], out / built[0].name))


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)  # noqa: S603
    if done.returncode != 0:
        raise BuildError(f"{' '.join(argv[:4])} ... failed:\n{done.stdout}{done.stderr}")
    return done


def check(
    whole: dict[str, Any], parts: dict[str, dict[str, Any]], wheels: dict[str, Path], scratch: Path
) -> None:
    """Install each part alone, and the whole, into fresh virtualenvs; see what they brought."""
    names = {key: parts[key]["name"] for key in parts}
    for key, part in parts.items():
        own = {"sdk": "submit", "agent": "agent", "server": "server"}[key]
        lacks = {"agent", "server"} - {own}
        groups = list(entry_points(whole, part))
        installed = install(
            part["name"], wheels, scratch, own, offers={own}, lacks=lacks, groups=groups
        )
        forbidden = {canonical(n) for n in part.get("absent", [])}
        forbidden |= {canonical(names[k]) for k in parts if k not in (key, "sdk")}
        if pulled := sorted(installed & forbidden):
            raise BuildError(f"{part['name']} alone pulled in {', '.join(pulled)}")
        absent = ", ".join(part.get("absent", []))
        print(f"{part['name']}: installs alone, `muster {own} --help` runs, no {absent}")
    name = whole["project"]["name"]
    every = {"agent", "server", "dev", "submit"}
    groups = list(whole["project"]["entry-points"])
    install(name, wheels, scratch, "dev", offers=every, lacks=set(), groups=groups)
    print(f"{name}: installs every command")


def install(
    name: str,
    wheels: dict[str, Path],
    scratch: Path,
    own: str,
    *,
    offers: set[str],
    lacks: set[str],
    groups: list[str],
) -> set[str]:
    """Install ``name`` from the built wheels (dependencies from the index) into a fresh
    venv; check the ``muster`` commands it offers and that its entry points load. Returns
    the installed distributions' names."""
    venv = scratch / f"venv-{name}"
    run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "install", "--quiet", "--find-links", str(wheels["sdk"].parent), name])
    listed = json.loads(run([*pip, "list", "--format", "json"]).stdout)
    # Every command and executor it registers loads with only what it brought (run from
    # scratch: the repository's own muster/ must not shadow the installed one).
    run([str(python), "-c", LOAD_ENTRY_POINTS, *groups], cwd=scratch)
    muster = str(venv / "bin" / "muster")
    usage = run([muster, "--help"], cwd=scratch).stdout
    offered = set(re.findall(r"^    (\w[\w-]*)\s", usage, flags=re.M))
    if missing := sorted(offers - offered):
        raise BuildError(f"{name} does not offer `muster {', '.join(missing)}`:\n{usage}")
    if extra := sorted(lacks & offered):
        raise BuildError(f"{name} alone offers `muster {', '.join(extra)}`:\n{usage}")
    run([muster, own, "--help"], cwd=scratch)
    return {canonical(row["name"]) for row in listed}


LOAD_ENTRY_POINTS = """
import sys
from importlib.metadata import entry_points
for group in sys.argv[1:]:
    for point in entry_points(group=group):
        point.load()
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="where wheels go")
    parser.add_argument("--check", action="store_true", help="install each part alone")
    args = parser.parse_args(argv)
    try:
        whole, parts = load()
        check_drift(whole, parts)
        args.out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="muster-wheels-") as tmp:
            scratch = Path(tmp)
            built = {"whole": wheel(ROOT, scratch, args.out)}
            for key in parts:
                built[key] = wheel(stage(whole, parts, key, scratch), scratch, args.out)
            for key, path in built.items():
                print(f"{key}: {path.name}")
            if args.check:
                check(whole, parts, built, scratch)
    except BuildError as err:
        print(f"build.py: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
