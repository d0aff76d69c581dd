"""``kdfast demo llm``: distilling a causal language model with the Hugging Face Trainer, offline.

The text is Python's own documentation of its keywords, statements and types
(``pydoc_data.topics``, shipped with every Python), read one character per token. A Llama-style
teacher (a transformers config, random init) is trained first, then a smaller student of the
same family four times from the same initialisation and for the same steps: alone (the
cross-entropy with the next character) and distilled by kdfast's ``DistillationTrainer`` with
forward KL, reverse KL and JSD (β = 0.5), each plus the same cross-entropy. The Trainer shows
its progress bars; the demo ends with a table of validation perplexities (the student's own
cross-entropy on held-out text, comparable across runs), seconds per step and the
distillation overhead over the student alone, then the peak memory of one loss step (forward
and backward) fused against materialised logits, and writes a plot and the numbers as JSON
into the output folder.

    kdfast demo llm                     # a few minutes on 2 CPU cores
    kdfast demo llm --steps 60          # a quick look
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

RUNS = [("student alone", None), ("forward KL", "forward_kl"), ("reverse KL", "reverse_kl"), ("JSD (β=0.5)", "jsd")]


# ---------------------------------------------------------------------------------------------
# Data: characters of Python's documentation

def load_text() -> str:
    """Python's documentation topics (``pydoc_data.topics``, part of the standard library)."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


class CharTokenizer:
    """One token per character seen in the text; vocabulary in sorted order."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str):
        import torch
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def windows(ids, seq: int, stride: int) -> list[dict]:
    """Causal LM examples: windows of ``seq`` tokens every ``stride``; labels are the inputs
    (the models shift them)."""
    return [{"input_ids": ids[i:i + seq], "labels": ids[i:i + seq]}
            for i in range(0, len(ids) - seq + 1, stride)]


def datasets(seq: int, valid_fraction: float = 0.1, chars: int | None = None):
    """Train and validation windows: the text's last ``valid_fraction`` is held out."""
    text = load_text()[:chars]
    tok = CharTokenizer(text)
    ids = tok.encode(text)
    split = int(len(ids) * (1 - valid_fraction))
    train, valid = windows(ids[:split], seq, seq // 2), windows(ids[split:], seq, seq)
    return tok, train, valid, len(text)


# ---------------------------------------------------------------------------------------------
# Models and training

def llama(vocab: int, hidden: int, layers: int, heads: int, seq: int, seed: int):
    import torch
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(8 * hidden / 3) // 8 * 8,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                   max_position_embeddings=seq, bos_token_id=None, eos_token_id=None,
                                   pad_token_id=None, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def _callbacks():
    import transformers

    class StepTimer(transformers.TrainerCallback):
        """Seconds per optimizer step (forward, backward, step) and the validation curve."""

        def __init__(self):
            self.step_s, self.curve = [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_s.append(time.perf_counter() - self._t0)

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if metrics and "eval_loss" in metrics:
                self.curve.append((state.global_step, math.exp(metrics["eval_loss"])))
    return StepTimer()


def train(model, train_ds, valid_ds, steps: int, lr: float, bs: int, out: Path, seed: int, teacher=None,
          divergence: str | None = None, T: float = 1.0, kd_weight: float = 1.0, hard_weight: float = 1.0,
          evals: int = 5, quiet: bool = False) -> dict:
    """Train ``model`` for ``steps`` (alone, or distilled from ``teacher``); the validation
    perplexity ``evals`` times along the way and at the end; seconds per step."""
    import transformers

    from .integrations.hf import DistillationTrainer

    args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="kdfast-demo-llm-"),  # nothing is saved there (save_strategy 'no')
        use_cpu=True, report_to=[], save_strategy="no", seed=seed,
        per_device_train_batch_size=bs, per_device_eval_batch_size=4 * bs, max_steps=steps, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.0,
        eval_strategy="steps", eval_steps=max(1, steps // evals), logging_steps=max(1, steps // evals),
        dataloader_num_workers=0, disable_tqdm=quiet, log_level="warning")
    timer = _callbacks()
    common = dict(model=model, args=args, train_dataset=train_ds, eval_dataset=valid_ds, callbacks=[timer])
    if teacher is None:
        trainer = transformers.Trainer(**common)
    else:
        trainer = DistillationTrainer(**common, teacher_model=teacher, divergence=divergence, T=T,
                                      kd_weight=kd_weight, hard_weight=hard_weight)
    if quiet:  # no progress bars, and no printed logs either
        trainer.remove_callback(transformers.PrinterCallback)
    trainer.train()
    final = trainer.evaluate()
    if not timer.curve or timer.curve[-1][0] != steps:
        timer.curve.append((steps, math.exp(final["eval_loss"])))
    train_losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"valid_perplexity": math.exp(final["eval_loss"]), "curve": timer.curve, "step_s": timer.step_s,
            "train_loss": train_losses}


