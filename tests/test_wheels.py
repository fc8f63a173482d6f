"""Wheels for the target host: resolved with pip for the target's tags, pinned by hash, installable offline.

Every test builds its own tiny wheels (valid zip files with METADATA, WHEEL
and RECORD) into a ``--find-links`` folder or a PEP 503 index on 127.0.0.1;
nothing reaches the internet.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import KeyPair, verify, write_spec
from hypothesis import given, settings
from hypothesis import strategies as st

from airpack.errors import AirpackError, ContentPolicyError, FetchError, IntegrityError, SpecError
from airpack.fetch.wheels import canonical_name, check_wheel, collect_wheels, compatible_platforms
from airpack.ops.pack import PackOptions, PackResult, pack
from airpack.spec import load_spec

HOST_PY = f"{sys.version_info.major}.{sys.version_info.minor}"


# -- building wheels ---------------------------------------------------------------------------


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(folder: Path, name: str, version: str, *, tag: str = "py3-none-any", requires: tuple[str, ...] = (),
                meta_version: str | None = None) -> Path:
    """A valid wheel: one module ``NAME`` with VERSION, and a .dist-info with METADATA, WHEEL and RECORD."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{dist}/__init__.py": f'VERSION = "{version}"\n'.encode(),
        f"{info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {meta_version or version}\n"
            + "".join(f"Requires-Dist: {r}\n" for r in requires)
        ).encode(),
        f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: airpack-tests\nRoot-Is-Purelib: true\nTag: {tag}\n".encode(),
    }
    record = "".join(f"{p},{_record_hash(d)},{len(d)}\n" for p, d in files.items()) + f"{info}/RECORD,,\n"
    files[f"{info}/RECORD"] = record.encode()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for p, d in files.items():
            z.writestr(zipfile.ZipInfo(p, date_time=(2024, 1, 1, 0, 0, 0)), d)
    return path


def build_sdist(folder: Path, name: str, version: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}.tar.gz"
    setup = f"from setuptools import setup\nsetup(name={name!r}, version={version!r})\n".encode()
    pkg_info = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    with tarfile.open(path, "w:gz") as t:
        for rel, data in ((f"{name}-{version}/setup.py", setup), (f"{name}-{version}/PKG-INFO", pkg_info)):
            ti = tarfile.TarInfo(rel)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return path


@pytest.fixture(autouse=True)
def isolated_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    """pip run by airpack must see no user configuration that could point it at the internet."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    for v in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_REQUIRE_VIRTUALENV"):
        monkeypatch.delenv(v, raising=False)


def pack_with_wheels(tmp_path: Path, tiny_model: Path, signer: KeyPair, wheels_toml: str, *, dry_run: bool = False,
                     name: str = "w") -> PackResult:
    spec = write_spec(tmp_path / f"{name}.toml", model_dir=tiny_model, extra=f"\n[wheels]\n{wheels_toml}\n")
    return pack(PackOptions(spec=load_spec(spec), out=tmp_path / f"bundle-{name}", signer=None if dry_run else signer.signer,
                            dry_run=dry_run))


# -- the target's platform tags ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["x86_64", "aarch64", "ppc64le"])
@pytest.mark.parametrize("glibc", [17, 28, 35])
def test_compatible_platforms_match_what_pip_accepts_on_such_a_host(monkeypatch: pytest.MonkeyPatch, arch: str,
                                                                    glibc: int) -> None:
    """The expansion equals packaging's own manylinux tags for a host with that glibc, plus linux_ARCH."""
    from packaging import _manylinux

    monkeypatch.setattr(_manylinux, "_get_glibc_version", lambda: _manylinux._GLibCVersion(2, glibc))
    monkeypatch.setattr(_manylinux, "_is_compatible", lambda *a, **k: True)
    expected = [*_manylinux.platform_tags([arch]), f"linux_{arch}"]
    assert compatible_platforms([f"manylinux_2_{glibc}_{arch}"]) == expected


def test_legacy_and_other_platform_tags() -> None:
    assert compatible_platforms(["manylinux2014_x86_64"]) == compatible_platforms(["manylinux_2_17_x86_64"])
    assert "manylinux1_x86_64" in compatible_platforms(["manylinux_2_28_x86_64"])
    assert compatible_platforms(["musllinux_1_2_aarch64"]) == [
        "musllinux_1_2_aarch64", "musllinux_1_1_aarch64", "musllinux_1_0_aarch64", "linux_aarch64"]
    assert compatible_platforms(["win_amd64"]) == ["win_amd64"]
    with pytest.raises(SpecError):
        compatible_platforms(["--index-url=http://evil"])


def test_canonical_names() -> None:
    assert canonical_name("Foo.Bar_baz--Qux") == "foo-bar-baz-qux"


