"""The wheels that serve a model, fetched with pip (run as a subprocess) for the TARGET host.

pip resolves for the interpreter that runs it unless told otherwise, and
``--platform manylinux_2_28_x86_64`` alone does not accept the older
manylinux tags that glibc 2.28 also runs (``manylinux2014``, ``manylinux1``,
...), so the whole compatible set is passed. Only wheels are taken
(``--only-binary=:all:``): an sdist would run its build code on the
offline host. Every wheel is opened and its metadata checked against its
file name, so the requirements file written for the bundle pins exactly
what is there, by SHA-256.
"""

from __future__ import annotations

import email.parser
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from packaging.version import InvalidVersion, Version

from .._urls import redact_url
from ..errors import ContentPolicyError, FetchError, IntegrityError, SpecError
from ..hashing import hash_file
from ..spec import WheelSpec

PIP_TIMEOUT_S = 3 * 3600
MAX_METADATA_BYTES = 4 * 1024 * 1024
MAX_REPORT_BYTES = 64 * 1024 * 1024
SDIST_SUFFIXES = (".tar.gz", ".tgz", ".zip", ".tar.bz2", ".tar.xz", ".tar", ".egg")
# The oldest glibc each architecture had a manylinux tag for.
_MANYLINUX_FLOOR = {"x86_64": 5, "i686": 5, "aarch64": 17, "armv7l": 17, "ppc64le": 17, "ppc64": 17, "s390x": 17}
_LEGACY = {(2, 17): "manylinux2014", (2, 12): "manylinux2010", (2, 5): "manylinux1"}
_PLATFORM_RE = re.compile(r"^[a-z0-9_.]+$")


@dataclass(frozen=True)
class Wheel:
    """One downloaded wheel, checked: its name and version agree with the metadata inside it."""

    filename: str
    name: str  # canonical (PEP 503)
    version: str
    sha256: str
    size: int
    python_tags: tuple[str, ...]
    abi_tags: tuple[str, ...]
    platform_tags: tuple[str, ...]
    path: Path

    def record(self, bundle_path: str) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "filename": self.filename,
            "path": bundle_path,
            "sha256": self.sha256,
            "size": self.size,
            "python_tags": list(self.python_tags),
            "abi_tags": list(self.abi_tags),
            "platform_tags": list(self.platform_tags),
        }


def canonical_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def compatible_platforms(platforms: Sequence[str]) -> list[str]:
    """Each platform tag with the older tags a host of that platform also installs, newest first.

    ``manylinux_2_28_x86_64`` → ``manylinux_2_28_x86_64`` … ``manylinux_2_5_x86_64`` with the legacy
    aliases (``manylinux2014``, ``manylinux2010``, ``manylinux1``), then ``linux_x86_64``, as pip on
    such a host would accept. ``musllinux_1_2_x86_64`` likewise; other tags pass through unchanged.
    """
    out: list[str] = []

    def add(tag: str) -> None:
        if tag not in out:
            out.append(tag)

    for p in platforms:
        if not _PLATFORM_RE.match(p):
            raise SpecError(f"wheels.platforms: {p!r} is not a platform tag")
        m = re.match(r"^manylinux_(\d+)_(\d+)_(.+)$", p)
        legacy = re.match(r"^(manylinux2014|manylinux2010|manylinux1)_(.+)$", p)
        if legacy:
            glibc = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}[legacy.group(1)]
            m = re.match(r"^manylinux_(\d+)_(\d+)_(.+)$", f"manylinux_2_{glibc}_{legacy.group(2)}")
        if m and int(m.group(1)) == 2:
            minor, arch = int(m.group(2)), m.group(3)
            floor = _MANYLINUX_FLOOR.get(arch, minor)
            for v in range(minor, floor - 1, -1):
                add(f"manylinux_2_{v}_{arch}")
                if (2, v) == (2, 17) or ((2, v) in _LEGACY and arch in ("x86_64", "i686")):
                    add(f"{_LEGACY[(2, v)]}_{arch}")
            add(f"linux_{arch}")
            continue
        mm = re.match(r"^musllinux_1_(\d+)_(.+)$", p)
        if mm:
            for v in range(int(mm.group(1)), -1, -1):
                add(f"musllinux_1_{v}_{mm.group(2)}")
            add(f"linux_{mm.group(2)}")
            continue
        add(p)
    return out