# ---------------------------------------------------------------------------------------------
# Memory: one loss step, fused against materialised logits

def loss_memory(tokens: int, vocab: int, student_hidden: int, teacher_hidden: int, divergence: str = "forward_kl",
                seed: int = 0) -> dict:
    """Peak extra bytes of one forward and backward of the loss from hidden states and LM
    heads: kdfast's fused linear loss against the eager path (both logits, log_softmax,
    the divergence, the cross-entropy, backward), measured by kdfast's benchmark harness."""
    import torch
    import torch.nn.functional as F

    from . import functional as KF
    from .bench.harness import peak_extra_memory
    from .ops.softmax_kl import divergence_elements

    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(tokens, student_hidden, generator=g).requires_grad_()
    ws = (torch.randn(vocab, student_hidden, generator=g) / student_hidden ** 0.5).requires_grad_()
    ht = torch.randn(tokens, teacher_hidden, generator=g)
    wt = torch.randn(vocab, teacher_hidden, generator=g) / teacher_hidden ** 0.5
    target = torch.randint(0, vocab, (tokens,), generator=g)

    def fused():
        hs.grad = ws.grad = None
        KF.fused_linear_kd(hs, ws, (ht, wt), target=target, divergence=divergence, hard_weight=1.0).backward()

    def materialised():
        hs.grad = ws.grad = None
        zs = hs @ ws.T
        with torch.no_grad():
            zt = ht @ wt.T
        kd = divergence_elements(F.log_softmax(zs, -1), F.log_softmax(zt, -1), divergence).sum() / tokens
        (kd + F.cross_entropy(zs, target)).backward()

    fused(), materialised()  # warm-up (first-use checks, allocator)
    with _quiet_stderr():  # the profiler's start/stop lines
        fused_bytes, materialised_bytes = peak_extra_memory(fused, "cpu"), peak_extra_memory(materialised, "cpu")
    return {"tokens": tokens, "vocab": vocab, "student_hidden": student_hidden, "teacher_hidden": teacher_hidden,
            "divergence": divergence, "fused_bytes": fused_bytes, "materialised_bytes": materialised_bytes,
            "one_logits_tensor_bytes": tokens * vocab * 4}


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (C++ logging) for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ---------------------------------------------------------------------------------------------
# The demo

