"""Every shell command in docs/plugins.md and in the example plugin's README runs as written.

Each document's ```bash blocks run, in order, in a scratch directory that holds
copies of ``configs/`` and the example plugin (the paths the commands use from
the repository root).  There ``.venv/bin/detkit`` is this interpreter's detkit
and ``.venv/bin/pip install`` installs into a throw-away folder on PYTHONPATH,
so the commands run unchanged without touching the project's environment.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = Path("plugins") / "detkit-example-backbone"
# Document -> what its commands must print (besides exiting 0).
DOCS = {
    Path("docs") / "plugins.md": ["resnet18", "detkit-example-backbone", "ok"],
    EXAMPLE / "README.md": ["resnet18", "detkit-example-backbone", "done in"],
}


def bash_blocks(path: Path) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def sandbox(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A scratch 'repository root' with configs/, the example plugin and shims for .venv/bin/{pip,detkit}."""
    work, site = tmp_path / "work", tmp_path / "site"
    shutil.copytree(REPO / "configs", work / "configs")
    # pip builds in the project folder (build/, *.egg-info): a copy, never the source tree.
    shutil.copytree(REPO / EXAMPLE, work / EXAMPLE, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    bin_dir = work / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    shims = {
        "pip": (
            'if [ "$1" = install ]; then shift; exec "{py}" -m pip install --quiet --no-deps --no-build-isolation '
            '--target "{site}" "$@"; fi\nexec "{py}" -m pip "$@"'
        ),
        "detkit": 'exec "{py}" -m detkit.cli "$@"',
    }
    for name, body in shims.items():
        shim = bin_dir / name
        shim.write_text("#!/bin/sh\n" + body.format(py=sys.executable, site=site) + "\n")
        shim.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
           "COLUMNS": "200", "NO_COLOR": "1"}
    return work, env


def test_docs_have_commands():
    for doc in DOCS:
        assert bash_blocks(REPO / doc), f"{doc} has no ```bash block"


@pytest.mark.slow
@pytest.mark.parametrize("doc", list(DOCS), ids=[str(d) for d in DOCS])
def test_doc_commands_run(doc, tmp_path):
    work, env = sandbox(tmp_path)
    output = []
    for block in bash_blocks(REPO / doc):
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=work, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{doc}: a command failed:\n{block}\n{proc.stdout}\n{proc.stderr}"
        output.append(proc.stdout + proc.stderr)
    text = "\n".join(output)
    for expected in DOCS[doc]:
        assert expected in text, f"{doc}: {expected!r} not in the commands' output:\n{text}"
