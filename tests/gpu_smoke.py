"""Smoke checks of `make gpu-check`: one case per GPU kernel path, on a shape that forces
that path, against the float64 reference. Run one case per process (a crash or an illegal
memory access costs that case only):

    python tests/gpu_smoke.py --list             # the cases, one per line
    python tests/gpu_smoke.py CASE [--device cpu] [--small]

prints one JSON line: case, family, backend, dtype, the kernel path expected and the one
taken, ok, the largest errors relative to the reference's magnitude, what failed, time.
``--device cpu --small`` runs Triton cases interpreted on small shapes (the dry run).
Needs only torch, triton and kdfast.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import kdfast  # noqa: E402
from kdfast import _verify  # noqa: E402
from kdfast import functional as KF  # noqa: E402
from kdfast.ops import attention as attention_op  # noqa: E402
from kdfast.ops import softmax_kl as softmax_op  # noqa: E402

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


def _randn(shape, dtype, device, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float32) * scale).to(dtype).to(device)


def softmax_case(V, dim_shape=None, decoupled=True):
    """Rows [6, V] (or the [B, C, H, W] shape dim_shape, dim=1), with a target."""
    def build(dtype, device, small):
        shape = dim_shape or (6, V)
        if small:
            shape = (2, min(shape[1], 300), *[min(x, 3) for x in shape[2:]]) if dim_shape else (3, min(V, 700))
        s, t = _randn(shape, dtype, device, 1), _randn(shape, dtype, device, 2)
        rows = (shape[0], *shape[2:]) if dim_shape else (shape[0],)
        target = torch.randint(0, shape[1], rows, generator=torch.Generator().manual_seed(3)).to(device)
        target.view(-1)[0] = -100
        dim = 1 if dim_shape else -1
        fn = KF.decoupled_kd if decoupled else KF.soft_target_kl
        return _verify.Slice(lambda s, t, target: fn(s, t, target=target, T=3.0, dim=dim), [s, t, target], 1)
    return build


def divergence_case(V, fn, dim_shape=None):
    """softmax_case for reverse_kl / jsd / tvd (their own kernels, the same paths)."""
    kw = {"beta": 0.3} if fn is KF.jsd else {}

    def build(dtype, device, small):
        trial = softmax_case(V, dim_shape, False)(dtype, device, small)
        dim = trial.inputs[0].dim() - 1 if dim_shape is None else 1
        return _verify.Slice(lambda s, t, target: fn(s, t, target=target, T=3.0, dim=dim, **kw), trial.inputs, 1)
    return build


def topk_case(V, k, tail):
    """Rows [6, V] against a top-k teacher (bfloat16 log-probabilities), with a target."""
    def build(dtype, device, small):
        rows, v = (3, min(V, 700)) if small else (6, V)
        s, t = _randn((rows, v), dtype, device, 1), _randn((rows, v), F32, device, 2)
        topk = kdfast.topk_logits(t, min(k, v), dtype=torch.bfloat16)
        target = torch.randint(0, v, (rows,), generator=torch.Generator().manual_seed(3)).to(device)
        target[0] = -100
        T = 2.0 if tail == "renormalize" else 1.0
        trial = _verify.Slice(lambda s, i, lp, target: KF.jsd(s, kdfast.TopK(i, lp), T=T, target=target, tail=tail),
                              [s, topk.indices, topk.logprobs, target], 1)
        trial.tail = tail
        return trial
    return build


def attention_case(shapes, layout="contiguous", p=2.0, pairs=1):
    """pairs x (student [B, C_s, H, W], teacher C_t): layout of the student maps."""
    def build(dtype, device, small):
        (B, cs, ct, H, W) = shapes
        if small:
            B, cs, ct, H, W = 2, min(cs, 6), min(ct, 5), min(H, 5), min(W, 4)
        f_s, f_t = [], []
        for i in range(pairs):
            f = _randn((B, cs + i, H, W + i % 3), dtype, device, 10 + i).abs() + 0.1
            if layout == "channels_last":
                f = f.contiguous(memory_format=torch.channels_last)
            elif layout == "strided":
                f = torch.cat([f, f], 1)[:, ::2]
            f_s.append(f)
            f_t.append(_randn((B, ct + i, H, W + i % 3), dtype, device, 50 + i).abs() + 0.1)
        n = len(f_s)
        trial = _verify.Slice(lambda *maps: KF.attention_transfer(list(maps[:n]), list(maps[n:]), p=p),
                              [*f_s, *f_t], n)
        trial.p = p
        return trial
    return build


def relational_case(loss, B=130, D=300):
    def build(dtype, device, small):
        b, d = (12, 20) if small else (B, D)
        return _verify.Slice(loss, [_randn((b, d), dtype, device, 20), _randn((b, d // 2 + 3), dtype, device, 21)], 1)
    return build


# name: (family, backend, dtype, the kernel path on an H200, builder)
CASES = {}


def _add(family, backends, dtype, path, build, name):
    for backend in backends:
        expected = path if backend == "cuda" else None
        CASES[f"{family}:{backend}:{name}"] = (family, backend, dtype, expected, build)


_add("softmax_kl", ["cuda", "triton"], F32, "rows-cached", softmax_case(6144), "rows-cached-f32-6144")
_add("softmax_kl", ["cuda"], F64, "rows-cached-scalar", softmax_case(2989), "rows-cached-scalar-f64-2989")
_add("softmax_kl", ["cuda"], BF16, "rows-cached", softmax_case(12288), "rows-cached-bf16-12288")
_add("softmax_kl", ["cuda"], F32, "cluster-2", softmax_case(20000), "cluster-2-f32-20000")
_add("softmax_kl", ["cuda"], BF16, "cluster-4", softmax_case(60000), "cluster-4-bf16-60000")
_add("softmax_kl", ["cuda"], F32, "cluster-8", softmax_case(60000), "cluster-8-f32-60000")
_add("softmax_kl", ["cuda"], F64, "cluster-8", softmax_case(50000), "cluster-8-f64-50000")
_add("softmax_kl", ["cuda", "triton"], BF16, "rows-uncached", softmax_case(300000), "rows-uncached-bf16-300000")
_add("softmax_kl", ["cuda", "triton"], F32, "columns", softmax_case(None, (8, 1000, 16, 16)), "columns-f32")
_add("softmax_kl", ["cuda", "triton"], BF16, "rows-cached", divergence_case(12288, KF.jsd),
     "jsd-rows-cached-bf16-12288")
_add("softmax_kl", ["cuda"], F32, "rows-cached", divergence_case(6144, KF.reverse_kl), "rkl-rows-cached-f32-6144")
_add("softmax_kl", ["cuda"], BF16, "cluster-4", divergence_case(60000, KF.reverse_kl), "rkl-cluster-4-bf16-60000")
_add("softmax_kl", ["cuda"], F32, "cluster-8", divergence_case(60000, KF.tvd), "tvd-cluster-8-f32-60000")
_add("softmax_kl", ["cuda"], F64, "cluster-8", divergence_case(50000, KF.jsd), "jsd-cluster-8-f64-50000")
_add("softmax_kl", ["cuda", "triton"], BF16, "rows-uncached", divergence_case(300000, KF.tvd),
     "tvd-rows-uncached-bf16-300000")
_add("softmax_kl", ["cuda", "triton"], F32, "columns", divergence_case(None, KF.jsd, (8, 1000, 16, 16)),
     "jsd-columns-f32")
_add("softmax_kl", ["cuda", "triton"], BF16, "topk-bucket", topk_case(128256, 64, "bucket"),
     "topk-bucket-bf16-128256")
_add("softmax_kl", ["cuda", "triton"], F32, "topk-renormalize", topk_case(32000, 64, "renormalize"),
     "topk-renormalize-f32-32000")
_add("attention", ["cuda", "triton"], F32, "positions/positions/p2", attention_case((8, 64, 32, 32, 32)),
     "positions-f32")
_add("attention", ["cuda", "triton"], BF16, "channels+positions/channels/p2",
     attention_case((8, 64, 32, 16, 16), "channels_last"), "channels-bf16")
_add("attention", ["cuda", "triton"], F16, "scalar/scalar/p", attention_case((4, 30, 20, 9, 11), "strided", 3.0),
     "scalar-f16-p3")
_add("attention", ["cuda", "triton"], F32, None, attention_case((4, 16, 8, 8, 8), pairs=20), "20-pairs-f32")  # batched
_add("relational", ["cuda", "triton"], F32, None, relational_case(lambda s, t: KF.rkd(s, t)), "rkd-f32")
_add("relational", ["cuda", "triton"], F64, None, relational_case(lambda s, t: KF.pkt(s, t)), "pkt-f64")
_add("relational", ["cuda", "triton"], BF16, None,
     relational_case(lambda s, t: KF.similarity_preserving(s, t, p=3.5)), "similarity-p3.5-bf16")


def kernel_path(family, backend, trial):
    """The path the case's inputs take (softmax-KL and attention: the paths kdfast verifies)."""
    if family == "softmax_kl" and hasattr(trial, "tail"):
        return softmax_op.topk_kernel_path(backend, trial.tail)
    if family == "softmax_kl":
        s, t = trial.inputs[:2]
        return softmax_op.kernel_path(backend, s, t, s.dim() - 1 if s.dim() == 2 else 1)
    if family == "attention":
        n = trial.n_grad
        return attention_op.kernel_path(backend, list(zip(trial.inputs[:n], trial.inputs[n:])), trial.p)
    return None


