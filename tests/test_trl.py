"""kdfast.integrations.trl.generalized_jsd_loss against TRL's own GKDTrainer.generalized_jsd_loss.

TRL's function is taken from the installed trl's source file (trl/experimental/gkd/
gkd_trainer.py, the GKDTrainer class) and compiled on its own: importing the trainer module
pulls in transformers and costs several seconds, the function itself needs only torch.
"""
import ast
import importlib.util
import pathlib

import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast.integrations.trl import generalized_jsd_loss
from kdfast.ops import softmax_kl as op
from helpers import assert_close, kernel_backends


def _trl_function():
    spec = importlib.util.find_spec("trl")
    if spec is None or spec.origin is None:
        pytest.skip("trl is not installed")
    path = pathlib.Path(spec.origin).parent / "experimental" / "gkd" / "gkd_trainer.py"
    if not path.is_file():
        pytest.skip(f"this trl has no {path.name} in trl/experimental/gkd")
    tree = ast.parse(path.read_text())
    trainer = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GKDTrainer"), None)
    fn = trainer and next((n for n in trainer.body
                           if isinstance(n, ast.FunctionDef) and n.name == "generalized_jsd_loss"), None)
    if fn is None:
        pytest.skip("this trl's GKDTrainer has no generalized_jsd_loss")
    fn.decorator_list = []  # @staticmethod
    namespace = {"torch": torch, "F": F}
    exec(compile(ast.Module([fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["generalized_jsd_loss"]


@pytest.fixture(scope="module")
def trl_loss():
    return _trl_function()


# TRL's conventions are the wrapper's: checked on the reference and the C++ kernels (Triton,
# interpreted here, once below).
BACKENDS = ["torch"] + [b for b in kernel_backends("cpu", op.KERNELS) if b != "triton"]


def _inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(3, 5, 17, dtype=torch.float64, generator=g).mul(3).to(dtype)
    t = torch.randn(3, 5, 17, dtype=torch.float64, generator=g).mul(3).to(dtype)
    labels = torch.randint(0, 17, (3, 5), generator=g)
    labels[0, :2] = -100
    labels[2, 4] = -100
    return s, t, labels


def _loss_and_grad(fn, s, t, **kw):
    s = s.detach().clone().requires_grad_()
    loss = fn(s, t, **kw)
    if loss.dim():
        loss.sum().backward()
    else:
        loss.backward()
    return loss.detach(), s.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_matches_trl(trl_loss, backend, beta, temperature, reduction):
    s, t, labels = _inputs()
    for kw in ({}, {"labels": labels}, {"labels": labels, "num_items_in_batch": 9},
               {"labels": labels, "num_items_in_batch": torch.tensor(11)}):
        kw = dict(kw, beta=beta, temperature=temperature, reduction=reduction)
        with kdfast.use_backend(backend):
            loss, grad = _loss_and_grad(generalized_jsd_loss, s, t, **kw)
        ref_loss, ref_grad = _loss_and_grad(trl_loss, s, t, **kw)
        assert loss.shape == ref_loss.shape
        assert_close(loss, ref_loss, 1e-10, f"loss {kw}")
        assert_close(grad, ref_grad, 1e-10, f"grad {kw}")


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends("cpu", op.KERNELS))
def test_float32_logits_match_trl_to_float32_precision(trl_loss, backend):
    s, t, labels = _inputs(torch.float32, seed=1)
    with kdfast.use_backend(backend):
        loss, grad = _loss_and_grad(generalized_jsd_loss, s, t, labels=labels, beta=0.3, temperature=1.5)
    ref_loss, ref_grad = _loss_and_grad(trl_loss, s.double(), t.double(), labels=labels, beta=0.3, temperature=1.5)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert_close(loss, ref_loss, 2e-6, "loss")
    assert_close(grad, ref_grad, 2e-6, "grad")


def test_all_tokens_masked(trl_loss):
    s, t, labels = _inputs()
    labels[:] = -100
    for reduction in ("batchmean", "sum"):
        loss = generalized_jsd_loss(s, t, labels, reduction=reduction)
        assert loss.item() == 0 and trl_loss(s, t, labels, reduction=reduction).item() == 0
    # 'mean' of no element: TRL gives NaN, kdfast 0 (documented)
    assert torch.isnan(trl_loss(s, t, labels, reduction="mean"))
    assert generalized_jsd_loss(s, t, labels, reduction="mean").item() == 0


def test_bad_arguments_are_named():
    s, t, _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match=r"generalized_jsd_loss: beta must be a number in \[0, 1\].*got 1.5"):
        generalized_jsd_loss(s, t, beta=1.5)
    with pytest.raises(ValueError, match=r"generalized_jsd_loss: temperature T must be a finite number > 0"):
        generalized_jsd_loss(s, t, temperature=0.0)
    with pytest.raises(ValueError, match=r"unknown reduction 'avg'"):
        generalized_jsd_loss(s, t, reduction="avg")


def test_the_benchmarks_peer_is_trls_function(trl_loss):
    """kdfast/bench/peers.py times TRL's formula as TRL writes it."""
    from kdfast.bench.peers import trl_generalized_jsd_loss
    s, t, labels = _inputs()
    for kw in ({}, {"labels": labels, "beta": 0.2, "temperature": 2.0}, {"beta": 1.0, "reduction": "sum"},
               {"beta": 0.0, "labels": labels, "num_items_in_batch": 7}, {"reduction": "none"}):
        assert torch.equal(trl_generalized_jsd_loss(s, t, **kw), trl_loss(s, t, **kw))
