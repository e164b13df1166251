"""Training on transformers' Trainer: adapter-only checkpoints, resume, held-out answer accuracy."""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerState, TrainingArguments

from m2pt_cli import adapter as adapter_files
from m2pt_cli import checkpoints, devices, engines, hf_conventions, runs
from m2pt_cli import config as recipe_config
from m2pt_cli.answering import autocast_for, generate_answers, precision_of
from m2pt_cli.benches.base import normalize
from m2pt_cli.chat import instruction
from m2pt_cli.config import Recipe
from m2pt_cli.data.build import prepare
from m2pt_cli.data.collate import TrainCollator, open_image
from m2pt_cli.data.encode import Encoder
from m2pt_cli.data.grouping import GroupedSampler, lengths_and_images
from m2pt_cli.data.images import DEFAULT_MAX_PIXELS
from m2pt_cli.errors import Interrupted, UserError, first_line
from m2pt_cli.files import open_append, write_text_atomic
from m2pt_cli.loading import build
from m2pt_cli.registry import BACKBONES

log = logging.getLogger("m2pt")


def adapter_meta(recipe: Recipe, model) -> dict[str, Any]:
    """What ``m2pt_adapter.json`` records about the model an adapter belongs to."""
    cfg = model.m2pt_config
    return {
        "method": recipe.method,
        "backbone": cfg.backbone,
        "base_model": recipe.model.name_or_path,
        "revision": recipe.model.revision,
        "chat_template": recipe.model.chat_template,
        "m2pt_config": cfg.to_dict(),
        "parameters": model.parameter_groups(),
    }


def _rss_mb() -> float | None:
    """This process's resident memory now, in MB (None where /proc is not there)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


class FirstStep(TrainerCallback):
    """When this start's first step began (seconds after ``since``) and the memory held then."""

    def __init__(self, since: float) -> None:
        self.since = since
        self.seconds: float | None = None
        self.rss_mb: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.seconds is None:
            self.seconds = round(time.time() - self.since, 2)
            self.rss_mb = _rss_mb()
            log.info("first step after %.1f s (model loaded); resident memory %s MB", self.seconds, self.rss_mb)


