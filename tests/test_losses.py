"""kdfast.losses: fasterai 0.4.1's numbers and gradients, the canonical RKD and PKT, and the
three ways to configure a loss."""
import functools

import pytest
import torch

import kdfast
from kdfast import losses as L
from kdfast.bench.peers import canonical_pkt, canonical_rkd
from helpers import assert_close, kernel_backends

fl = pytest.importorskip("fasterai.distill.losses")

BACKENDS = ["auto", "torch"] + kernel_backends("cpu", ("cpu", "triton"))


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def features(channels, size=(6, 5), batch=8, seed=0):
    return {f"layer{i}": randn(batch, c, *size, seed=seed + i) for i, c in enumerate(channels)}


def compare(kd_loss, fa_loss, inputs, student_keys, tol=2e-5, floor=1e-30):
    """Same value and same student gradients for the same inputs (see assert_close)."""
    def run(fn):
        leaves = {k: {n: v.clone().requires_grad_() for n, v in inputs[k].items()} if isinstance(inputs[k], dict)
                  else inputs[k].clone().requires_grad_() for k in student_keys}
        kwargs = {**inputs, **leaves}
        value = fn(**kwargs)
        value.backward()
        grads = [g.grad for k in student_keys
                 for g in (leaves[k].values() if isinstance(leaves[k], dict) else [leaves[k]])]
        return value.detach(), grads

    value, grads = run(kd_loss)
    ref_value, ref_grads = run(fa_loss)
    assert_close(value, ref_value, tol, "value", floor)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, tol, "student gradient", floor)


