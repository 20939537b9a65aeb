"""The private virtualenv that runs NVIDIA kvpress as a benchmark peer.

kvpress 0.5.5 pins ``transformers>=4.56,<5.3`` while infercache runs on a newer transformers, so the
peer never shares our interpreter: it lives in its own venv under
``infercache_home()/peers/kvpress-0.5.5`` and is driven through a subprocess
(:mod:`infercache.bench.peers.kvpress`).

The venv is built once, on first use. ``torch`` is installed *before* kvpress so that kvpress's
``torch>=2.3.1`` requirement is already satisfied and pip does not pull a CUDA build of torch (or
the ``nvidia-*`` wheels) on a CPU machine. A marker file records the versions that ended up in the
venv; a venv without the marker is treated as unfinished and the install is resumed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from infercache._home import infercache_home

KVPRESS_VERSION = "0.5.5"
TORCH_VERSION = "2.13.0"
MARKER_NAME = "infercache-peer.json"

ProgressFn = Callable[[str], None]


class PeerEnvError(RuntimeError):
    """The peer virtualenv could not be created or installed."""


def default_env_path() -> Path:
    """``infercache_home()/peers/kvpress-<version>``."""
    return infercache_home() / "peers" / f"kvpress-{KVPRESS_VERSION}"


def env_python(path: str | os.PathLike | None = None) -> Path:
    """The interpreter inside the peer venv at ``path`` (it may not exist yet)."""
    root = Path(path) if path is not None else default_env_path()
    if os.name == "nt":  # pragma: no cover - the benchmark targets Linux/macOS
        return root / "Scripts" / "python.exe"
    return root / "bin" / "python"


def read_marker(path: str | os.PathLike | None = None) -> dict | None:
    """The recorded versions of a finished peer venv, or ``None`` if it is absent or unfinished."""
    root = Path(path) if path is not None else default_env_path()
    marker = root / MARKER_NAME
    if not marker.is_file() or not env_python(root).exists():
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def is_ready(path: str | os.PathLike | None = None) -> bool:
    """True when the peer venv at ``path`` was fully installed (marker present)."""
    return read_marker(path) is not None


def install_commands(
    path: str | os.PathLike | None = None, torch_index_url: str | None = None
) -> list[list[str]]:
    """The commands :func:`ensure_env` runs, in order (also shown to the user when one fails)."""
    root = Path(path) if path is not None else default_env_path()
    py = str(env_python(root))
    torch_cmd = [py, "-m", "pip", "install", f"torch=={TORCH_VERSION}"]
    if torch_index_url:
        torch_cmd += ["--index-url", torch_index_url]
    return [
        [sys.executable, "-m", "venv", str(root)],
        torch_cmd,
        [py, "-m", "pip", "install", f"kvpress=={KVPRESS_VERSION}"],
    ]


def _shell(cmds: Sequence[Sequence[str]]) -> str:
    import shlex

    return "\n".join("  " + " ".join(shlex.quote(part) for part in cmd) for cmd in cmds)


def _default_progress(message: str) -> None:
    print(f"[infercache peers] {message}", file=sys.stderr, flush=True)


def ensure_env(
    path: str | os.PathLike | None = None,
    *,
    torch_index_url: str | None = None,
    progress: ProgressFn | None = _default_progress,
) -> Path:
    """Create (once) the kvpress peer venv and return its python interpreter.

    Parameters
    ----------
    path:
        Where the venv lives; default :func:`default_env_path`.
    torch_index_url:
        Optional pip index for the torch wheel, e.g. ``https://download.pytorch.org/whl/cpu`` on a
        machine where PyPI would give a CUDA build. Also read from ``INFERCACHE_PEER_TORCH_INDEX``.
    progress:
        Called with one line per step (default: printed to stderr); ``None`` for silence.

    Raises
    ------
    PeerEnvError
        If a step fails. The message carries the tail of the pip log and the commands to run by hand.
    """
    root = Path(path) if path is not None else default_env_path()
    python = env_python(root)
    if is_ready(root):
        return python
    torch_index_url = torch_index_url or os.environ.get("INFERCACHE_PEER_TORCH_INDEX") or None
    say = progress or (lambda _message: None)
    root.parent.mkdir(parents=True, exist_ok=True)
    log_path = root.parent / f"{root.name}.install.log"
    commands = install_commands(root, torch_index_url)
    if python.exists():  # a previous install stopped half-way: resume (pip skips what is there)
        commands = commands[1:]
    say(
        f"installing the kvpress {KVPRESS_VERSION} peer (torch {TORCH_VERSION} first) into {root}; "
        f"a one-time step of a few minutes and about 1.5 GB (log: {log_path})"
    )
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # never let our own source tree leak into the peer
    env.pop("VIRTUAL_ENV", None)
    with open(log_path, "a") as log:
        for cmd in commands:
            step = " ".join(cmd[1:] if cmd[0] == sys.executable else cmd[3:])
            say(f"  {step} ...")
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            start = time.monotonic()
            try:
                done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
                code = done.returncode
            except OSError as exc:
                code, log_tail = -1, str(exc)
            else:
                log_tail = ""
            if code != 0:
                log.flush()
                if not log_tail:
                    log_tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
                raise PeerEnvError(
                    f"installing the kvpress peer failed at `{step}` (exit {code}).\n"
                    f"Last lines of {log_path}:\n{log_tail}\n\n"
                    f"To install it by hand, run:\n{_shell(install_commands(root, torch_index_url))}\n"
                    f"then create the marker by calling ensure_env() again."
                )
            say(f"  done in {time.monotonic() - start:.0f} s")
    versions = _probe_versions(python, env)
    versions["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    versions["python"] = str(python)
    (root / MARKER_NAME).write_text(json.dumps(versions, indent=2) + "\n")
    say(
        "kvpress peer ready: "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if k in ("kvpress", "torch", "transformers"))
    )
    return python


def _probe_versions(python: Path, env: dict) -> dict:
    code = (
        "import importlib.metadata as m, json, sys;"
        "print(json.dumps({p: m.version(p) for p in ('kvpress','torch','transformers')}"
        " | {'python_version': sys.version.split()[0]}))"
    )
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise PeerEnvError(f"the peer venv at {python} does not import its packages:\n{done.stderr[-2000:]}")
    versions = json.loads(done.stdout.strip().splitlines()[-1])
    if versions.get("kvpress") != KVPRESS_VERSION:
        raise PeerEnvError(f"expected kvpress {KVPRESS_VERSION} in {python}, found {versions.get('kvpress')}")
    return versions
