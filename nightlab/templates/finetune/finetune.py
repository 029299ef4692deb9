"""The editable half of the finetune workspace: how to post-train, not what to score.

harness.py reads the UPPER_CASE settings below, turns every training example into a datum with
`build_datum`, asks `learning_rate` for each step's rate, and trains a LoRA adapter through the training
service until STEPS or the time budget runs out. It then scores the adapter on problems this file never sees.
"""

import tinker

LEARNING_RATE = 2e-4
LORA_RANK = 8
BATCH_SIZE = 8
STEPS = 1000  # an upper bound: the time budget usually ends training first
WARMUP_STEPS = 5
BETA1 = 0.9
BETA2 = 0.95
WEIGHT_DECAY = 0.0
GRAD_CLIP_NORM = 1.0
TRAIN_ON = "answer"  # "answer": loss on the assistant turn only; "all": on the prompt too
LOSS = "cross_entropy"  # any loss the service knows, given the inputs build_datum supplies
LOSS_CONFIG = None
SEED = 0


def learning_rate(step: int) -> float:
    """Linear warm-up to LEARNING_RATE, then constant."""
    return LEARNING_RATE * min(1.0, (step + 1) / max(WARMUP_STEPS, 1))


def build_datum(prompt: list[int], answer: list[int]) -> tinker.Datum:
    """One training example: position i of the input predicts target i; `weights` say which targets count."""
    tokens = prompt + answer
    first = 0 if TRAIN_ON == "all" else len(prompt) - 1
    weights = [0.0 if i < first else 1.0 for i in range(len(tokens) - 1)]
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )
