"""Distil a student from hpd-tools caches with ``transformers.Trainer``.

    python examples/hf_trainer.py --cache CACHE --student STUDENT_DIR --out RUN_DIR [--loss hpd] [--max-steps 20]

The cache's micro-batches are the ones ``hpd-tools distill`` trains on (same
caches, seed, --batch-tokens and data slots: processes x --grad-accum); the
loss is distill's chunked loss, normalised by the step's response tokens.
Under ``torchrun --nproc-per-node N`` each rank reads its own share. A run
saved with --save-every continues where it stopped with --resume, the
stream's position included (saved next to each of Trainer's checkpoints).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from hpd_tools import CacheCollator, CacheDataset, distill_loss


class DistillTrainer(Trainer):
    def __init__(self, *args: Any, loss: str, loss_options: dict[str, Any], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.loss_name, self.loss_options = loss, loss_options

    def get_train_dataloader(self) -> DataLoader:
        # Each item is a whole micro-batch of this rank's share already: no batching,
        # and no re-sharding by accelerate (it would read every rank's batches on each).
        return DataLoader(self.train_dataset, batch_size=None, collate_fn=self.data_collator)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # num_items_in_batch: the step's response tokens over accumulation (and ranks),
        # counted by Trainer from the collator's "labels"/"shift_labels", as distill normalises
        # (None for a model whose forward takes no loss kwargs: Trainer then averages the micro-batches).
        loss = distill_loss(model, inputs["inputs"], inputs["loss_mask"], inputs["targets"], self.loss_name,
                            loss_options=self.loss_options, num_tokens=num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over ranks; the count is already global
        return (loss, None) if return_outputs else loss


class SaveStreamPosition(TrainerCallback):
    """The dataset's position in each checkpoint-N/ folder, one file per rank."""

    def __init__(self, dataset: CacheDataset):
        self.dataset = dataset

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"hpd_stream-rank{self.dataset.rank}.json").write_text(json.dumps(self.dataset.state_dict()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", action="append", required=True, help="a cache folder or URL (repeat to mix caches)")
    parser.add_argument("--student", required=True, help="a Hugging Face model folder sharing the teacher's tokenizer")
    parser.add_argument("--out", required=True)
    parser.add_argument("--loss", default="hpd", help="sft, fkl, rkl, jsd, akl or hpd")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=0, help="steps between checkpoints; 0: none")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    args = parser.parse_args()

    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.max_steps,  # the dataset is endless
        gradient_accumulation_steps=args.grad_accum,  # the dataset's grad_accum: one micro-batch per data slot
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        logging_steps=1,
        save_strategy="steps" if args.save_every else "no",
        save_steps=args.save_every or 500,
        ignore_data_skip=True,  # the stream's position is restored from its own file, not by re-reading batches
        report_to="none",
        seed=args.seed,
    )
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    model = AutoModelForCausalLM.from_pretrained(args.student)
    dataset = CacheDataset(args.cache, batch_tokens=args.batch_tokens, seed=args.seed, grad_accum=args.grad_accum, tokenizer=tokenizer)
    checkpoint = get_last_checkpoint(args.out) if args.resume else None
    if checkpoint is not None:
        dataset.load_state_dict(json.loads((Path(checkpoint) / f"hpd_stream-rank{dataset.rank}.json").read_text()))
    trainer = DistillTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=CacheCollator(training_args.device),
                             callbacks=[SaveStreamPosition(dataset)], loss=args.loss, loss_options={})
    trainer.train(resume_from_checkpoint=checkpoint)
    dataset.close()
    if trainer.is_world_process_zero():
        trainer.save_model(Path(args.out) / "final")
        tokenizer.save_pretrained(Path(args.out) / "final")
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        (Path(args.out) / "losses.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    main()
