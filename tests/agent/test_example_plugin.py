"""The example executor plugin (``examples/executor-plugin``) as a user installs it.

pip builds and installs Muster and the plugin from their sources into a fresh virtualenv,
the plugin's own tests pass there, and that virtualenv's ``muster agent`` (a real process)
runs ``files.sha256`` tasks from a real server, having found the executor through the
plugin's installed entry point.

Offline and fast: the fresh venv gets no index. Muster's third-party dependencies (the
versions this checkout's venv resolved) are made visible through a ``.pth`` file naming a
directory of links to them that leaves out everything of Muster's own (its dist-info and
the editable-install hook), so Muster and the plugin come only from what pip installed
into the fresh venv, and the test checks that they do. About 10-15 s, most of it the agent
process starting and the plugin's unit tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from muster import AsyncAdminClient, AsyncClient, TaskState
from muster.server.app import ServerHandle, start_server
from tests.agent.test_process import wait_connected
from tests.conftest import client_config, server_config
from tests.e2e import procs

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "examples" / "executor-plugin"
MUSTER_SOURCES = ("pyproject.toml", "README.md", "muster", "agent", "server")
"""What building the ``muster-fleet`` distribution reads (muster/agent and muster/server
are links to agent/ and server/)."""

WHERE = """
import json, sys
from importlib.metadata import entry_points
import muster, muster_example_checksum
(point,) = [p for p in entry_points(group="muster.executors") if p.name == "files.sha256"]
print(json.dumps({
    "value": point.value,
    "dist": point.dist.name,
    "dist_dir": str(point.dist.locate_file("")),
    "plugin": muster_example_checksum.__file__,
    "muster": muster.__file__,
    "path": sys.path,
}))
"""


def run(*argv: str | Path, cwd: Path, timeout: float = 120) -> str:
    done = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=_clean_environ(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"{argv}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _clean_environ() -> dict[str, str]:
    """No PYTHONPATH, venv or Muster settings of the test run leak into the fresh venv."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("MUSTER_")}


def fresh_venv(scratch: Path) -> Path:
    """A new virtualenv, without pip, seeing this checkout's third-party packages only."""
    venv = scratch / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=scratch)
    deps = scratch / "deps"
    deps.mkdir()
    ours = ("muster", "__editable__")
    for site in {Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")}:
        for entry in site.iterdir():
            if entry.name.startswith(ours) or entry.suffix == ".pth":
                continue
            if not (deps / entry.name).exists():
                (deps / entry.name).symlink_to(entry)
    python = venv / "bin" / "python"
    fresh_site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                     cwd=scratch).strip()  # fmt: skip
    Path(fresh_site, "_checkout_dependencies.pth").write_text(f"{deps}\n")
    return venv


def copy_sources(scratch: Path) -> tuple[Path, Path]:
    """Muster's and the plugin's sources, so the builds write nothing into the checkout."""
    caches = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info")
    muster = scratch / "muster-src"
    muster.mkdir()
    for name in MUSTER_SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, muster / name, symlinks=True, ignore=caches)
        else:
            shutil.copy2(source, muster / name)
    plugin = scratch / "plugin-src"
    shutil.copytree(PLUGIN, plugin, ignore=caches)
    return muster, plugin


@pytest.fixture
async def own_server(tmp_path: Path) -> AsyncIterator[ServerHandle]:
    """An embedded server: the plugin does not depend on the backend, so this test runs
    in the first pass of ``make test`` only."""
    handle = await start_server(server_config(tmp_path / "data"))
    try:
        yield handle
    finally:
        await handle.stop(grace=1.0)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.timeout(240)
