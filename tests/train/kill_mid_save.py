"""Helper for test_trainer: train, and SIGKILL this process while checkpoint-4 is being written."""

import os
import signal
import sys

sys.path[:0] = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__))]  # and tests/

import lorakit.adapter.format  # noqa: E402
import lorakit.train.trainer  # noqa: E402
from conftest import build  # noqa: E402
from test_trainer import args, token_data  # noqa: E402

real_save_extras = lorakit.train.trainer.save_extras


def dying_save_extras(model, folder, **kwargs):
    if str(folder).endswith("checkpoint-4"):
        # the adapter files of checkpoint-4 are half written: die now
        os.kill(os.getpid(), signal.SIGKILL)
    real_save_extras(model, folder, **kwargs)


lorakit.train.trainer.save_extras = dying_save_extras
out = sys.argv[1]
trainer = lorakit.LoraTrainer(model=build("bert"), args=args(out, max_steps=6, save_strategy="steps", save_steps=2),
                              train_dataset=token_data(), lora=lorakit.Lora(r=4))
trainer.train()
