"""kdfast.integrations.hf: the DistillationTrainer and the compute_loss_func on real tiny
transformers models (random init), against the loss computed from materialised logits with
kdfast's reference divergences and torch's cross-entropy."""
import copy
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from kdfast import functional as KF  # noqa: E402
from kdfast.integrations import hf  # noqa: E402

VOCAB = 67  # odd on purpose
SEQ = 9
HERE = os.path.dirname(os.path.abspath(__file__))


def llama(hidden, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return transformers.LlamaForCausalLM(cfg)


def gpt2(hidden, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=2, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=1)
    return transformers.GPT2LMHeadModel(cfg)


def examples(n, seed=1):
    """Causal LM examples with -100 labels: a prompt of varying length and right padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (SEQ,), generator=g)
        mask = torch.ones(SEQ, dtype=torch.long)
        labels = ids.clone()
        labels[: 1 + i % 3] = -100  # a prompt
        pad = i % 4
        if pad:
            ids[-pad:], mask[-pad:], labels[-pad:] = 2, 0, -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def batch(items):
    return {k: torch.stack([x[k] for x in items]) for k in items[0]}


def reference_loss(student, teacher, inputs, divergence, T, beta, kd_weight, hard_weight):
    """Materialised: both models' logits, shifted, kdfast's divergence + CE over labels != -100."""
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    zs = student(**kwargs).logits[:, :-1].reshape(-1, VOCAB).double()
    with torch.no_grad():
        zt = teacher(**kwargs).logits[:, :-1].reshape(-1, VOCAB).double()
    target = inputs["labels"][:, 1:].reshape(-1)
    fn = {"forward_kl": KF.soft_target_kl, "reverse_kl": KF.reverse_kl, "tvd": KF.tvd}.get(divergence)
    if fn is None:
        kd = KF.jsd(zs, zt, beta=beta, T=T, reduction="sum", target=target)
    else:
        kd = fn(zs, zt, T=T, reduction="sum", target=target)
    ce = F.cross_entropy(zs, target, ignore_index=-100, reduction="sum")
    return (kd_weight * kd + hard_weight * ce) / (target != -100).sum()


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                disable_tqdm=True, per_device_train_batch_size=4, dataloader_num_workers=0, seed=0,
                lr_scheduler_type="constant", warmup_steps=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


@pytest.mark.parametrize("divergence,T,beta", [("forward_kl", 2.0, 0.5), ("reverse_kl", 1.0, 0.5),
                                               ("jsd", 1.5, 0.3), ("tvd", 1.0, 0.5)])
@pytest.mark.parametrize("student_kind", ["llama", "gpt2"])
def test_trainer_loss_and_gradients_match_materialised_reference(tmp_path, divergence, T, beta, student_kind):
    teacher = llama(32, seed=1)
    student = (llama(16) if student_kind == "llama" else gpt2(16)).double()
    teacher = teacher.double()
    ref_student = copy.deepcopy(student)
    trainer = hf.DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path), divergence=divergence,
                                     T=T, beta=beta, kd_weight=0.7, hard_weight=0.4)
    inputs = batch(examples(4))
    student.train()
    loss = trainer.compute_loss(student, dict(inputs))
    loss.backward()
    ref_student.train()
    ref = reference_loss(ref_student, teacher, inputs, divergence, T, beta, 0.7, 0.4)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-8)
    for (name, p), q in zip(student.named_parameters(), ref_student.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-9, msg=name)
    assert all(p.grad is None for p in teacher.parameters())


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """4 examples with different numbers of valid tokens: one batch of 4 and two accumulated
    batches of 2 give the same step (the sum divided by num_items_in_batch, not a mean of means)."""
    teacher = llama(24, seed=1)
    data = examples(4)
    finals = []
    for bs, accumulation in ((4, 1), (2, 2)):
        student = llama(16)
        trainer = hf.DistillationTrainer(model=student, teacher_model=teacher, train_dataset=data,
                                         args=args(tmp_path, per_device_train_batch_size=bs,
                                                   gradient_accumulation_steps=accumulation, max_steps=1,
                                                   optim="sgd", learning_rate=0.5),
                                         divergence="reverse_kl", hard_weight=0.5)
        trainer.train()
        finals.append(({n: p.detach().clone() for n, p in student.named_parameters()},
                       trainer.state.log_history[0]["loss"]))
    (big, big_loss), (acc, acc_loss) = finals
    assert big_loss == pytest.approx(acc_loss, rel=1e-4)
    moved = 0
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=1e-4, atol=1e-6, msg=name)
        moved += int(not torch.equal(big[name], llama(16).state_dict()[name]))
    assert moved > 0  # the step changed the weights


def test_teacher_frozen_untouched_and_training_lowers_the_loss(tmp_path):
    teacher = llama(32, seed=1)
    teacher.train()  # the trainer must put it in eval mode
    before = copy.deepcopy(teacher.state_dict())
    student = gpt2(16)
    data = examples(8) * 4
    trainer = hf.DistillationTrainer(model=student, teacher_model=teacher, train_dataset=data,
                                     args=args(tmp_path, num_train_epochs=3, learning_rate=3e-3),
                                     divergence="forward_kl", hard_weight=0.0)
    trainer.train()
    assert not trainer.teacher_model.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 24
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4])


def test_eval_loss_is_the_students_cross_entropy(tmp_path):
    teacher, student = llama(32, seed=1), llama(16)
    data = examples(6)
    trainer = hf.DistillationTrainer(model=student, teacher_model=teacher, eval_dataset=data,
                                     args=args(tmp_path, per_device_eval_batch_size=6), hard_weight=0.5)
    got = trainer.evaluate()["eval_loss"]
    inputs = batch(data)
    with torch.no_grad():
        logits = student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), inputs["labels"][:, 1:].reshape(-1), ignore_index=-100)
    assert got == pytest.approx(ce.item(), rel=1e-5)


@pytest.mark.parametrize("divergence", ["jsd", "forward_kl"])
def test_compute_loss_func_in_a_plain_trainer(tmp_path, divergence):
    teacher, student = llama(32, seed=1).double(), llama(16).double()
    ref_student = copy.deepcopy(student)
    loss_func = hf.distillation_loss_func(teacher, student, divergence=divergence, T=2.0, beta=0.5, hard_weight=0.3)
    trainer = transformers.Trainer(model=student, args=args(tmp_path), compute_loss_func=loss_func)
    inputs = batch(examples(4))
    student.train()
    loss = trainer.compute_loss(student, dict(inputs))
    loss.backward()
    ref_student.train()
    ref = reference_loss(ref_student, teacher, inputs, divergence, 2.0, 0.5, 1.0, 0.3)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-8)
    for p, q in zip(student.parameters(), ref_student.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-9)
    assert all(p.grad is None for p in teacher.parameters())


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="teacher_model is required"):
        hf.DistillationTrainer(model=llama(16), args=args(tmp_path))
    with pytest.raises(ValueError, match="divergence='kl'"):
        hf.DistillationTrainer(model=llama(16), teacher_model=llama(16), args=args(tmp_path), divergence="kl")
    with pytest.raises(ValueError, match="kd_weight and hard_weight are both 0"):
        hf.distillation_loss_func(llama(16), llama(16), kd_weight=0)
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB + 1, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2))
    with pytest.raises(ValueError, match="67 classes and the teacher.s 68"):
        hf.DistillationTrainer(model=llama(16), teacher_model=other, args=args(tmp_path))


def test_soft_capped_logits_are_refused(tmp_path):
    """Gemma 2's logits are cap·tanh(z/cap): not the linear head the fused loss computes."""
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                    final_logit_softcapping=0.5, pad_token_id=2)
    teacher = transformers.Gemma2ForCausalLM(cfg)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(50)  # logits of a few units: well beyond the cap
    trainer = hf.DistillationTrainer(model=llama(16), teacher_model=teacher, args=args(tmp_path))
    trainer.model.train()
    with pytest.raises(ValueError, match="soft-capped or scaled logits"):
        trainer.compute_loss(trainer.model, batch(examples(2)))


def test_missing_transformers_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "kdfast.integrations.hf")
    with pytest.raises(ImportError, match=r"pip install 'kdfast\[hf\]'"):
        importlib.import_module("kdfast.integrations.hf")


def test_two_processes_over_gloo_match_one(tmp_path):
    """torchrun with 2 CPU processes (gloo): each rank trains on half of every global batch;
    the logged losses and the final weights equal one process's on the whole batch."""
    sys.path.insert(0, HERE)
    try:
        import hf_ddp_worker
    finally:
        sys.path.remove(HERE)
    one = hf_ddp_worker.run(str(tmp_path / "one"))
    out = tmp_path / "two.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", KDFAST_HF_TEST_OUT=str(out), PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "hf_ddp_worker.py")]
    done = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    two = json.loads(out.read_text())
    assert one["world"] == 1 and two["world"] == 2
    assert two["ranks_trained"] == [0, 1]
    assert len(one["losses"]) == len(two["losses"]) == 3
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4)
    assert two["checksum"] == pytest.approx(one["checksum"], rel=1e-5)
    assert one["losses"][-1] != one["losses"][0]