# -- pack: resolve for the target, record, pin ------------------------------------------------------


def test_wheels_resolved_for_the_target_and_recorded(tmp_path: Path, tiny_model: Path, alice: KeyPair, policy: Path) -> None:
    links = tmp_path / "links"
    build_wheel(links, "alpha", "1.0", requires=("beta>=1.0",))
    build_wheel(links, "beta", "1.0")
    # Only the older manylinux tags: picked only if the compatible set was passed to pip.
    build_wheel(links, "beta", "2.0", tag="cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64")
    build_wheel(links, "beta", "2.5", tag="cp311-cp311-manylinux_2_34_x86_64")  # too new for glibc 2.28
    build_wheel(links, "beta", "3.0", tag="cp311-cp311-macosx_11_0_arm64")  # another platform
    r = pack_with_wheels(tmp_path, tiny_model, alice, f'requirements = ["alpha"]\npython_version = "3.11"\n'
                         f'platforms = ["manylinux_2_28_x86_64"]\nfind_links = ["{links}"]\nno_index = true')
    assert r.manifest is not None
    got = {(w.name, w.version) for w in r.manifest.wheels}
    assert got == {("alpha", "1.0"), ("beta", "2.0")}
    for w in r.manifest.wheels:
        data = (r.out / w.path).read_bytes()
        assert w.sha256 == hashlib.sha256(data).hexdigest() == r.manifest.file(w.path).sha256  # type: ignore[union-attr]
        assert w.raw["filename"] == Path(w.path).name and w.raw["size"] == len(data)
    beta = next(w for w in r.manifest.wheels if w.name == "beta")
    assert beta.raw["platform_tags"] == ["manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    req = (r.out / "wheels" / "requirements.txt").read_text()
    for w in r.manifest.wheels:
        assert f"{w.name}=={w.version} \\\n    --hash=sha256:{w.sha256}" in req
    assert r.manifest.file("wheels/requirements.txt") is not None
    assert not (r.out / ".airpack-staging").exists()
    verify(r.out, policy)


def test_offline_install_from_the_bundle_in_a_fresh_venv(tmp_path: Path, tiny_model: Path, alice: KeyPair,
                                                         policy: Path) -> None:
    links = tmp_path / "links"
    build_wheel(links, "alpha", "1.0", requires=("beta>=1.0",))
    build_wheel(links, "beta", "1.2")
    r = pack_with_wheels(tmp_path, tiny_model, alice, f'requirements = ["alpha==1.0"]\npython_version = "{HOST_PY}"\n'
                         f'find_links = ["{links}"]\nno_index = true')
    verify(r.out, policy)
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    py = venv / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-index", "--require-hashes",
               "--find-links", str(r.out / "wheels"), "-r", str(r.out / "wheels" / "requirements.txt")]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run(install, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    out = subprocess.run([str(py), "-c", "import alpha, beta; print(alpha.VERSION, beta.VERSION)"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "1.0 1.2"

    # A wheel changed on the way: pip's --require-hashes refuses it (and so does verify).
    beta = next(iter((r.out / "wheels").glob("beta-*.whl")))
    data = bytearray(beta.read_bytes())
    data[len(data) // 2] ^= 0xFF
    beta.write_bytes(bytes(data))
    venv2 = tmp_path / "fresh2"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv2)], check=True, timeout=60)
    install[install.index(str(py))] = str(venv2 / "bin" / "python")
    bad = subprocess.run(install, capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode != 0 and "hash" in (bad.stdout + bad.stderr).lower()
    with pytest.raises(AirpackError) as ei:
        verify(r.out, policy)
    assert ei.value.exit_code == 3


def test_dry_run_resolves_wheels_and_writes_nothing(tmp_path: Path, tiny_model: Path, alice: KeyPair) -> None:
    links = tmp_path / "links"
    a = build_wheel(links, "alpha", "1.0", requires=("beta",))
    build_wheel(links, "beta", "1.0")
    r = pack_with_wheels(tmp_path, tiny_model, alice, f'requirements = ["alpha"]\nfind_links = ["{links}"]\nno_index = true',
                         dry_run=True)
    assert [(w["name"], w["version"]) for w in r.details["wheels"]] == [("alpha", "1.0"), ("beta", "1.0")]
    assert r.details["wheels"][0]["size"] == a.stat().st_size
    assert "wheels/" + a.name in {p.bundle_path for p in r.planned}
    assert not r.out.exists()


# -- refusals --------------------------------------------------------------------------------------


def test_a_package_with_only_an_sdist_is_refused(tmp_path: Path, tiny_model: Path, alice: KeyPair) -> None:
    links = tmp_path / "links"
    build_wheel(links, "alpha", "1.0", requires=("delta",))
    build_sdist(links, "delta", "1.0")
    with pytest.raises(FetchError) as ei:
        pack_with_wheels(tmp_path, tiny_model, alice, f'requirements = ["alpha"]\nfind_links = ["{links}"]\nno_index = true')
    assert ei.value.exit_code == 7
    assert "no wheel of delta" in str(ei.value) and "sdists are refused" in str(ei.value)


def test_an_sdist_among_the_downloads_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "dl"
    build_wheel(d, "alpha", "1.0")
    build_sdist(d, "delta", "1.0")
    with pytest.raises(ContentPolicyError) as ei:
        collect_wheels(d)
    assert ei.value.exit_code == 3 and "delta-1.0.tar.gz" in str(ei.value)


def test_two_versions_of_one_project_is_not_a_pinned_result(tmp_path: Path) -> None:
    d = tmp_path / "dl"
    build_wheel(d, "beta", "1.0")
    build_wheel(d, "beta", "2.0")
    with pytest.raises(IntegrityError) as ei:
        collect_wheels(d)
    assert "not pinned" in str(ei.value)


def test_a_wheel_whose_metadata_disagrees_with_its_name_is_refused(tmp_path: Path) -> None:
    w = build_wheel(tmp_path, "alpha", "1.0", meta_version="6.6.6")
    with pytest.raises(IntegrityError) as ei:
        check_wheel(w)
    assert "6.6.6" in str(ei.value)
    broken = tmp_path / "beta-1.0-py3-none-any.whl"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(IntegrityError):
        check_wheel(broken)


@pytest.mark.parametrize("req", ["--index-url=http://127.0.0.1:9/simple", "-e .", "alpha\n--extra-index-url x"])
def test_pip_options_smuggled_into_requirements_are_refused(tmp_path: Path, tiny_model: Path, alice: KeyPair, req: str) -> None:
    with pytest.raises(SpecError) as ei:
        pack_with_wheels(tmp_path, tiny_model, alice, f"requirements = [{req!r}]\nno_index = true".replace("'", '"')
                         .replace("\n--", "\\n--"))
    assert ei.value.exit_code == 2


# -- a PEP 503 index on 127.0.0.1 -----------------------------------------------------------------------


@pytest.fixture
def index(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A simple index serving /simple/NAME/ pages whose links carry #sha256= fragments."""
    root = tmp_path / "index"
    (root / "files").mkdir(parents=True)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", root
    finally:
        srv.shutdown()
        srv.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def publish(root: Path, wheel: Path, *, lie: bool = False) -> None:
    name = canonical_name(wheel.name.split("-")[0])
    page = root / "simple" / name
    page.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(wheel.read_bytes() + (b"x" if lie else b"")).hexdigest()
    links = page / "index.html"
    old = links.read_text() if links.exists() else ""
    links.write_text(old + f'<a href="../../files/{wheel.name}#sha256={digest}">{wheel.name}</a><br>\n')


def test_wheels_from_a_package_index(index: tuple[str, Path], tmp_path: Path, tiny_model: Path, alice: KeyPair,
                                     policy: Path) -> None:
    url, root = index
    publish(root, build_wheel(root / "files", "alpha", "1.0", requires=("beta",)))
    publish(root, build_wheel(root / "files", "beta", "1.0"))
    r = pack_with_wheels(tmp_path, tiny_model, alice, f'requirements = ["alpha"]\nindex_url = "{url}/simple"')
    assert r.manifest is not None and {w.name for w in r.manifest.wheels} == {"alpha", "beta"}
    verify(r.out, policy)


def test_an_index_whose_hash_does_not_match_is_refused(index: tuple[str, Path], tmp_path: Path, tiny_model: Path,
                                                       alice: KeyPair) -> None:
    url, root = index
    publish(root, build_wheel(root / "files", "alpha", "1.0"), lie=True)
    with pytest.raises(IntegrityError) as ei:
        pack_with_wheels(tmp_path, tiny_model, alice, f'requirements = ["alpha"]\nindex_url = "{url}/simple"')
    assert ei.value.exit_code == 3


# -- properties ------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(arch=st.sampled_from(["x86_64", "aarch64", "ppc64le", "s390x"]), lo=st.integers(17, 40), step=st.integers(0, 10))
def test_a_newer_glibc_accepts_everything_an_older_one_does(arch: str, lo: int, step: int) -> None:
    older = compatible_platforms([f"manylinux_2_{lo}_{arch}"])
    newer = compatible_platforms([f"manylinux_2_{lo + step}_{arch}"])
    assert set(older) <= set(newer) and newer[0] == f"manylinux_2_{lo + step}_{arch}"
    assert newer[-1] == f"linux_{arch}" and f"manylinux2014_{arch}" in newer
    assert len(newer) == len(set(newer))
