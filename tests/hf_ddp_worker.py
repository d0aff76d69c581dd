"""One run of the DistillationTrainer for tests/test_hf.py: on one process, or on each of the
processes torchrun starts (CPU, gloo); tests/test_hf.py runs ``run`` in its own process for
the one-process record. Every global batch is the same 4 examples, so the steps
do not depend on how the sampler splits them; rank 0 writes the logged losses and a checksum
of the student's weights (equal on every rank) to $KDFAST_HF_TEST_OUT."""
import json
import os
import sys

import torch
import torch.distributed as dist
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_hf import examples, llama  # noqa: E402

from kdfast.integrations.hf import DistillationTrainer  # noqa: E402


class CountSteps(transformers.TrainerCallback):
    steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        CountSteps.steps += 1


def run(output_dir="out"):
    """Train; return rank 0's record (None on the other ranks)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    CountSteps.steps = 0
    teacher, student = llama(32, seed=1), llama(16)
    args = transformers.TrainingArguments(
        output_dir=output_dir, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
        per_device_train_batch_size=4 // world, max_steps=3, learning_rate=1e-2, lr_scheduler_type="constant",
        dataloader_num_workers=0, seed=0, ddp_backend="gloo" if world > 1 else None)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=examples(4),
                                  callbacks=[CountSteps()], divergence="jsd", hard_weight=0.5)
    trainer.train()
    checksum = sum(float(p.detach().double().abs().sum()) for p in student.parameters())
    trained = [int(os.environ.get("RANK", 0))] if CountSteps.steps == 3 else []
    checksums = [checksum]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, (trained, checksum))
        trained = sorted(r for t, _ in gathered for r in t)
        checksums = [c for _, c in gathered]
        assert max(checksums) - min(checksums) <= 1e-9 * abs(checksums[0]), checksums  # the ranks agree
    if int(os.environ.get("RANK", 0)) != 0:
        return None
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"world": world, "ranks_trained": trained, "losses": losses, "checksum": checksums[0]}


def main():
    torch.set_num_threads(1)
    record = run()
    if record is not None:
        with open(os.environ["KDFAST_HF_TEST_OUT"], "w") as f:
            json.dump(record, f)
    if dist.is_initialized():
        # The Trainer leaves the process group to the script: one left to the interpreter's
        # exit may end a rank with "terminate called without an active exception" (gloo's
        # threads still running), which torchrun reports as a failure.
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
