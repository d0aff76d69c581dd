"""Distilling causal language models with the Hugging Face ``Trainer``, on kdfast's fused
linear distillation loss (``kdfast.functional.fused_linear_kd``): the student's and the
teacher's [tokens × vocabulary] logits are never materialised.

Two ways in::

    from kdfast.integrations.hf import DistillationTrainer
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args,
                                  train_dataset=train, divergence="reverse_kl", kd_weight=1.0, hard_weight=0.5)
    trainer.train()

or, keeping your own ``Trainer``::

    from kdfast.integrations.hf import distillation_loss_func
    trainer = Trainer(model=student, args=training_args, train_dataset=train,
                      compute_loss_func=distillation_loss_func(teacher, student, divergence="jsd", beta=0.5))

The loss, over the tokens whose (shifted) label is not -100:
``kd_weight · T² · D(teacher ‖ student) + hard_weight · CE(student, labels)``, D one of
'forward_kl', 'reverse_kl', 'jsd' (generalised, ``beta``), 'tvd' (T·TVD), as in
``kdfast.functional``. Labels are shifted as causal LMs do (position i predicts label i + 1),
or taken as they are from a ``shift_labels`` input (padding-free collators). The sum is divided
by ``num_items_in_batch`` when the Trainer gives it (the valid tokens of the whole accumulated
batch on every process: gradient accumulation and several processes give the gradient of one
big batch), by the batch's own valid tokens otherwise.

How the hidden states are taken: the model is called through the Trainer's wrapper (DDP's
gradient synchronisation runs) with ``logits_to_keep=1`` (only the last position's logits are
computed), a forward hook on its base model (``model.base_model``: LlamaModel, GPT2Model...)
records the final hidden states, and ``model.get_output_embeddings()`` gives the LM head's
weight and bias. The first call checks that the model's last logits equal that head applied to
those hidden states, so a model whose logits are not a plain linear head (Gemma 2's final logit
soft-capping, Cohere's logit scale) is refused with a clear error rather than distilled wrongly.

The teacher: put in eval mode with ``requires_grad`` off on every parameter, moved to the
student's device, unwrapped if it was wrapped; it runs under ``torch.no_grad`` on each process
(it needs no gradient synchronisation, so it is never wrapped in DDP).

Evaluation: ``eval_loss`` is the student's plain cross-entropy (the model's own loss), not the
distillation loss, so it compares with a student trained alone and ``exp(eval_loss)`` is its
perplexity; the teacher does not run during evaluation.

FSDP: the fused loss multiplies the final hidden states by the whole LM head weight outside the
model's forward. Under FSDP that weight is sharded outside the wrapped forward; wrap the LM
head so that it is not sharded (e.g. keep it out of the auto-wrap policy, or use FSDP2's
``reshard_after_forward=False`` for it), or gather it (``summon_full_params``) around the loss.
DDP (the Trainer's default for several processes, torchrun / accelerate launch) needs nothing.
"""
from __future__ import annotations

import inspect
import warnings

try:
    from transformers import Trainer
except ImportError as e:  # transformers is the optional extra kdfast[hf]
    raise ImportError(
        f"kdfast.integrations.hf needs transformers (>= 4.46) and accelerate, which are not installed ({e}); "
        f"install them with pip install 'kdfast[hf]'") from e

import torch
import torch.nn.functional as F

from .. import _checks as checks
from .. import functional as KF

__all__ = ["DistillationTrainer", "distillation_loss_func", "DistillationLoss", "final_hidden_states"]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
IGNORE_INDEX = -100  # the Trainer's and the models' label padding


# ---------------------------------------------------------------------------------------------
# The models' final hidden states and LM heads