def run_demo(steps: int = 300, teacher_steps: int | None = None, seq: int = 64, bs: int = 16, lr: float = 3e-3,
             teacher_size=(128, 3, 4), student_size=(48, 2, 2), T: float = 1.0, kd_weight: float = 1.0,
             hard_weight: float = 1.0, out: str = "demo_out/llm", seed: int = 0, chars: int | None = None,
             memory_shape=(2048, 32000, 256), quiet: bool = False) -> dict:
    import torch

    start = time.perf_counter()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher_steps = teacher_steps or 2 * steps
    tok, train_ds, valid_ds, n_chars = datasets(seq, chars=chars)
    vocab = len(tok)
    print(f"data: Python's documentation topics (pydoc_data), {n_chars} characters, {vocab} distinct "
          f"(one token each); {len(train_ds)} training windows of {seq} (stride {seq // 2}), "
          f"{len(valid_ds)} validation windows; batch {bs}; {torch.get_num_threads()} CPU threads", flush=True)

    def size(model):
        return sum(p.numel() for p in model.parameters())

    runs: dict[str, dict] = {}
    th, tl, tn = teacher_size
    teacher = llama(vocab, th, tl, tn, seq, seed + 1)
    print(f"\n== 1. teacher: Llama, hidden {th}, {tl} layers, {size(teacher) / 1e6:.2f} M parameters, "
          f"{teacher_steps} steps", flush=True)
    runs["teacher"] = train(teacher, train_ds, valid_ds, teacher_steps, lr, bs, out_dir, seed, quiet=quiet)
    sh, sl, sn = student_size
    for i, (name, divergence) in enumerate(RUNS, start=2):
        student = llama(vocab, sh, sl, sn, seq, seed)  # the same initialisation for every student
        how = "alone (cross-entropy)" if divergence is None else \
            f"distilled: {kd_weight:g}·{name} + {hard_weight:g}·cross-entropy, T = {T:g}"
        print(f"\n== {i}. student: Llama, hidden {sh}, {sl} layers, {size(student) / 1e6:.2f} M parameters, "
              f"{steps} steps, {how}", flush=True)
        runs[name] = train(student, train_ds, valid_ds, steps, lr, bs, out_dir, seed,
                           teacher=None if divergence is None else teacher, divergence=divergence, T=T,
                           kd_weight=kd_weight, hard_weight=hard_weight, quiet=quiet)

    rows = _summary(runs)
    print()
    _print_table(rows)
    memory = []
    tokens = bs * (seq - 1)
    shapes = [(tokens, vocab, sh, th, "this demo's batch")]
    if memory_shape:
        shapes.append((*memory_shape[:2], memory_shape[2], memory_shape[2], "an LLM-sized head"))
    print("\npeak extra memory of one loss step (forward + backward, fp32, forward KL + cross-entropy):")
    for n, v, hs, ht, label in shapes:
        m = loss_memory(n, v, hs, ht)
        m["label"] = label
        memory.append(m)
        print(f"  {label}: {n} tokens, vocabulary {v}, hidden {hs}/{ht}: fused {m['fused_bytes'] / 2**20:.1f} MiB, "
              f"materialised {m['materialised_bytes'] / 2**20:.1f} MiB "
              f"({m['fused_bytes'] / m['materialised_bytes']:.1%}); one fp32 logits tensor "
              f"{m['one_logits_tensor_bytes'] / 2**20:.1f} MiB", flush=True)

    results = {"data": "pydoc_data.topics", "characters": n_chars, "vocab": vocab, "seq": seq, "bs": bs, "lr": lr,
               "steps": steps, "teacher_steps": teacher_steps, "teacher_size": list(teacher_size),
               "student_size": list(student_size), "T": T, "kd_weight": kd_weight, "hard_weight": hard_weight,
               "seed": seed, "torch_threads": torch.get_num_threads(), "runs": runs, "summary": rows,
               "memory": memory, "total_s": time.perf_counter() - start}
    plot_path = out_dir / "perplexity.png"
    _plot(runs, plot_path, f"Python docs, characters: validation perplexity (student {sh}x{sl}, teacher {th}x{tl})")
    with open(out_dir / "results.json", "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {plot_path} and {out_dir / 'results.json'} ({results['total_s'] / 60:.1f} minutes in all)")
    return results


def _summary(runs: dict) -> list[dict]:
    from statistics import median

    alone = median(runs["student alone"]["step_s"])
    rows = []
    for name, run in runs.items():
        row = {"model": name, "valid_perplexity": run["valid_perplexity"], "s_per_step": median(run["step_s"])}
        if name not in ("teacher", "student alone"):
            row["kd_overhead"] = row["s_per_step"] / alone - 1
            row["perplexity_vs_alone"] = run["valid_perplexity"] / runs["student alone"]["valid_perplexity"] - 1
        rows.append(row)
    return rows


