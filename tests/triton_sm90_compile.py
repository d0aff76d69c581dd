"""Compiles every Triton kernel kdfast launches for an sm_90 GPU (H100/H200), without one.

Run by tests/test_triton_compile.py in a process of its own: the kernels must be real
``triton.jit`` functions, not the interpreter's (the tests run with TRITON_INTERPRET=1).
Each kernel launch of the public wrappers, called on small CPU tensors, is turned into a
compilation for ``GPUTarget("cuda", 90, 32)`` with the launch's own argument types and
constexprs; the compiler rejects what the interpreter lets through (module globals that
are not constexpr, unsupported dtypes, shape rules of tl.dot). Prints a JSON report.
"""
import json
import sys
import traceback

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

TARGET = GPUTarget("cuda", 90, 32)
TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
         torch.int64: "i64", torch.int32: "i32", torch.bool: "i1"}
compiled, failures = [], []


def _arg_type(value):
    if isinstance(value, torch.Tensor):
        return "*" + TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {value!r}")


def compile_only(self, grid):
    def launch(*args, num_warps=4, num_stages=3, **kwargs):
        bound = dict(zip(self.arg_names, args), **kwargs)
        signature, constexprs = {}, {}
        for i, param in enumerate(self.params):
            value = bound[param.name]
            if param.is_constexpr:
                signature[param.name] = "constexpr"
                constexprs[(i,)] = value
            else:
                signature[param.name] = _arg_type(value)
        key = (self.fn.__name__, tuple(signature.values()), tuple(map(str, constexprs.values())), num_warps)
        if key in seen:
            return
        seen.add(key)
        try:
            triton.compile(ASTSource(fn=self, signature=signature, constexprs=constexprs), target=TARGET,
                           options={"num_warps": num_warps, "num_stages": num_stages})
            compiled.append(self.fn.__name__)
        except Exception:  # noqa: BLE001 - reported, with the launch that failed
            failures.append({"kernel": self.fn.__name__, "signature": signature,
                             "error": traceback.format_exc(limit=2)[-1500:]})
    return launch


seen: set = set()
JITFunction.__getitem__ = compile_only


def run_all():
    from kdfast.triton.attention import attention_transfer_backward_triton, attention_transfer_forward_triton
    from kdfast.triton.relational import pkt_gram, rkd_gram, similarity_gram
    from kdfast.triton.softmax_kl import softmax_kl_topk_triton, softmax_kl_triton

    g = torch.Generator().manual_seed(0)
    scale = torch.ones((), dtype=torch.float64)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        s, t = torch.randn(6, 40, generator=g).to(dtype), torch.randn(6, 40, generator=g).to(dtype)
        target = torch.randint(0, 40, (6,), generator=g)
        for decoupled in (False, True):
            softmax_kl_triton(s, t, target if decoupled else None, scale, 1, 4.0, -100, 1.0, 8.0, decoupled, True)
        seg_s, seg_t = torch.randn(2, 5, 3, 4, generator=g).to(dtype), torch.randn(2, 5, 3, 4, generator=g).to(dtype)
        softmax_kl_triton(seg_s, seg_t, None, scale, 1, 2.0, -100, 1.0, 8.0, False, True)  # the columns layout
        for divergence in ("reverse_kl", "jsd", "tvd"):
            softmax_kl_triton(s, t, target, scale, 1, 2.0, -100, 1.0, 8.0, False, True, divergence, 0.3)
            if dtype == torch.float32:
                softmax_kl_triton(seg_s, seg_t, None, scale, 1, 2.0, -100, 1.0, 8.0, False, True, divergence, 0.3)
        indices = torch.stack([torch.randperm(40, generator=g)[:5] for _ in range(6)])
        logprobs = torch.log_softmax(torch.randn(6, 5, generator=g, dtype=torch.float64), -1)
        logprobs = logprobs.to(torch.float64 if dtype == torch.float64 else torch.float32)
        for divergence in ("forward_kl", "reverse_kl", "jsd", "tvd"):
            for renormalize in (False, True):
                if dtype == torch.float32 or (divergence == "jsd" and not renormalize):
                    softmax_kl_topk_triton(s, indices, logprobs, target, scale, 1.0, -100, divergence, 0.5,
                                           renormalize, True)
        for p in (2.0, 2.5):
            f_s = [torch.randn(2, 8, 6, 6, generator=g).to(dtype), torch.randn(2, 4, 5, 5, generator=g).to(dtype)]
            f_t = [torch.randn(2, 16, 6, 6, generator=g).to(dtype), torch.randn(2, 6, 5, 5, generator=g).to(dtype)]
            f_s.append(f_s[0].to(memory_format=torch.channels_last))
            f_t.append(f_t[0])
            _, maps = attention_transfer_forward_triton(f_s, f_t, p)
            attention_transfer_backward_triton(torch.ones((), dtype=torch.float32), f_s, maps, p)
    for acc in (torch.float32, torch.float64):
        e = torch.randn(9, 5, generator=g, dtype=acc)
        gram_s, gram_t = e @ e.t(), (e + 1) @ (e + 1).t()
        rkd_gram(gram_s, gram_t, 25.0, 50.0, 1e-6, True)
        rkd_gram(gram_s, gram_t, 0.0, 50.0, 1e-6, True)
        pkt_gram(gram_s, gram_t, 1e-7, True)
        for p in (2.0, 1.0, 3.5):
            similarity_gram(gram_s, gram_t, p, True)


if __name__ == "__main__":
    run_all()
    json.dump({"compiled": sorted(set(compiled)), "variants": len(compiled), "failures": failures}, sys.stdout)