def run_case(name, device, small):
    family, backend, dtype, expected, build = CASES[name]
    result = {"case": name, "family": family, "backend": backend, "dtype": str(dtype).replace("torch.", ""),
              "expected_path": expected, "ok": False}
    start = time.perf_counter()
    try:
        trial = build(dtype, device, small)
        result["shapes"] = trial.shapes()
        try:
            result["path"] = kernel_path(family, backend, trial)
        except Exception as e:  # noqa: BLE001 - reported, the check still runs
            result["path"] = f"unknown ({type(e).__name__}: {e})"[:200]
        problem = _verify.check_slice(family, backend, trial)
        loss, grads = trial.run(backend)
        ref_loss, ref_grads = trial.run("torch", torch.float64)
        result["loss_error"] = _verify.relative_error(loss, ref_loss)
        result["grad_error"] = max(_verify.relative_error(g, r) for g, r in zip(grads, ref_grads))
        if device == "cuda":
            torch.cuda.synchronize()
        result["problem"] = problem
        result["ok"] = problem is None and (expected is None or device != "cuda" or
                                            torch.cuda.get_device_capability() != (9, 0) or result["path"] == expected)
        if problem is None and not result["ok"]:
            result["problem"] = f"took kernel path {result['path']}, not {expected}"
    except Exception as e:  # noqa: BLE001 - one JSON line whatever happens
        result["problem"] = f"{type(e).__name__}: {e}"[:500]
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", nargs="?")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(CASES))
        return 0
    with kdfast.use_backend("auto"):
        result = run_case(args.case, args.device, args.small)
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