def _print_table(rows: list[dict]) -> None:
    header = f"{'model':<16} {'valid perplexity':>17} {'vs alone':>9} {'s/step':>8} {'KD overhead':>12}"
    print(header)
    print("-" * len(header))
    for r in rows:
        vs = f"{r['perplexity_vs_alone']:+.1%}" if "perplexity_vs_alone" in r else ""
        overhead = f"{r['kd_overhead']:+.0%}" if "kd_overhead" in r else ""
        print(f"{r['model']:<16} {r['valid_perplexity']:>17.3f} {vs:>9} {r['s_per_step']:>8.3f} {overhead:>12}")
    print("(s/step: median over the steps; KD overhead: seconds per step over the student alone, the teacher's "
          "forward included)")


def _plot(runs: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, run in runs.items():
        steps, ppl = zip(*run["curve"])
        style = dict(color="gray", linestyle="--") if name == "teacher" else {}
        ax.plot(steps, ppl, marker="o", label=name, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("validation perplexity (per character)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _triple(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected three positive integers HIDDEN,LAYERS,HEADS")
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kdfast demo llm", description="Distil a causal LM with the Hugging Face Trainer, offline: a Llama "
        "teacher on Python's documentation, a smaller student alone and distilled (forward KL, reverse KL, JSD).")
    parser.add_argument("--steps", type=int, default=300, help="training steps of each student (default 300)")
    parser.add_argument("--teacher-steps", type=int, help="training steps of the teacher (default 2 x --steps)")
    parser.add_argument("--seq", type=int, default=64, help="characters per window (default 64)")
    parser.add_argument("--bs", type=int, default=16, help="batch size (default 16)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate, cosine schedule (default 3e-3)")
    parser.add_argument("--teacher", type=_triple, default=(128, 3, 4), metavar="H,L,HEADS",
                        help="teacher hidden size, layers, heads (default 128,3,4)")
    parser.add_argument("--student", type=_triple, default=(48, 2, 2), metavar="H,L,HEADS",
                        help="student hidden size, layers, heads (default 48,2,2)")
    parser.add_argument("--T", type=float, default=1.0, help="distillation temperature (default 1)")
    parser.add_argument("--kd-weight", type=float, default=1.0, help="weight of the divergence (default 1)")
    parser.add_argument("--hard-weight", type=float, default=1.0, help="weight of the cross-entropy (default 1)")
    parser.add_argument("--chars", type=int, help="use only the first N characters of the text")
    parser.add_argument("--memory-shape", default="2048,32000,256", metavar="TOKENS,VOCAB,HIDDEN",
                        help="the larger loss-memory comparison (default 2048,32000,256; 'none' skips it)")
    parser.add_argument("--out", default="demo_out/llm", help="output folder (default demo_out/llm)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's; 1 is faster on a "
                                                    "machine busy with other work)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name in ("steps", "teacher_steps", "bs", "chars", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.seq < 4:
        parser.error(f"--seq must be at least 4, got {args.seq}")
    for name in ("teacher", "student"):
        h, _, heads = getattr(args, name)
        if h % heads or (h // heads) % 2:
            parser.error(f"--{name} {h},{_},{heads}: the hidden size must be a multiple of the heads, with an even "
                         f"size per head (rotary embeddings)")
    memory_shape = None
    if args.memory_shape != "none":
        try:
            memory_shape = _triple(args.memory_shape)
        except argparse.ArgumentTypeError as e:
            parser.error(f"--memory-shape {e}")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    run_demo(steps=args.steps, teacher_steps=args.teacher_steps, seq=args.seq, bs=args.bs, lr=args.lr,
             teacher_size=args.teacher, student_size=args.student, T=args.T, kd_weight=args.kd_weight,
             hard_weight=args.hard_weight, out=args.out, seed=args.seed, chars=args.chars,
             memory_shape=memory_shape, quiet=args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
