"""The operator runbook's commands work as written, in the order it gives them.

Every ``airpack`` line of the ``sh`` blocks in docs/runbook.md sections 0 to 4
runs through the real command line, in one working folder, and must exit 0.
Only what cannot exist in a test is swapped: the absolute paths (``/etc``,
``/media/usb``, ``/srv/models``, ``~``) point into the test's folder, and the
spec names a tiny local model instead of a Hub repo (no test reaches the
network). A runbook that packs a tar and then co-signs it (``sign`` takes only
a folder) fails here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from conftest import REPO, write_spec
from factories import make_model
from threat_helpers import cli_inproc

RUNBOOK = REPO / "docs" / "runbook.md"
SECTIONS = ("## 0.", "## 1.", "## 2.", "## 3.", "## 4.")


def runbook_commands(text: str) -> list[list[str]]:
    """Each command line of the sh blocks in the runbook's sections 0-4, split like a shell would (comments dropped)."""
    commands: list[list[str]] = []
    section = None
    in_block = False
    pending = ""
    for line in text.splitlines():
        if line.startswith("## "):
            section = line if line.startswith(SECTIONS) else None
            continue
        if line.strip() == "```sh":
            in_block = section is not None
            continue
        if line.strip() == "```":
            in_block = False
            continue
        if not in_block:
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + line, comments=True)
        pending = ""
        if words:
            commands.append(words)
    return commands


def test_the_runbook_lists_the_whole_path() -> None:
    names = [c[1] for c in runbook_commands(RUNBOOK.read_text()) if c[0] == "airpack"]
    for step in ("keygen", "trust", "pack", "sign", "verify", "export", "repair", "install", "list", "show"):
        assert step in names, step
    assert names.index("sign") < names.index("export"), "co-sign the folder, then export the tar"


def test_the_runbook_commands_run_as_written(tmp_path: Path) -> None:
    work = tmp_path / "station"
    work.mkdir()
    home, etc, usb, srv = tmp_path / "home", tmp_path / "etc", tmp_path / "usb", tmp_path / "srv"
    for d in (home, etc / "airpack", usb):
        d.mkdir(parents=True)
    for name, secret in ((".airpack-pass", "packer secret"), (".officer-pass", "officer secret")):
        (home / name).write_text(secret + "\n")
        (home / name).chmod(0o600)
    model = make_model(tmp_path / "models" / "qwen", shards=2)
    (work / "manifests").mkdir()
    write_spec(work / "manifests" / "qwen2.5-7b.toml", model_dir=model, name="qwen2.5-7b-instruct",
               channel="qwen2.5-7b", sequence=3, repo_id="Qwen/Qwen2.5-7B-Instruct")

    def local(word: str) -> str:
        word = re.sub(r"^~(?=/)", str(home), word)
        for doc_path, here in (("/etc/", etc), ("/media/usb", usb), ("/srv/", srv)):
            if word.startswith(doc_path) or f"={doc_path}" in word:
                word = word.replace(doc_path.rstrip("/"), str(here), 1)
        return word

    env: dict[str, str] = {}
    ran = 0
    for words in runbook_commands(RUNBOOK.read_text()):
        words = [local(w) for w in words]
        if words[0] == "export":  # the shell's export: the variables later commands read
            env.update(dict(w.split("=", 1) for w in words[1:]))
            continue
        assert words[0] == "airpack", f"the runbook runs something other than airpack: {words}"
        r = cli_inproc(*words[1:], env=env, cwd=work)
        if words[1] == "diff" and "--registry" in words and not (srv / "models").exists():
            # The runbook's diff is for a host that has installed before; on this fresh one it must say so.
            assert r.returncode == 6 and "no registry" in r.stderr, r.stderr
            continue
        assert r.returncode == 0, f"`{shlex.join(words)}` exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
        ran += 1
    assert ran >= 20
    # The end state the runbook promises: installed, signed by both people.
    r = cli_inproc("list", "--registry", srv / "models", "--json")
    assert r.returncode == 0 and "Qwen/Qwen2.5-7B-Instruct" in r.stdout
    assert "officer" in r.stdout and "packer" in r.stdout