def parse_wheel_filename(filename: str) -> tuple[str, str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(name, version, python tags, abi tags, platform tags) of ``NAME-VER[-BUILD]-PY-ABI-PLAT.whl``."""
    if not filename.endswith(".whl"):
        raise ContentPolicyError(f"{filename}: not a wheel; sdists and other archives are refused", path=filename)
    parts = filename[:-4].split("-")
    if len(parts) not in (5, 6) or not all(parts):
        raise IntegrityError(f"{filename}: not a valid wheel file name", path=filename)
    name, version = parts[0], parts[1]
    py, abi, plat = parts[-3], parts[-2], parts[-1]
    return canonical_name(name), version, tuple(py.split(".")), tuple(abi.split(".")), tuple(plat.split("."))


def _same_version(a: str, b: str) -> bool:
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a == b


def check_wheel(path: Path, expected_sha256: str | None = None) -> Wheel:
    """Open the wheel, read its METADATA (capped), and require name and version to match its file name."""
    filename = path.name
    name, version, py, abi, plat = parse_wheel_filename(filename)
    digest = hash_file(path, display=filename)
    if expected_sha256 is not None and digest.sha256 != expected_sha256:
        raise IntegrityError(f"{filename}: sha256 {digest.sha256} differs from the index's {expected_sha256}", path=filename)
    try:
        with zipfile.ZipFile(path) as z:
            metas = [i for i in z.infolist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", i.filename)]
            wheels = [i for i in z.infolist() if re.fullmatch(r"[^/]+\.dist-info/WHEEL", i.filename)]
            if len(metas) != 1 or len(wheels) != 1:
                raise IntegrityError(f"{filename}: expected one .dist-info with METADATA and WHEEL", path=filename)
            if metas[0].file_size > MAX_METADATA_BYTES:
                raise IntegrityError(f"{filename}: METADATA larger than {MAX_METADATA_BYTES} bytes", path=filename)
            with z.open(metas[0]) as fh:
                raw = fh.read(MAX_METADATA_BYTES + 1)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise IntegrityError(f"{filename}: not a readable wheel ({e})", path=filename) from None
    if len(raw) > MAX_METADATA_BYTES:
        raise IntegrityError(f"{filename}: METADATA larger than {MAX_METADATA_BYTES} bytes", path=filename)
    meta = email.parser.BytesParser().parsebytes(raw, headersonly=True)
    m_name, m_version = meta.get("Name"), meta.get("Version")
    if not m_name or not m_version:
        raise IntegrityError(f"{filename}: METADATA has no Name or Version", path=filename)
    if canonical_name(str(m_name)) != name or not _same_version(str(m_version), version):
        raise IntegrityError(
            f"{filename}: METADATA says {m_name} {m_version}, the file name says {name} {version}", path=filename
        )
    return Wheel(filename=filename, name=name, version=version, sha256=digest.sha256, size=digest.size,
                 python_tags=py, abi_tags=abi, platform_tags=plat, path=path)


def requirements_text(wheels: Sequence[Wheel], spec: WheelSpec) -> str:
    """A requirements file pinning every wheel by version and SHA-256, for ``pip install --require-hashes``."""
    lines = [
        "# Written by airpack: every wheel of this bundle, pinned by version and sha256.",
        f"# Target: python {spec.python_version}, implementation {spec.implementation}, "
        f"platforms {', '.join(spec.platforms)}.",
        "# pip install --no-index --require-hashes --find-links wheels -r wheels/requirements.txt",
    ]
    for w in sorted(wheels, key=lambda w: w.name):
        lines.append(f"{w.name}=={w.version} \\\n    --hash=sha256:{w.sha256}")
    return "\n".join(lines) + "\n"


# -- pip ------------------------------------------------------------------------------------


def _requirement_lines(spec: WheelSpec) -> list[str]:
    out = []
    for r in spec.requirements:
        r = r.strip()
        if not r or "\n" in r or "\r" in r or r.startswith("-"):
            raise SpecError(f"wheels.requirements: {r!r} is not a requirement (options belong in the spec's fields)")
        out.append(r)
    return out


def target_args(spec: WheelSpec) -> list[str]:
    """The pip options that make it resolve for the target rather than for this host."""
    args = ["--only-binary=:all:", "--python-version", spec.python_version, "--implementation", spec.implementation]
    for p in compatible_platforms(spec.platforms):
        args += ["--platform", p]
    for a in spec.abi:
        args += ["--abi", a]
    return args


def index_args(spec: WheelSpec) -> list[str]:
    args: list[str] = []
    if spec.no_index:
        args.append("--no-index")
    if spec.index_url:
        args += ["--index-url", spec.index_url]
    for u in spec.extra_index_urls:
        args += ["--extra-index-url", u]
    for fl in spec.find_links:
        args += ["--find-links", fl]
    return args


def _run_pip(args: list[str], *, what: str) -> str:
    cmd = [sys.executable, "-m", "pip", *args]
    env = dict(os.environ)
    env.update({"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "PYTHONUTF8": "1"})
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise FetchError(f"{what}: pip did not finish within {PIP_TIMEOUT_S} s") from None
    except OSError as e:
        raise FetchError(f"{what}: cannot run pip: {e.strerror}") from None
    if proc.returncode != 0:
        output = proc.stdout + "\n" + proc.stderr
        if "DO NOT MATCH THE HASHES" in output.upper():
            raise IntegrityError(f"{what}: a downloaded file does not match the hash its index published; "
                                 f"pip said: {_pip_failure('', output).split('pip failed: ', 1)[-1]}")
        raise FetchError(_pip_failure(what, output))
    return proc.stdout + "\n" + proc.stderr


def _pip_failure(what: str, output: str) -> str:
    lines = [redact_url(x.strip()) for x in output.splitlines() if x.strip()]
    interesting = [x for x in lines if x.startswith("ERROR") or "No matching distribution" in x or "Could not find" in x]
    detail = "; ".join((interesting or lines)[-4:])[:1500]
    m = re.search(r"No matching distribution found for (\S+)", output)
    if m:
        return (f"{what}: no wheel of {m.group(1)} for the target (only wheels are taken; sdists are refused). "
                f"pip said: {detail}")
    return f"{what}: pip failed: {detail}"


def _staged_files(output: str) -> set[str]:
    """File names pip reports for this run ('Saved X', 'File was already downloaded X')."""
    names = set()
    for m in re.finditer(r"^(?:Saved|File was already downloaded) (.+)$", output, re.M):
        names.add(os.path.basename(m.group(1).strip()))
    return names


def clean_download_dir(dest: Path) -> None:
    """Drop what an interrupted pip left that is not a readable wheel (so it is fetched again)."""
    if not dest.is_dir():
        return
    for p in dest.iterdir():
        if p.is_file() and not p.is_symlink() and p.name.endswith(".whl"):
            try:
                with zipfile.ZipFile(p) as z:
                    z.infolist()
                continue
            except (zipfile.BadZipFile, OSError, EOFError):
                pass
        if p.is_file() or p.is_symlink():
            p.unlink()


def download_wheels(spec: WheelSpec, dest: Path) -> list[Wheel]:
    """``pip download`` the requirements for the target into ``dest``; check and return every wheel."""
    dest.mkdir(parents=True, exist_ok=True)
    clean_download_dir(dest)
    with tempfile.TemporaryDirectory(prefix="airpack-req-") as tmp:
        req_args = _requirements_args(spec, Path(tmp))
        output = _run_pip(
            ["download", "--progress-bar", "off", "--dest", str(dest), *target_args(spec), *index_args(spec), *req_args],
            what="wheels",
        )
    return collect_wheels(dest, _staged_files(output))


def _requirements_args(spec: WheelSpec, tmp: Path) -> list[str]:
    args: list[str] = []
    lines = _requirement_lines(spec)
    if lines:
        req = tmp / "requirements.in"
        req.write_text("\n".join(lines) + "\n", encoding="utf-8")
        args += ["-r", str(req)]
    if spec.requirements_file is not None:
        if not spec.requirements_file.is_file():
            raise SpecError(f"wheels.requirements_file {spec.requirements_file} not found", path=str(spec.requirements_file))
        args += ["-r", str(spec.requirements_file)]
    return args


def collect_wheels(dest: Path, names: set[str] | None = None) -> list[Wheel]:
    """Check every file pip left (or the ones it named): wheels only, one version per project."""
    files = sorted(p for p in dest.iterdir() if p.is_file())
    if names:
        files = [p for p in files if p.name in names] or files
    wheels: list[Wheel] = []
    for p in files:
        if p.name.endswith(SDIST_SUFFIXES) or not p.name.endswith(".whl"):
            raise ContentPolicyError(
                f"{p.name}: an sdist or other archive, not a wheel; airpack takes wheels only "
                "(an sdist runs its build code on the offline host)",
                path=p.name,
            )
        wheels.append(check_wheel(p))
    by_name: dict[str, Wheel] = {}
    for w in wheels:
        if w.name in by_name:
            raise IntegrityError(
                f"wheels: {w.name} twice ({by_name[w.name].filename} and {w.filename}); the result is not pinned to one version",
                path=w.filename,
            )
        by_name[w.name] = w
    if not wheels:
        raise FetchError("wheels: pip downloaded nothing")
    return wheels


def resolve_wheels(spec: WheelSpec) -> list[dict[str, Any]]:
    """Resolve without downloading the wheels (``pip install --dry-run --report``), for ``pack --dry-run``."""
    with tempfile.TemporaryDirectory(prefix="airpack-resolve-") as tmp:
        report = Path(tmp) / "report.json"
        req_args = _requirements_args(spec, Path(tmp))
        _run_pip(
            ["install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
             *target_args(spec), *index_args(spec), *req_args],
            what="wheels",
        )
        try:
            raw = report.read_bytes()[: MAX_REPORT_BYTES + 1]
            doc = json.loads(raw) if len(raw) <= MAX_REPORT_BYTES else None
        except (OSError, ValueError):
            doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("install"), list):
        raise FetchError("wheels: pip gave no resolution report")
    out: list[dict[str, Any]] = []
    for item in doc["install"]:
        info = item.get("download_info") or {}
        url = str(info.get("url", ""))
        filename = unquote(os.path.basename(urlsplit(url).path))
        name, version, _, _, plat = parse_wheel_filename(filename)
        hashes = (info.get("archive_info") or {}).get("hashes") or {}
        size = None
        if url.startswith("file:"):
            try:
                size = Path(unquote(urlsplit(url).path)).stat().st_size
            except OSError:
                size = None
        sha = hashes.get("sha256") if isinstance(hashes.get("sha256"), str) else None
        out.append({"name": name, "version": version, "filename": filename, "sha256": sha,
                    "size": size, "platform_tags": list(plat)})
    return sorted(out, key=lambda w: w["name"])