LOGIT_LOSSES = [
    ("SoftTarget", {}), ("SoftTarget", {"T": 3}), ("SoftTarget", {"T": 0.5}),
    ("Logits", {}), ("Mutual", {}),
    ("DecoupledKD", {}), ("DecoupledKD", {"normalize": True}), ("DecoupledKD", {"T": 2, "alpha": 0.5, "beta": 2}),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kwargs", LOGIT_LOSSES, ids=str)
def test_logit_losses_match_fasterai(backend, name, kwargs):
    inputs = {"pred": randn(16, 10, seed=1, scale=3), "teacher_pred": randn(16, 10, seed=2, scale=3),
              "target": torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(3)),
              "fm_s": {}, "fm_t": {}}
    with kdfast.use_backend(backend):
        compare(functools.partial(getattr(L, name), **kwargs), functools.partial(getattr(fl, name), **kwargs),
                inputs, ["pred"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_target_on_segmentation_logits_matches_fasterai(backend):
    """[B, C, H, W] logits: softmax over dim 1, batchmean divides by B."""
    inputs = {"pred": randn(2, 5, 4, 3, seed=4, scale=2), "teacher_pred": randn(2, 5, 4, 3, seed=5, scale=2)}
    with kdfast.use_backend(backend):
        compare(functools.partial(L.SoftTarget, T=2), functools.partial(fl.SoftTarget, T=2), inputs, ["pred"])


FEATURE_LOSSES = [
    ("Attention", {}, (8, 16, 4)), ("Attention", {"p": 4}, (8, 16, 4)), ("Attention", {"p": 1}, (3, 5, 7)),
    ("ActivationBoundaries", {}, (8, 8, 8)), ("ActivationBoundaries", {"m": 0.5}, (8, 8, 8)),
    ("FitNet", {}, (8, 8, 8)),
    ("Similarity", {}, (8, 4, 6)), ("Similarity", {"p": 1}, (8, 4, 6)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kwargs,channels", FEATURE_LOSSES, ids=str)
def test_feature_losses_match_fasterai(backend, name, kwargs, channels):
    student_channels = channels if name in ("ActivationBoundaries", "FitNet") else tuple(c // 2 + 1 for c in channels)
    inputs = {"fm_s": features(student_channels, seed=10), "fm_t": features(channels, seed=20),
              "pred": randn(8, 10, seed=30), "teacher_pred": randn(8, 10, seed=31), "target": None}
    with kdfast.use_backend(backend):
        compare(functools.partial(getattr(L, name), **kwargs), functools.partial(getattr(fl, name), **kwargs),
                inputs, ["fm_s"])


def test_three_ways_to_configure_a_loss_agree():
    s, t = randn(4, 7, seed=40), randn(4, 7, seed=41)
    direct = L.SoftTarget(pred=s, teacher_pred=t, T=3)
    positional = L.SoftTarget(s, t, T=3)
    partial = functools.partial(L.SoftTarget, T=3)(pred=s, teacher_pred=t)
    module = L.SoftTarget(T=3)
    assert isinstance(module, torch.nn.Module) and repr(module) == "SoftTarget(T=3.0)"
    configured = module(pred=s, teacher_pred=t, fm_s={}, fm_t={}, target=None)
    assert torch.equal(direct, positional) and torch.equal(direct, partial) and torch.equal(direct, configured)
    assert_close(direct, fl.SoftTarget(s, t, T=3), 1e-6)


def test_unknown_setting_is_an_error():
    with pytest.raises(TypeError, match="alpah"):
        L.DecoupledKD(T=2, alpah=3)


def test_losses_survive_deepcopy_and_pickle():
    import copy
    import pickle
    m = L.RKD(dist_weight=1, angle_weight=2)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert repr(clone) == repr(m) == "RKD(dist_weight=1, angle_weight=2)"


# --- RKD and PKT against straightforward canonical implementations (lenscloth/RKD, RepDistiller) ---

RELATIONAL_CASES = [(2, False), (3, False), (9, False), (4, True), (9, True)]


def relational_inputs(batch, duplicates, seed):
    fm_s = {"a": randn(batch, 3, 4, 4, seed=seed), "b": randn(batch, 20, seed=seed + 1)}
    fm_t = {"a": randn(batch, 5, 4, 4, seed=seed + 2), "b": randn(batch, 12, seed=seed + 3)}
    if duplicates:  # duplicate samples: zero distances, degenerate angles
        for fm in (fm_s, fm_t):
            for v in fm.values():
                v[1] = v[0]
                v[3] = v[0]
    return fm_s, fm_t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,duplicates", RELATIONAL_CASES, ids=str)
def test_rkd_matches_canonical(backend, batch, duplicates):
    """The torch backend runs the canonical formula itself; the kernels (a Gram matrix of
    centred embeddings) are checked against its float64 value: in float32, the canonical
    pdist leaves ~1e-3 of rounding in the distance of duplicate samples, and at a batch of 2
    the loss is 0 up to rounding (hence errors below 1e-6 of scale count as absolute)."""
    fm_s, fm_t = relational_inputs(batch, duplicates, seed=50)
    exact = backend != "torch"
    cast = (lambda x: x.double()) if exact else (lambda x: x)
    with kdfast.use_backend(backend):
        compare(L.RKD(), lambda fm_s, fm_t, **_: sum(canonical_rkd(cast(fm_s[k]), cast(fm_t[k])) for k in fm_s),
                {"fm_s": fm_s, "fm_t": fm_t}, ["fm_s"], tol=5e-5, floor=1e-6 if exact else 1e-30)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,duplicates", RELATIONAL_CASES, ids=str)
def test_pkt_matches_canonical(backend, batch, duplicates):
    fm_s, fm_t = relational_inputs(batch, duplicates, seed=60)
    with kdfast.use_backend(backend):
        compare(L.PKT(), lambda fm_s, fm_t, **_: sum(canonical_pkt(fm_s[k], fm_t[k]) for k in fm_s),
                {"fm_s": fm_s, "fm_t": fm_t}, ["fm_s"], tol=5e-5)


def test_relational_losses_use_outputs_without_hooked_layers():
    s, t = randn(6, 16, seed=70), randn(6, 32, seed=71)
    assert_close(L.RKD(pred=s, teacher_pred=t, fm_s={}, fm_t={}), canonical_rkd(s, t), 1e-5)
    assert_close(L.PKT(pred=s, teacher_pred=t), canonical_pkt(s, t), 1e-5)


def test_rkd_weights():
    fm_s, fm_t = relational_inputs(5, False, seed=80)
    only_distance = L.RKD(dist_weight=1, angle_weight=0)(fm_s=fm_s, fm_t=fm_t)
    only_angle = L.RKD(dist_weight=0, angle_weight=1)(fm_s=fm_s, fm_t=fm_t)
    assert_close(L.RKD(fm_s=fm_s, fm_t=fm_t), 25 * only_distance + 50 * only_angle, 1e-6)


def test_benchmark_peers_are_fasterai():
    """The eager formulas the benchmarks time (bench/peers.py) are fasterai's losses."""
    from kdfast.bench.peers import fasterai_attention, fasterai_similarity, fasterai_soft_target
    s, t = randn(16, 10, seed=1, scale=3), randn(16, 10, seed=2, scale=3)
    assert_close(fasterai_soft_target(s, t, T=4.0), fl.SoftTarget(s, t, T=4.0), 1e-6)
    fm_s, fm_t = features([3, 5], seed=10), features([6, 2], seed=20)
    assert_close(fasterai_attention(list(fm_s.values()), list(fm_t.values())),
                 fl.Attention(fm_s, fm_t), 1e-6)
    flat = lambda fm: [v.flatten(1) for v in fm.values()]  # noqa: E731
    assert_close(sum(fasterai_similarity(a, b) for a, b in zip(flat(fm_s), flat(fm_t))),
                 fl.Similarity(fm_s, fm_t, pred=None), 1e-6)


@pytest.mark.parametrize("name,fn,kwargs", [("ReverseKL", "reverse_kl", {"T": 2.0}), ("JSD", "jsd", {"beta": 0.3}),
                                            ("TVD", "tvd", {})])
def test_llm_losses_are_the_functions_with_the_callbacks_convention(name, fn, kwargs):
    """[B, L, V] token logits, labels with -100 from the callback's `target`; a TopK teacher."""
    from kdfast import functional as KF
    s, t = randn(2, 6, 30, seed=6, scale=2), randn(2, 6, 30, seed=7, scale=2)
    labels = torch.randint(0, 30, (2, 6), generator=torch.Generator().manual_seed(8))
    labels[0, :2] = -100
    expected = getattr(KF, fn)(s, t, target=labels, **kwargs)
    cls = getattr(L, name)
    for value in (cls(pred=s, teacher_pred=t, target=labels, fm_s={}, fm_t={}, **kwargs),
                  functools.partial(cls, **kwargs)(pred=s, teacher_pred=t, target=labels),
                  cls(**kwargs)(pred=s, teacher_pred=t, target=labels)):
        assert torch.equal(value, expected)
    # a float (soft / one-hot) target leaves no rows out; classification logits [B, C] with labels
    assert torch.equal(cls(**kwargs)(pred=s, teacher_pred=t, target=torch.rand(2, 6, 30)),
                       getattr(KF, fn)(s, t, **kwargs))
    assert torch.equal(cls(**kwargs)(pred=s[0], teacher_pred=t[0], target=labels[1]),
                       getattr(KF, fn)(s[0], t[0], **kwargs))
    topk = kdfast.topk_logits(t, 5)
    sparse = cls(tail="renormalize", **kwargs)(pred=s, teacher_pred=topk, target=labels)
    assert torch.equal(sparse, getattr(KF, fn)(s, topk, target=labels, tail="renormalize", **kwargs))
    assert name in repr(cls(**kwargs)) and "tail='bucket'" in repr(cls(**kwargs))
