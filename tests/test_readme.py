"""Every Python block of README.md runs as written: in order, in one namespace (as a reader
pasting them into a notebook), offline, with stand-ins for what the blocks download
(helpers.offline_tutorial_env: fasterai's tutorial data as 24 small images named like
Oxford PETS, random ResNet-34 weights in torch's cache)."""
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("fastai")
pytest.importorskip("sklearn")
from helpers import offline_tutorial_env  # noqa: E402

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")

# Runs the blocks one by one; on an error, names the block and its first line.
DRIVER = '''
import json, sys, traceback
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for i, code in enumerate(blocks, 1):
    try:
        exec(compile(code, f"README.md python block {i}", "exec"), namespace)
    except Exception:
        traceback.print_exc()
        sys.exit(f"README.md python block {i} of {len(blocks)} failed: {code.splitlines()[0]!r}")
print("PAIRS", namespace["pairs"])
'''


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_every_python_block_of_the_readme_runs(tmp_path):
    with open(README) as f:
        blocks = python_blocks(f.read())
    assert len(blocks) >= 3
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    run = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "blocks.json")],
                         env=offline_tutorial_env(tmp_path), cwd=tmp_path, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    # the layer pairs the README shows in a comment are the ones match_feature_layers found
    shown = re.search(r"^# (\{'student': .*\})$", "".join(blocks), flags=re.M).group(1)
    assert f"PAIRS {shown}" in run.stdout
