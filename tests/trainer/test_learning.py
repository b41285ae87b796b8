"""Learning, on the pretrained built-in `toyworld` model: tests that fail when learning breaks.

Textual inversion of the drawn yellow robot (examples/concepts/robot, not part of the toy
world), two vectors started from "yellow toy". What is held to a bar is the evaluation-set
loss (the concept's images under fixed noise and timesteps): on toyworld it falls by 6-7 % in
150 steps, where the random-weight `tiny` model moved by 0.05 %, and a trainer that does not
learn leaves it where it was. Two ranks with half the batch each, and bf16 instead of fp32,
must end where one fp32 rank does. The concept similarity is computed and reported, but not
yet held to a bar: on this model it does not yet rank the learned token above the initializer
phrase (docs/learning.md).

Measured on an AMD EPYC (Zen 5, AVX512-BF16, no AMX), 2 cores, 1 thread per rank (evaluation
loss at steps 0 / 150, relative fall):
- 1 rank, batch 4, fp32, seed 7: 0.19883 -> 0.18576 (6.57 %); seed 8: -> 0.18514 (6.88 %)
- 2 ranks x batch 2, fp32, seed 7: 0.19883 -> 0.18539 (6.76 %)
- 1 rank, batch 4, bf16 (native), seed 7: 0.19846 -> 0.18537 (6.60 %)
The variants' final losses lie within 0.3 % of each other; not learning would leave 6.6 %.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainer_helpers import events, run_trainer, trainer_env

pytestmark = pytest.mark.trainer
ROOT = Path(__file__).resolve().parents[2]
ROBOT = ROOT / "examples" / "concepts" / "robot"
STEPS = 150
LEARNING_RATE = 1e-4
EVAL_DROP = 0.04  # at least 4 % (measured 6.6-6.9 %)
EVAL_TOLERANCE = 0.01  # final losses of equivalent variants within 1 % (measured <= 0.3 %)


def learn(out: Path, *, ranks: int = 1, batch: int = 4, precision: str = "no",
          seed: int = 7) -> dict:
    args = [
        "--model", "toyworld", "--train-data-dir", str(ROBOT), "--output-dir", str(out),
        "--placeholder-token", "<robot-toy>", "--initializer-token", "yellow toy",
        "--num-vectors", "2",
        "--resolution", "64", "--lr-warmup-steps", "0", "--learning-rate", str(LEARNING_RATE),
        "--max-train-steps", str(STEPS), "--train-batch-size", str(batch),
        "--mixed-precision", precision, "--seed", str(seed), "--eval-samples", "16",
        "--checkpointing-steps", str(STEPS // 3), "--concept-similarity-images", "8",
        "--validation-inference-steps", "20", "--distributed-backend", "gloo",
    ]
    result = run_trainer(args, ranks=ranks, timeout=900, env=trainer_env())
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    completed = [e for e in events(result.stdout) if e["event"] == "completed"]
    assert completed and completed[0]["concept_similarity"]["learned"] == pytest.approx(
        metrics["concept_similarity"]["learned"])
    return metrics


def eval_losses(metrics: dict) -> tuple[float, float]:
    points = metrics["eval_loss"]
    return points[0]["loss"], points[-1]["loss"]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> dict:
    return learn(tmp_path_factory.mktemp("learning") / "one-rank")


def test_the_evaluation_loss_falls_and_the_concept_similarity_is_reported(one_rank):
    first, last = eval_losses(one_rank)
    assert last <= first * (1 - EVAL_DROP), one_rank["eval_loss"]
    assert [p["step"] for p in one_rank["eval_loss"]] == [0, 50, 100, 150]
    scores = one_rank["concept_similarity"]
    assert scores["rows_of_concept_samples_png"] == ["before", "initializer", "learned"]
    assert all(0 <= scores[row] <= 1 for row in scores["rows_of_concept_samples_png"])


def test_two_ranks_learn_as_one_rank_with_the_doubled_batch(one_rank, tmp_path):
    two = learn(tmp_path / "two-ranks", ranks=2, batch=2)
    assert two["world_size"] == 2
    assert eval_losses(two)[1] == pytest.approx(eval_losses(one_rank)[1], rel=EVAL_TOLERANCE)
    assert eval_losses(two)[1] <= eval_losses(two)[0] * (1 - EVAL_DROP)


def test_bf16_learns_as_fp32(one_rank, tmp_path):
    bf16 = learn(tmp_path / "bf16", precision="bf16")
    assert bf16["mixed_precision"]["used"] == "bf16"
    assert eval_losses(bf16)[1] == pytest.approx(eval_losses(one_rank)[1], rel=EVAL_TOLERANCE)
    assert eval_losses(bf16)[1] <= eval_losses(bf16)[0] * (1 - EVAL_DROP)