def _base_model(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The module whose output is the hidden states the LM head receives."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        get_decoder = getattr(model, "get_decoder", None)
        base = get_decoder() if callable(get_decoder) else None
    if not isinstance(base, torch.nn.Module) or base is model:
        raise TypeError(f"{name}: {type(model).__name__} has no base model (model.base_model or model.get_decoder()) "
                        f"whose output is the final hidden states; pass a causal LM such as AutoModelForCausalLM "
                        f"gives (LlamaForCausalLM, GPT2LMHeadModel, ...)")
    return base


def _lm_head(model: torch.nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"{name}: {type(model).__name__}.get_output_embeddings() gives {type(head).__name__}, not a "
                        f"linear LM head with a [vocabulary, hidden] weight; kdfast's fused loss needs one")
    return weight, getattr(head, "bias", None)


def _accepts(model: torch.nn.Module, arg: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return arg in params


_warned_full_logits: set[str] = set()


def final_hidden_states(model: torch.nn.Module, inputs: dict, call=None, name: str = "model", check: bool = True):
    """Run ``call(**inputs)`` (``call`` defaults to ``model``; pass the Trainer's wrapped model so
    that DDP sees the forward) and return ``(outputs, hidden, weight, bias)``: the final hidden
    states [B, S, H] that ``model``'s LM head receives, recorded by a forward hook on its base
    model, and that head's weight [V, H] and bias. Only the last position's logits are computed
    when the model takes ``logits_to_keep``. ``check``: verify that those logits equal the head
    applied to the hidden states (a model with soft-capped or scaled logits is refused)."""
    base = _base_model(model, name)
    weight, bias = _lm_head(model, name)
    recorded = []

    def record(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", None)
        if hidden is None and isinstance(output, dict):
            hidden = output.get("last_hidden_state")
        recorded.append(hidden)

    kwargs = dict(inputs)
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    elif type(model).__name__ not in _warned_full_logits:
        _warned_full_logits.add(type(model).__name__)
        warnings.warn(f"{name}: {type(model).__name__}.forward takes no logits_to_keep; its full logits are computed "
                      f"(and unused) on every step", stacklevel=3)
    if _accepts(model, "use_cache"):
        kwargs.setdefault("use_cache", False)
    handle = base.register_forward_hook(record)
    try:
        outputs = (call if call is not None else model)(**kwargs)
    finally:
        handle.remove()
    if not recorded or not isinstance(recorded[-1], torch.Tensor):
        raise TypeError(f"{name}: the base model {type(base).__name__} did not return its hidden states "
                        f"(last_hidden_state or the first output) during the forward of {type(model).__name__}")
    hidden = recorded[-1]
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: the final hidden states have width {hidden.shape[-1]} but the LM head's weight is "
                         f"{tuple(weight.shape)} ([vocabulary, hidden] expected)")
    if check:
        _check_linear_head(outputs, hidden, weight, bias, name, model)
    return outputs, hidden, weight, bias


def _check_linear_head(outputs, hidden, weight, bias, name, model):
    """The model's last-position logits must be ``hidden @ weight.T + bias``."""
    logits = outputs["logits"] if isinstance(outputs, dict) else getattr(outputs, "logits", None)
    if logits is None:
        return
    with torch.no_grad():
        got = logits[..., -1, :].float()
        want = F.linear(hidden[..., -1, :], weight, bias).float()
        # The same product in the model's dtype: only rounding may differ (a few ulps of the largest logit).
        tol = max(64 * torch.finfo(weight.dtype).eps, 1e-5) * float(want.abs().max().clamp(min=1e-3))
        if got.shape != want.shape or not torch.allclose(got, want, rtol=0, atol=tol):
            err = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
            raise ValueError(
                f"{name}: {type(model).__name__}'s logits are not its LM head applied to its final hidden states "
                f"(max difference {err:.3g}); kdfast's fused loss computes exactly that linear head, so a model "
                f"with soft-capped or scaled logits (final_logit_softcapping, logit_scale) cannot use it")


def prepare_teacher(teacher: torch.nn.Module, device=None) -> torch.nn.Module:
    """The teacher unwrapped (DDP / DataParallel / torch.compile), in eval mode, with
    ``requires_grad`` off on every parameter, on ``device``."""
    if not isinstance(teacher, torch.nn.Module):
        raise TypeError(f"teacher_model: expected a torch.nn.Module (a causal LM), got {type(teacher).__name__}")
    while True:
        inner = getattr(teacher, "module", None) or getattr(teacher, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            break
        teacher = inner
    teacher.eval()
    teacher.requires_grad_(False)
    if device is not None:
        teacher.to(device)
    return teacher


# ---------------------------------------------------------------------------------------------
# The loss

class _Settings:
    def __init__(self, divergence, T, beta, kd_weight, hard_weight, chunk_size):
        op = "kdfast.integrations.hf"
        if divergence not in DIVERGENCES:
            raise ValueError(f"{op}: divergence={divergence!r} is not one of {', '.join(map(repr, DIVERGENCES))}")
        self.divergence = divergence
        self.T = checks.check_temperature(T, op)
        self.beta = checks.check_beta(beta, op)
        for arg, value in (("kd_weight", kd_weight), ("hard_weight", hard_weight)):
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{op}: {arg} must be a number >= 0, got {value!r}")
        if kd_weight == 0 and hard_weight == 0:
            raise ValueError(f"{op}: kd_weight and hard_weight are both 0: nothing to train; set kd_weight > 0")
        self.kd_weight, self.hard_weight, self.chunk_size = float(kd_weight), float(hard_weight), chunk_size


def _token_loss(settings: _Settings, student_hidden, student_weight, student_bias, teacher, labels,
                shift_labels=None, num_items_in_batch=None):
    """``kd_weight·KD + hard_weight·CE`` over the valid tokens: summed, then divided by
    ``num_items_in_batch`` when given, else by the valid tokens here.

    student_hidden [B, S, H] and the teacher's hidden states [B, S, H_t] (``teacher`` is
    ``(hidden, weight, bias)``); labels [B, S] shifted here (or ``shift_labels`` as they are)."""
    t_hidden, t_weight, t_bias = teacher
    if shift_labels is not None:
        target = shift_labels
    else:
        if labels is None:
            raise ValueError("kdfast.integrations.hf: the batch has no labels; causal LM distillation needs labels "
                             "(input_ids with -100 where a token is not predicted, as DataCollatorForLanguageModeling "
                             "gives with mlm=False)")
        student_hidden, t_hidden, target = student_hidden[..., :-1, :], t_hidden[..., :-1, :], labels[..., 1:]
    if target.shape != student_hidden.shape[:-1]:
        raise ValueError(f"kdfast.integrations.hf: labels of shape {tuple(target.shape)} (after the causal shift) do "
                         f"not match the hidden states' tokens {tuple(student_hidden.shape[:-1])}")
    # Only the tokens that count: padding and prompt tokens cost no [tokens × V] work.
    keep = target != IGNORE_INDEX
    student_hidden, t_hidden, target = student_hidden[keep], t_hidden[keep], target[keep]
    teacher_arg = (t_hidden, t_weight) if t_bias is None else (t_hidden, t_weight, t_bias)
    loss = KF.fused_linear_kd(student_hidden, student_weight, teacher_arg, target=target,
                              divergence=settings.divergence, beta=settings.beta, T=settings.T,
                              soft_weight=settings.kd_weight, hard_weight=settings.hard_weight,
                              ignore_index=IGNORE_INDEX, student_bias=student_bias, reduction="sum",
                              chunk_size=settings.chunk_size)
    if num_items_in_batch is None:
        return loss / max(int(keep.sum()), 1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def _teacher_hidden(teacher: torch.nn.Module, inputs: dict, checked: set):
    with torch.no_grad():
        teacher.eval()
        _, hidden, weight, bias = final_hidden_states(teacher, inputs, name="teacher_model",
                                                      check=id(teacher) not in checked)
    checked.add(id(teacher))
    return hidden, weight, bias


def _model_inputs(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}


class DistillationTrainer(Trainer):
    """A ``transformers.Trainer`` that distils ``teacher_model`` into ``model`` (causal LMs with
    the same vocabulary; their widths and depths may differ) with kdfast's fused linear loss:

        loss = kd_weight · T² · D(teacher ‖ student) + hard_weight · CE(student, labels)

    over the tokens whose shifted label is not -100, divided by ``num_items_in_batch`` (the
    valid tokens of the whole accumulated batch on every process, which the Trainer counts).

    divergence: 'forward_kl' (default), 'reverse_kl', 'jsd' (generalised JSD with ``beta``;
    0 is forward and 1 reverse KL, as in TRL) or 'tvd'. T: the temperature (the KL terms are
    multiplied by T², fasterai's convention). kd_weight: the weight of the distillation term
    (default 1). hard_weight: the weight of the student's cross-entropy with the labels
    (default 0: pure distillation; e.g. 0.5 to keep the data's own signal). chunk_size: tokens
    per chunk of the fused loss (default: its own rule).

    Every other argument is the Trainer's. ``eval_loss`` is the student's plain cross-entropy
    (see the module's docstring).
    """

    loss_is_scaled_for_ga = True  # compute_loss divides by the accumulated batch's tokens itself

    def __init__(self, model=None, args=None, *trainer_args, teacher_model=None, divergence: str = "forward_kl",
                 T: float = 1.0, beta: float = 0.5, kd_weight: float = 1.0, hard_weight: float = 0.0,
                 chunk_size: int | None = None, **kwargs):
        if teacher_model is None:
            raise ValueError("DistillationTrainer: teacher_model is required (a causal LM with the student's "
                             "vocabulary)")
        self.kd_settings = _Settings(divergence, T, beta, kd_weight, hard_weight, chunk_size)
        super().__init__(model, args, *trainer_args, **kwargs)
        self.teacher_model = prepare_teacher(teacher_model, self.args.device)
        _check_vocabularies(self.accelerator.unwrap_model(self.model), self.teacher_model)
        # The Trainer counts the labels of the whole accumulated batch (num_items_in_batch) only for models
        # that take loss kwargs, and over labels[..., 1:] only for models whose loss_type it knows shifts:
        # this loss always needs the count, and always shifts (GPT-2's loss_type is None).
        self._model_takes_loss_kwargs = self.model_accepts_loss_kwargs
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self._checked: set[int] = set()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation: the student's own cross-entropy (see the class docstring)
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch if self._model_takes_loss_kwargs
                                        else None)
        labels, shift_labels = inputs.get("labels"), inputs.get("shift_labels")
        model_inputs = _model_inputs(inputs)
        student = self.accelerator.unwrap_model(model)
        outputs, hidden, weight, bias = final_hidden_states(student, model_inputs, call=model, name="model",
                                                            check=id(student) not in self._checked)
        self._checked.add(id(student))
        teacher = _teacher_hidden(self.teacher_model, model_inputs, self._checked)
        loss = _token_loss(self.kd_settings, hidden, weight, bias, teacher, labels, shift_labels, num_items_in_batch)
        if num_items_in_batch is None:
            # A per-batch mean: the Trainer does not divide it by the accumulation steps (loss_is_scaled_for_ga).
            loss = loss / self.args.gradient_accumulation_steps
        elif self.args.average_tokens_across_devices:
            # num_items_in_batch counts every process's tokens and DDP averages the gradients over the
            # processes: as the Trainer does for its own losses, multiply back by their number.
            tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            loss = loss * (self.accelerator.num_processes // tp)
        return (loss, outputs) if return_outputs else loss


def _check_vocabularies(student, teacher):
    vs, vt = _lm_head(student, "model")[0].shape[0], _lm_head(teacher, "teacher_model")[0].shape[0]
    if vs != vt:
        raise ValueError(f"DistillationTrainer: the student's LM head has {vs} classes and the teacher's {vt}; "
                         f"token-level distillation needs one vocabulary (resize_token_embeddings to the same size "
                         f"when the tokenizers agree)")


class DistillationLoss:
    """A ``compute_loss_func`` for an ordinary ``transformers.Trainer`` (see
    :func:`distillation_loss_func`). Hooks on ``student`` record each forward's inputs (for the
    teacher) and the student's final hidden states; the call computes the fused loss from them."""

    def __init__(self, teacher_model, student_model, settings: _Settings):
        if not isinstance(student_model, torch.nn.Module):
            raise TypeError(f"distillation_loss_func: student_model must be the model given to the Trainer, got "
                            f"{type(student_model).__name__}")
        self.student, self.settings = student_model, settings
        self.teacher = prepare_teacher(teacher_model)
        _check_vocabularies(student_model, self.teacher)
        self._checked: set[int] = set()
        self._inputs: dict | None = None
        self._hidden: torch.Tensor | None = None
        student_model.register_forward_pre_hook(self._record_inputs, with_kwargs=True)
        _base_model(student_model, "student_model").register_forward_hook(self._record_hidden)

    def _record_inputs(self, module, args, kwargs):
        self._inputs = dict(kwargs, **({"input_ids": args[0]} if args else {}))

    def _record_hidden(self, module, args, output):
        self._hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def __call__(self, outputs, labels, num_items_in_batch=None):
        if self._inputs is None or self._hidden is None:
            raise RuntimeError("distillation_loss_func: no forward of the student was seen; pass the Trainer's "
                               "model as student_model")
        hidden, inputs = self._hidden, _model_inputs(self._inputs)
        self._inputs = self._hidden = None
        student = self.student
        weight, bias = _lm_head(student, "student_model")
        if id(student) not in self._checked:
            _check_linear_head(outputs, hidden, weight, bias, "student_model", student)
            self._checked.add(id(student))
        if not student.training:  # evaluation: the student's own cross-entropy, as the Trainer would compute it
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
            ce = F.cross_entropy(logits[..., :-1, :].flatten(0, -2).float(), labels[..., 1:].flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="sum")
            denominator = num_items_in_batch if num_items_in_batch is not None else \
                (labels[..., 1:] != IGNORE_INDEX).sum().clamp(min=1)
            return ce / denominator
        device = hidden.device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        inputs = {k: v for k, v in inputs.items() if k not in ("logits_to_keep", "num_items_in_batch")}
        teacher = _teacher_hidden(self.teacher, inputs, self._checked)
        return _token_loss(self.settings, hidden, weight, bias, teacher, labels, None, num_items_in_batch)


def distillation_loss_func(teacher_model, student_model, divergence: str = "forward_kl", T: float = 1.0,
                           beta: float = 0.5, kd_weight: float = 1.0, hard_weight: float = 0.0,
                           chunk_size: int | None = None) -> DistillationLoss:
    """A ``compute_loss_func`` for ``transformers.Trainer(..., compute_loss_func=...)``: the same
    loss as :class:`DistillationTrainer` for people who keep their own Trainer.

    ``student_model`` is the model given to the Trainer: hooks on it record the inputs of each
    forward (the teacher runs on them) and its final hidden states. The Trainer's contract is
    ``compute_loss_func(outputs, labels, num_items_in_batch)`` after its own forward, so the
    student's full logits are still computed by that forward (and left unused; the loss and its
    gradient never touch them): :class:`DistillationTrainer` avoids them. The Trainer counts
    ``num_items_in_batch`` over ``labels[..., 1:]`` only for models whose ``loss_type`` is
    'ForCausalLM' (Llama, Qwen, Mistral...; GPT-2's is None, for which the count also takes
    each row's first label, off by one token per row); the Trainer multiplies the loss by the
    number of processes itself.
    """
    return DistillationLoss(teacher_model, student_model,
                            _Settings(divergence, T, beta, kd_weight, hard_weight, chunk_size))