class JsonlMetrics(TrainerCallback):
    """Every log entry (loss, learning rate, eval metrics) as one JSON line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open_append(self.path) as handle:
                handle.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


class AccuracyBeforeTraining(TrainerCallback):
    """Held-out answer accuracy at step 0, measured once the trainer has wrapped the model.

    (Calling ``Trainer.evaluate`` before ``train`` would leave the model unwrapped under DDP.)
    """

    def __init__(self, trainer: M2PTTrainer) -> None:
        self.trainer = trainer
        self.accuracy: float | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0 and self.trainer.answer_eval is not None:
            self.accuracy = self.trainer.answer_eval(model)
            self.trainer.log({"before_accuracy": self.accuracy})


class M2PTTrainer(hf_conventions.checkpoint_hooks_trainer()):
    """Trainer that saves and restores only the adapter, and scores held-out answers by generation.

    Its checkpoint methods are the hooks ``hf_conventions.checkpoint_hooks_trainer`` gives the
    Trainer's private ones (the Trainer has no public hook for them).
    """

    def __init__(self, *args, recipe: Recipe, answer_eval: AnswerEval | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.recipe = recipe
        self.answer_eval = answer_eval
        self.resume_command = f"m2pt train RECIPE --resume {self.args.output_dir}"

    def save_weights(self, output_dir: str, state_dict: dict | None) -> None:
        """The adapter alone, into ``output_dir`` (the Trainer's checkpoint folder: its files stay)."""
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model)
        if state_dict is None:
            state = model.adapter_state_dict()
        else:  # FSDP / DeepSpeed hand over the full (gathered) state dict
            state = {key: state_dict[name] for name, key in model.adapter_key_map().items() if name in state_dict}
        adapter_files.write_adapter(
            Path(output_dir), state, adapter_meta(self.recipe, model), overwrite=True, others="keep"
        )

    def train_sampler(self, dataset):
        """The Trainer's shuffled order, or with ``data.group_by`` set, records grouped by length (and
        modality): megabatches of one optimizer step, seeded by ``data_seed`` and the epoch."""
        mode = self.recipe.data.group_by
        if mode == "none":
            return super().train_sampler(dataset)
        lengths, images = lengths_and_images(dataset)
        per_step = self.args.world_size * self.args.gradient_accumulation_steps
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return GroupedSampler(lengths, images, self.args.per_device_train_batch_size, per_step, mode, seed)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors, whole: gathered from every process under FSDP or DeepSpeed (a
        collective: every process calls it), else read from the model."""
        model = self.accelerator.unwrap_model(self.model)
        if not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            return model.adapter_state_dict()
        full = self.accelerator.get_state_dict(self.model)
        return {key: full[name] for name, key in model.adapter_key_map().items() if name in full}

    def save_checkpoint(self, model, trial=None) -> None:
        """Save a whole checkpoint or none: stage it, sync it, rename it into place, then rotate."""
        run_dir = Path(self.args.output_dir)
        name = f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            checkpoints.clear_staging(run_dir)
        self.accelerator.wait_for_everyone()
        # while a checkpoint is being saved, the Trainer writes it into the staging folder
        self.checkpoint_parent = str(checkpoints.staging_folder(run_dir))
        try:
            self.write_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()  # every process has written its RNG state
            if self.args.should_save:
                checkpoints.publish(run_dir, name)
        except Exception as exc:  # noqa: BLE001 - a write error while saving: say what survived
            if self.args.should_save:
                checkpoints.clear_staging(run_dir)
            raise checkpoints.save_failed(run_dir, name, exc, self.resume_command) from None
        finally:
            self.checkpoint_parent = None
        if self.args.should_save:
            checkpoints.rotate(run_dir, self.args.save_total_limit)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss):
            last = checkpoints.latest_checkpoint(Path(self.args.output_dir))
            raise UserError(
                f"loss became {loss.item()} at step {self.state.global_step + 1}; last checkpoint: "
                f"{last or 'none'}; lower train.learning_rate or check the data"
            )
        return loss

    def load_weights(self, checkpoint: str, model) -> None:
        state, _ = adapter_files.read_adapter(Path(checkpoint))
        model.load_adapter_state_dict(state)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix) if self.eval_dataset else {}
        if self.answer_eval is not None:
            accuracy = self.answer_eval(self.accelerator.unwrap_model(self.model))
            metrics[f"{metric_key_prefix}_accuracy"] = accuracy
            self.log({f"{metric_key_prefix}_accuracy": accuracy})
        return metrics


@dataclass
class AnswerEval:
    """Greedy answers to held-out prompts (left-padded batches), compared after normalisation."""

    records: Any
    processor: Any
    backbone: Any
    encoder: Encoder
    max_new_tokens: int
    batch_size: int
    autocast: Any
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # the recipe's data.max_image_pixels

    def __call__(self, model) -> float:
        correct = 0
        for start in range(0, len(self.records), self.batch_size):
            rows = self.records[start : start + self.batch_size]
            prompts, answers = zip(
                *(self.encoder.prompt_text(c, i) for c, i in zip(rows["conversations"], rows["id"], strict=True)),
                strict=True,
            )
            refs = zip(rows["image"], rows["id"], strict=True)
            images = [open_image(ref, i, self.max_image_pixels) for ref, i in refs if ref]
            requests = [instruction(c) for c in rows["conversations"]]
            texts = generate_answers(
                model,
                self.processor,
                self.backbone,
                images,
                prompts,
                requests,
                self.max_new_tokens,
                self.autocast,
                self.encoder.end_of_turn,
            )
            correct += sum(normalize(t) == normalize(a) for t, a in zip(texts, answers, strict=True))
        return correct / max(len(self.records), 1)


def training_arguments(
    recipe: Recipe, run_dir: Path, world_size: int, has_eval: bool, use_cpu: bool
) -> TrainingArguments:
    t = recipe.train
    per_step = t.per_device_batch_size * world_size
    if t.global_batch_size % per_step:
        raise UserError(
            f"train.global_batch_size: {t.global_batch_size} is not a multiple of per_device_batch_size x processes "
            f"({t.per_device_batch_size} x {world_size})"
        )
    precision = precision_of(recipe)
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401

        report_to = ["tensorboard"]
    except ImportError:
        report_to = []
    return TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.global_batch_size // per_step,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        optim="adamw_torch",
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        torch_compile=t.torch_compile,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        seed=recipe.seed,
        data_seed=recipe.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval and t.eval_steps > 0 else "no",
        eval_steps=t.eval_steps if t.eval_steps > 0 else None,
        report_to=report_to,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=t.dataloader_num_workers,
        **engines.trainer_arguments(t.fsdp, t.fsdp_config, t.deepspeed, use_cpu),
        disable_tqdm=False,
        dataloader_pin_memory=not use_cpu,
        use_cpu=use_cpu,  # also what makes torchrun on CPU a gloo DDP run
    )


def train(
    recipe: Recipe, run_dir: Path, resume: bool = False, device: str | None = None, resume_command: str | None = None
) -> dict[str, Any]:
    """Train ``recipe`` into ``run_dir`` (resuming from its latest checkpoint when ``resume``).

    ``resume_command`` is the command printed after an interruption or a failed save.

    Returns:
        the run summary (also written to ``run_dir/summary.json``).
    """
    from transformers import set_seed

    started = time.time()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cpu = (device or "").startswith("cpu") or not torch.cuda.is_available()
    engines.trainer_arguments(  # a bad engine setting is refused before the model loads
        recipe.train.fsdp, recipe.train.fsdp_config, recipe.train.deepspeed, use_cpu
    )
    set_seed(recipe.seed)
    backbone = BACKBONES.get(recipe.model.backbone)
    devices.require_compiler(recipe.train.torch_compile, device or "cpu")
    model, processor = build(recipe, device=device or "cpu")
    precision = precision_of(recipe)
    if precision != "fp32":  # fp32 master copies of what is trained; autocast runs the rest
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    if recipe.train.gradient_checkpointing:
        model.activation_checkpointing_enable()
    loaded = time.time()
    has_eval = recipe.data.eval_size > 0
    args = training_arguments(recipe, run_dir, world_size, has_eval, use_cpu)  # joins the launch's process group
    # one process per machine encodes (every core); the others then read its cache
    with args.main_process_first(local=True, desc="m2pt data"):
        train_set, held_out, report = prepare(recipe.data, processor, backbone, recipe.model.chat_template, recipe.seed)
    if (held_out is not None) != has_eval:  # a source too small to hold any out
        args = training_arguments(recipe, run_dir, world_size, held_out is not None, use_cpu)
    first_step = FirstStep(loaded)
    autocast = autocast_for(precision, args.device.type)

    answer_eval = None
    if held_out is not None and recipe.train.eval_samples != 0:
        n = len(held_out) if recipe.train.eval_samples < 0 else min(recipe.train.eval_samples, len(held_out))
        encoder = Encoder(processor, backbone, recipe.model.chat_template, recipe.data.max_length)
        answer_eval = AnswerEval(
            held_out.select(range(n)),
            processor,
            backbone,
            encoder,
            recipe.train.eval_max_new_tokens,
            max(recipe.train.per_device_batch_size, 8),
            autocast,
            recipe.data.max_image_pixels,
        )
    trainer = M2PTTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=held_out,
        data_collator=TrainCollator(processor, backbone, recipe.data.on_bad_record, recipe.data.max_image_pixels),
        callbacks=[JsonlMetrics(run_dir / "metrics.jsonl"), first_step],
        recipe=recipe,
        answer_eval=answer_eval,
    )
    if args.world_size > 1:  # the engine the launch got (MULTI_CPU/MULTI_GPU: DDP; FSDP; DEEPSPEED)
        log.info("training on %d processes: %s", args.world_size, trainer.accelerator.distributed_type.value)
    before = AccuracyBeforeTraining(trainer)
    trainer.add_callback(before)
    checkpoint = checkpoints.latest_checkpoint(run_dir, say_skipped=True) if resume else None
    if resume and checkpoint is None:
        raise UserError(f"{run_dir}: no checkpoint to resume from yet; start the run again without --resume")
    trainer.resume_command = resume_command or f"m2pt train RECIPE --resume {run_dir}"
    at_end = checkpoint is not None and runs.last_step(checkpoint, recipe) is not None
    if at_end:  # the Trainer would train one step past the last; only the adapter and summary are left
        log.info("%s is the run's last step: nothing to train", checkpoint.name)
        trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
        trainer.load_weights(str(checkpoint), trainer.model)
    with _interrupts_checkpoint(trainer, run_dir):
        try:
            result = None if at_end else trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except pickle.UnpicklingError as exc:  # torch.load(weights_only=True) met pickled objects
            raise UserError(
                f"{checkpoint}: a state file holds pickled objects, not plain tensors ({first_line(exc)[:80]}...); "
                "m2pt does not unpickle them: delete this checkpoint folder to resume from an earlier one"
            ) from None
    after = trainer.evaluate(metric_key_prefix="after") if held_out is not None else {}
    state = trainer.adapter_state()  # every process: FSDP and ZeRO-3 gather the shards
    if trainer.args.should_save:
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        adapter_files.write_adapter(
            run_dir / "adapter",
            state,
            adapter_meta(recipe, unwrapped),
            extra_files={adapter_files.RECIPE: recipe_config.dump(recipe)},
            overwrite=True,
            others="keep",
        )
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    summary = {
        "recipe": recipe.name,
        "method": recipe.method,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "seconds": round(time.time() - started, 1),
        "train_loss": result.training_loss if result is not None else None,
        "final_loss": losses[-1] if losses else None,
        # measured at step 0; a resumed run finds it in the log history its checkpoint restored
        "held_out_accuracy_before": next(
            (e["before_accuracy"] for e in trainer.state.log_history if "before_accuracy" in e), before.accuracy
        ),
        "held_out_accuracy_after": after.get("after_accuracy"),
        "held_out_loss": after.get("after_loss"),
        "trainable_parameters": sum(model.parameter_groups().values()),
        "data": {
            "records": report.records,
            "train": report.train,
            "held_out": report.held_out,
            "skipped": report.skipped,
            "truncated": report.truncated,
        },
        "adapter": str(run_dir / "adapter"),
        "timings": {
            "model_load_s": round(loaded - started, 2),
            "data_s": round(report.seconds, 2),
            "to_first_step_s": first_step.seconds,  # from the loaded model to the first step's start
            "rss_at_first_step_mb": first_step.rss_mb,
        },
    }
    if trainer.args.should_save:
        write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


@contextmanager
def _interrupts_checkpoint(trainer: M2PTTrainer, run_dir: Path):
    """On Ctrl-C or SIGTERM: save a checkpoint of the current step, then say how to resume."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except KeyboardInterrupt:
        step = trainer.state.global_step
        saved = checkpoints.latest_checkpoint(run_dir)
        if step > 0 and (saved is None or not saved.name.endswith(f"-{step}")):
            trainer.save_checkpoint(trainer.model)
            saved = checkpoints.latest_checkpoint(run_dir)
        where = f"checkpoint {saved}" if saved else "no checkpoint yet (nothing to resume)"
        raise Interrupted(
            f"interrupted at step {step}; {where}; resume with: {trainer.resume_command}"
            if saved
            else f"interrupted at step {step}; {where}"
        ) from None
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def format_summary(summary: dict[str, Any]) -> str:
    """The closing lines ``m2pt train`` prints."""

    def pct(x):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f} %"

    lines = [
        f"done: {summary['steps']} steps in {summary['seconds']:.0f} s; final loss {summary['final_loss']:.4f}"
        if summary["final_loss"] is not None
        else f"done: {summary['steps']} steps in {summary['seconds']:.0f} s",
    ]
    if summary["held_out_accuracy_after"] is not None:
        lines.append(
            f"held-out answer accuracy: {pct(summary['held_out_accuracy_before'])} before, "
            f"{pct(summary['held_out_accuracy_after'])} after"
        )
    lines.append(f"adapter: {summary['adapter']}")
    return "\n".join(lines)
