"""kdfast.layers needs only torch; kdfast.fastai says it needs fastai; every import path of
the fastai layer keeps working."""
import subprocess
import sys

import pytest

# A Python in which `import fastai` fails, as on a machine without it.
WITHOUT_FASTAI = "import sys; sys.modules['fastai'] = None; sys.modules['fastcore'] = None\n"


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_layer_tools_need_only_torch():
    out = run_python(WITHOUT_FASTAI + (
        "import torch\n"
        "from torch import nn\n"
        "from kdfast.layers import get_model_layers, get_module_by_name, match_feature_layers\n"
        "net = lambda c: nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, c, 3, stride=2, padding=1))\n"
        "print(match_feature_layers(net(4), net(8), torch.randn(1, 3, 8, 8)))\n"
        "print(get_model_layers(net(4)), get_module_by_name(net(4), '1').stride)\n"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["{'student': ['0', '1'], 'teacher': ['0', '1']}", "['0', '1'] (2, 2)"]


@pytest.mark.parametrize("module", ["kdfast.fastai", "kdfast.distributed", "kdfast.all"])
def test_the_fastai_layer_says_it_needs_fastai(module):
    out = run_python(WITHOUT_FASTAI + f"import kdfast, kdfast.functional, kdfast.losses\nimport {module}\n")
    assert out.returncode != 0
    assert "kdfast.fastai needs fastai: pip install fastai" in out.stderr
    assert "import them from kdfast.layers" in out.stderr


def test_every_import_path_of_the_fastai_layer():
    pytest.importorskip("fastai")
    import kdfast.all as everything
    import kdfast.distributed
    import kdfast.fastai
    import kdfast.fastai.callback
    import kdfast.fastai.distributed
    import kdfast.layers

    assert kdfast.fastai.KnowledgeDistillationCallback is kdfast.fastai.callback.KnowledgeDistillationCallback
    for name in ("match_feature_layers", "get_model_layers", "get_module_by_name"):
        assert getattr(kdfast.fastai, name) is getattr(kdfast.layers, name) is getattr(everything, name)
    for name in ("distrib_ctx", "MixedPrecision"):
        assert getattr(kdfast.distributed, name) is getattr(kdfast.fastai.distributed, name) \
            is getattr(everything, name)
    assert everything.KnowledgeDistillationCallback is kdfast.fastai.KnowledgeDistillationCallback
    assert everything.SoftTarget is kdfast.losses.SoftTarget and everything.cos is kdfast.schedule.cos
