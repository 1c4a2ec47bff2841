"""`LoraTrainer`: a small `transformers.Trainer` subclass for adapters.

What it adds to Trainer, and nothing else:
  * applies `lora=` / `freeze=` / `quant=` through `wrap` when given a plain model;
  * logs the report summary once and refuses to start with nothing trainable;
  * after the first step, checks that every trainable parameter got a gradient
    (and that no lora_B gradient is all zero);
  * saves adapter-only checkpoints with a manifest, staged and renamed into
    place, and verifies them (hashes, base) before resuming;
  * optimizer groups: LoRA+ ratio for B, a head learning rate, no weight
    decay on biases and norms.
Distribution is Trainer's (accelerate): it runs unchanged under torchrun, and sharded with FSDP2 or DeepSpeed
ZeRO-2/3 (`training_args(fsdp=True, ...)` / `deepspeed=...`), for which `sharding` gathers the adapter on save.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, IntervalStrategy

from ..adapter.format import TRAINED, convert_to_plain_lora, load_trained, save_extras, verify
from ..adapter.serving import note_unservable
from ..core.errors import LorakitError
from ..cost import sharding
from ..cost.fit import memory_check_callback
from ..cost.levers import chunked_loss, offloaded_activations, uncast_lora_inputs, use_chunked_loss
from ..cost.render import summary
from ..cost.report import report
from ..cost.tiled_mlp import tiled_mlp, use_tiled_mlp
from ..model.wrap import wrap
from ..plan.make import model_task
from ..plan.state import state_of
from .arguments import non_reentrant_checkpointing
from .checkpoints import STAGING, clear_leftovers, publish, verify_checkpoint
from .data import VisionChatCollator
from .optimizer import parameter_groups

logger = logging.getLogger("lorakit")


# Tasks whose transformers losses divide by num_items_in_batch (token-level averaging across devices).
_TOKEN_AVERAGED_TASKS = ("causal-lm", "seq2seq", "masked-lm", "image-text-to-text")  # not Whisper: a plain mean
_GRADIENT_HINT = (
    "gradients do not reach the adapters",
    "with gradient checkpointing (above all on a k-bit model) use gradient_checkpointing_kwargs="
    "{'use_reentrant': False} (lorakit's default) or call model.enable_input_require_grads(); "
    "otherwise check that the targeted modules feed the loss")


class LoraTrainer(Trainer):
    """`transformers.Trainer` for lorakit-wrapped models. Extra keyword arguments:

    lora, freeze, quant: specs applied with `lorakit.wrap` when `model` is not wrapped yet.
    loraplus_ratio: learning rate of lora_B = ratio x that of lora_A (LoRA+); None = same.
    head_learning_rate: learning rate of modules trained in full (heads); None = args.learning_rate.
    check_gradients: verify after the first step that every trainable parameter got a gradient.
    """

    def __init__(self, model: Any = None, args: TrainingArguments | None = None, *, lora: Any = None,
                 freeze: Any = None, quant: Any = None, loraplus_ratio: float | None = None,
                 head_learning_rate: float | None = None, check_gradients: bool = True, **kwargs: Any):
        if lora is not None or freeze is not None or quant is not None:
            model = wrap(model, lora=lora, freeze=freeze, quant=sharding.quant_for(quant, args, model))
        if model is not None:
            sharding.check_storage(model, args)
            if filled := sharding.auto_buckets(args, model):
                logger.info("DeepSpeed %s: 'auto' (sized from the model's hidden size), not DeepSpeed's "
                            "defaults, which allocate 2 GB per GPU in fp32 however few parameters train",
                            ", ".join(filled))
        if model is not None and not any(p.requires_grad for p in model.parameters()):
            raise LorakitError("nothing in this model is trainable",
                               hint="wrap it with lora=... or freeze=..., or pass those specs to LoraTrainer")
        if loraplus_ratio is not None and loraplus_ratio <= 0:
            raise LorakitError(f"loraplus_ratio must be > 0, got {loraplus_ratio}", hint="LoRA+ suggests 16")
        plan = state.plan if (state := state_of(model)) is not None else None
        unset = args is not None and getattr(args, "lorakit_default_rate", None) == args.learning_rate
        if unset and plan is not None and plan.default("learning_rate"):
            args.learning_rate = plan.default("learning_rate")
            source = next(where for knob, _, where in plan.defaults if knob == "learning_rate")
            logger.info("learning rate %g from %s (training_args was given none)", args.learning_rate, source)
        if getattr(args, "lorakit_eval_by_default", False) and kwargs.get("eval_dataset") is not None:
            args.eval_strategy = IntervalStrategy.EPOCH  # training_args left evaluation to the eval set
        non_reentrant_checkpointing(args)
        self.loraplus_ratio, self.head_learning_rate = loraplus_ratio, head_learning_rate
        self._gradients_to_check, self._before_step = check_gradients, None
        super().__init__(model=model, args=args, **kwargs)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        task = model_task(base)
        if self.label_smoother is not None or self.compute_loss_func is not None:
            own_reason = "a label smoother or compute_loss_func needs the logits"
        elif sharding.kind(args) in sharding.SHARDS_PARAMETERS:  # lm_head's weight is gathered only in its forward
            own_reason = sharding.SHARDED_HEAD
        else:
            own_reason = None
        self._chunked_loss, why_not = use_chunked_loss(model, task, getattr(args, "lorakit_chunked_loss", None),
                                                       own_reason)
        if why_not:
            logger.info("standard causal-LM loss: %s", why_not)
        self._offload = getattr(args, "lorakit_activation_offload", False)
        self._tiled = getattr(args, "lorakit_tiled_mlp", False)
        if self._tiled and sharding.kind(args):
            raise LorakitError(f"the tiled MLP is not checked under {sharding.kind(args)}: its backward sends the "
                               "parameters' gradients outside the sharded step", hint="train without tiled_mlp=True")
        if self._tiled:
            use_tiled_mlp(model, True)  # a model that cannot is refused here, with the reason
        if task not in _TOKEN_AVERAGED_TASKS:
            # Trainer multiplies the loss by the number of processes for any model whose forward takes
            # **kwargs, expecting it to divide by num_items_in_batch; classification heads compute a plain
            # mean instead (BERT), so under DDP their gradients came out world_size times too large.
            self.model_accepts_loss_kwargs = False
        self._log_report()
        self.add_callback(memory_check_callback())  # CUDA only: simulated vs measured peak after step 1

    def _set_signature_columns_if_needed(self) -> None:
        """Trainer keeps only the columns the model's forward takes; a vision-language row's `images` are
        for the collator (`VisionChatCollator`), which turns them into the inputs the forward does take."""
        super()._set_signature_columns_if_needed()
        if isinstance(self.data_collator, VisionChatCollator) and "images" not in self._signature_columns:
            self._signature_columns.append("images")

    def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """Trainer's loss, with the memory levers on for training steps (`lorakit.cost.levers`): the chunked causal-LM
        loss (the forward's `logits` are then lm_head's inputs, which Trainer drops) and activation offload.
        (Under mixed precision `training_step` leaves LoRA inputs in the autocast dtype.)"""
        with contextlib.ExitStack() as levers:
            if model.training and not return_outputs:
                if self._chunked_loss and "labels" in inputs:
                    levers.enter_context(chunked_loss(self.accelerator.unwrap_model(model)))
                if self._offload:
                    levers.enter_context(offloaded_activations())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    # ---- before and during training ------------------------------------

    def _log_report(self) -> None:
        if state_of(self.model) is None:
            return
        for line in summary(report(self.model)):
            logger.info(line)

    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        """Trainer.train, refusing to start a fresh run over an earlier run's checkpoints."""
        from transformers.trainer_utils import get_last_checkpoint

        run_dir = Path(self.args.output_dir)
        earlier = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
        if not resume_from_checkpoint and earlier is not None:
            raise LorakitError(f"{run_dir} already holds {Path(earlier).name} from an earlier run; a fresh run "
                               "would replace its checkpoints", hint="resume it with train(resume_from_checkpoint="
                               "True), or choose another output_dir")
        if resume_from_checkpoint:
            chosen = earlier if resume_from_checkpoint is True else resume_from_checkpoint
            if chosen is None:
                raise LorakitError(f"resume_from_checkpoint=True, but {run_dir} holds no checkpoint",
                                   hint="start a fresh run (no resume_from_checkpoint)")
            verify_checkpoint(Path(chosen))
            if self.is_deepspeed_enabled:  # DeepSpeed restores its own checkpoint: _load_from_checkpoint is not run
                verify(chosen, self.model)
            if self.args.should_save:  # a resume with no step left saves nothing, so clear up here too
                clear_leftovers(run_dir)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def training_step(self, model: Any, inputs: dict, num_items_in_batch: Any = None) -> Any:
        # through backward, where checkpointing recomputes the forward (lorakit.cost.levers)
        unwrapped = self.accelerator.unwrap_model(model)
        uncast = uncast_lora_inputs(unwrapped, self.args.bf16 or self.args.fp16)
        if self._gradients_to_check and self.is_deepspeed_enabled and self._before_step is None:
            self._before_step = sharding.trainable_digest(self.model)  # DeepSpeed steps inside backward
        try:
            with uncast, tiled_mlp(unwrapped) if self._tiled else contextlib.nullcontext():
                loss = super().training_step(model, inputs, num_items_in_batch)
        except RuntimeError as exc:
            if "does not require grad" not in str(exc):
                raise
            raise LorakitError("the loss does not depend on any trainable parameter: " + _GRADIENT_HINT[0],
                               hint=_GRADIENT_HINT[1]) from None
        if self._gradients_to_check and (self._before_step is None or sharding.stepped(self.model_wrapped)):
            self._gradients_to_check = False
            self.check_gradients()
        return loss

    def check_gradients(self) -> None:
        """Raise if a trainable parameter got no gradient, or a lora_B gradient is all zero."""
        missing, dead = [], []
        before, self._before_step = self._before_step, None
        if before is not None:  # DeepSpeed keeps gradients to itself and applies them within backward
            missing = sharding.unchanged(before, self.model)
        for name, param in self.model.named_parameters():
            if not param.requires_grad or before is not None:
                continue
            if param.grad is None:
                missing.append(name)
            elif "lora_B" in name and not param.grad.any():
                dead.append(name)
        if missing or dead:
            names = missing or dead
            raise LorakitError(
                f"after the first step {len(names)} trainable parameters "
                f"{'received no gradient' if missing else 'have an all-zero lora_B gradient'}, e.g. {names[0]}; "
                "training would leave them untouched", hint=_GRADIENT_HINT[1])

    def create_optimizer(self, model: Any = None) -> Any:
        if self.optimizer is not None:
            return self.optimizer
        target = model if model is not None else self.model
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, target)
        optimizer_kwargs.pop("lr", None)
        groups = parameter_groups(target, self.args.learning_rate, self.args.weight_decay, self.loraplus_ratio,
                                  self.head_learning_rate)
        self.optimizer = optimizer_cls(groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer

    # ---- checkpoints ----------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Trainer's save; a sharded model's trained tensors are gathered in full first (every rank takes part)
        and rank 0 writes the adapter from them. A final save (not a checkpoint's) logs one line when the adapter
        cannot be served unmerged as it is (serving.note_unservable)."""
        if sharding.kind(self.args) is None:
            super().save_model(output_dir, _internal_call)
        else:
            tensors = sharding.gather_trainable(self.model)
            if self.args.should_save:
                self._save(output_dir, state_dict=tensors)
        if self.args.should_save and not _internal_call:
            note_unservable(output_dir or self.args.output_dir)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.is_fsdp_enabled:  # Trainer would also save the whole model, base included
            sharding.save_fsdp_optimizer(self, output_dir)
        else:
            super()._save_optimizer_and_scheduler(output_dir)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if hasattr(model, "peft_config"):
            super()._save(output_dir, state_dict)  # peft's save_pretrained: the adapter only
            state = state_of(model)
            if state is not None and state.initial_adapter and not getattr(self, "_staging", False):
                # PiSSA/OLoRA: checkpoints keep peft's own form (a resume rebuilds the same rewritten base);
                # the final adapter becomes a plain LoRA of rank 2r on the untouched base, for merge and export
                convert_to_plain_lora(model, output_dir, state.initial_adapter, self.args.should_save)
        elif self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            config = getattr(model, "config", None)
            if config is not None:
                config.save_pretrained(output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
        if self.args.should_save:
            save_extras(model, output_dir, tensors=state_dict)

    def _get_output_dir(self, trial: Any) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING) if getattr(self, "_staging", False) else run_dir

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Trainer's checkpoint, written into a staging folder and renamed into place when complete:
        a process killed mid-save leaves the last complete checkpoint as it was."""
        run_dir = Path(super()._get_output_dir(trial))
        staging = run_dir / STAGING
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            clear_leftovers(run_dir)
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        distributed = self.args.parallel_mode.value == "distributed"
        if distributed:  # every rank has written its part (RNG state) before the folder is sealed and moved
            import torch.distributed as dist

            dist.barrier()
        if self.args.should_save:
            if self.state.best_model_checkpoint:
                self.state.best_model_checkpoint = self.state.best_model_checkpoint.replace(
                    str(staging), str(run_dir))
                self.state.save_to_json(str(staging / name / "trainer_state.json"))
            publish(run_dir, name, self.args.save_total_limit, self.state.best_model_checkpoint)
        if distributed:
            dist.barrier()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
        verify(resume_from_checkpoint, unwrapped)
        if self.is_fsdp_enabled:
            return sharding.load_adapter_files(unwrapped, resume_from_checkpoint, TRAINED)
        if hasattr(unwrapped, "peft_config"):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_trained(unwrapped, Path(resume_from_checkpoint))