async def test_the_example_plugin_installs_into_a_fresh_venv_and_runs_through_a_real_agent(
    tmp_path: Path, own_server: ServerHandle
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    venv = await asyncio.to_thread(fresh_venv, scratch)
    muster_src, plugin_src = copy_sources(scratch)
    python = venv / "bin" / "python"
    pip = (python, "-m", "pip", "--disable-pip-version-check", "install", "--quiet")
    await asyncio.to_thread(
        run, *pip, "--no-index", "--no-deps", "--no-build-isolation", muster_src, plugin_src,
        cwd=scratch,
    )  # fmt: skip

    # Found through the installed metadata, not the checkout.
    where = json.loads(await asyncio.to_thread(run, python, "-c", WHERE, cwd=scratch))
    fresh_site = Path(where["dist_dir"]).resolve()
    assert where["dist"] == "muster-example-checksum"
    assert where["value"] == "muster_example_checksum:ChecksumExecutor"
    assert fresh_site.is_relative_to(venv.resolve())
    assert Path(where["plugin"]).resolve().is_relative_to(fresh_site)
    assert Path(where["muster"]).resolve().is_relative_to(fresh_site)
    assert not [p for p in where["path"] if p and Path(p).resolve().is_relative_to(REPO)]

    # The plugin's own tests, against the installed plugin.
    tests = await asyncio.to_thread(
        run, python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", cwd=plugin_src
    )
    assert " passed" in tests and "failed" not in tests, tests

    # That venv's `muster agent`, with the plugin's directory setting, on the real server.
    shared = tmp_path / "shared"
    (shared / "models").mkdir(parents=True)
    weights = os.urandom(3 << 20)  # three chunks
    (shared / "models" / "small.gguf").write_bytes(weights)
    server = own_server
    async with (
        AsyncAdminClient(client_config(server)) as admin,
        AsyncClient(client_config(server)) as client,
    ):
        _, token = await admin.create_bootstrap_token("default")
        environ = _clean_environ() | {
            "MUSTER_BOOTSTRAP_TOKEN": token,
            "MUSTER_CHECKSUM_ROOT": str(shared),
            "PYTHONUNBUFFERED": "1",
        }
        log_path = tmp_path / "agent.log"
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                venv / "bin" / "muster", "agent",
                "--server", server.api_address,
                "--ca-file", str(server.config.ca_dir / "bundle.pem"),
                "--state-dir", str(tmp_path / "state"),
                "--name", "plugin-01",
                "--executors", "files.sha256,echo",
                cwd=scratch, env=environ, stdout=log, stderr=log,
                stdin=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
        try:
            await wait_connected(admin, "plugin-01")
            (agent,) = await admin.list_agents()
            assert set(agent.capabilities) == {"echo", "files.sha256"}

            good = await client.submit(
                "files.sha256",
                {"paths": ["models/*.gguf"], "expect": {"models/small.gguf": sha(weights)}},
            )
            wrong = await client.submit(
                "files.sha256",
                {"paths": ["models/small.gguf"], "expect": {"models/small.gguf": "0" * 64}},
                max_attempts=3,
            )
            bad = await client.submit("files.sha256", {"paths": ["../etc"]}, max_attempts=3)
            done = await client.wait(good.task_id, timeout=60)
            assert done.state == TaskState.SUCCEEDED, done.error
            assert json.loads(done.output) == {
                "count": 1,
                "total_bytes": len(weights),
                "files": [
                    {"path": "models/small.gguf", "bytes": len(weights), "sha256": sha(weights)}
                ],
                "omitted": 0,
            }
            for task, error in (
                (wrong, "1 file(s) not as expected: models/small.gguf (differs)"),
                (bad, "files.sha256 paths: '../etc' must be a relative path without '..'"),
            ):
                failed = await client.wait(task.task_id, timeout=60)
                assert failed.state == TaskState.FAILED
                assert failed.error == error
                assert failed.attempt == 1  # not retried: the agent said so
        finally:
            await procs.stop(process, timeout=20)
    log_text = log_path.read_text()
    assert process.returncode == 0, log_text
    assert "executors echo, files.sha256" in log_text
    assert token not in log_text
