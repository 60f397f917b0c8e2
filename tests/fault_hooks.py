"""TrainerCallbacks that put faults into a real run at a known step, through the `callbacks=` config key (no
test code on tuneforge's own paths). Used by tests/test_runs_e2e.py with PYTHONPATH at the repository root."""

from __future__ import annotations

import os
import signal

from transformers import TrainerCallback


class NanFromStep3(TrainerCallback):
    """The training loss is NaN from optimizer step 3 on: the real path (NaN loss -> NaN gradients). A
    diverging learning rate is no reliable trigger on a CPU in fp32: lr=1e30 saturates to a uniform
    distribution (loss 10.8, gradient 0), never NaN."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def hook(module, inputs, kwargs_, output):
            if module.training and state.global_step + 1 >= 3:
                for key in ("loss", "log_probs", "logits"):  # TRL computes its loss from log_probs
                    if getattr(output, key, None) is not None:
                        setattr(output, key, getattr(output, key) * float("nan"))
            return output

        model.register_forward_hook(hook, with_kwargs=True)


class KillAfterCheckpoint2(TrainerCallback):
    """SIGKILL (no handler can run) right after checkpoint-2 is complete on disk."""

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 2:
            os.kill(os.getpid(), signal.SIGKILL)


class TermAtStep3(TrainerCallback):
    """SIGTERM at the end of step 3, as a scheduler's preemption would send it."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)


class SigtermWhileScoring(TrainerCallback):
    """SIGTERM to this process at the first forward pass in eval mode after training: while the trained model is
    scored, outside `trainer.train()`."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        sent = []

        def hook(module, inputs, output):
            # Once trainer.train() has returned (its own signal guard is gone): the scoring after it.
            in_train = type(getattr(signal.getsignal(signal.SIGTERM), "__self__", None)).__name__ == "StopOnSignal"
            if not module.training and not sent and not in_train:
                sent.append(True)
                os.kill(os.getpid(), signal.SIGTERM)
            return output

        model.get_input_embeddings().register_forward_hook(hook)  # every forward, generate()'s included
