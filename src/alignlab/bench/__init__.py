"""Side-by-side benchmarks against TRL: ``alignlab bench STAGE``.

``alignlab bench sft --model smollm2-135m-instruct --data ../shared/data/alpaca_en_demo.json`` trains the
same model on the same data with the same batch size, maximum length and dtype, first with our trainer and
then with TRL's, each in its own process (``python -m alignlab.bench _worker SPEC OUT``), so one library's
imports and allocations never count against the other and the peak resident memory of each is its own.

Stages (``PAIRS``):

- ``sft``: ``train_sft`` vs ``trl.SFTTrainer`` (instruction data, completion-only loss);
- ``rm``: ``train_reward`` vs ``trl.RewardTrainer`` on the same preference pairs (rankings are expanded to
  their pairs for both, since RewardTrainer takes pairs only);
- ``rm-kwise``: ours against ours: the K-wise ranking loss (one example = a prompt with its K answers, each
  answer encoded once) vs the same rankings expanded to their K(K-1)/2 pairs (each answer encoded K-1 times),
  on ranking data (OpenAssistant trees). Reports the encoded-token factor the K-wise path saves and the speed
  factor it gets (``comparison``);
- ``dpo``: ``train_dpo`` (sigmoid loss, frozen reference copy) vs ``trl.DPOTrainer``;
- ``ppo``: ``train_ppo`` (policy + critic + reference, a programmatic reward) vs ``trl.RLOOTrainer`` (TRL's
  online-RL trainer nearest to PPO; TRL ships no PPO trainer any more) with the same reward function, prompts,
  responses per iteration and generation length. A timed unit is one *iteration* (rollout, scoring,
  no-grad forwards, update), and the tokens are the *generated* ones, so ``ms per generated token`` is the
  number to compare;
- ``gen``: ours against ours: sampling with the shared prefill vs plain ``generate``.

The modules: ``registry`` (the stages, :class:`Pair`, :class:`BenchSpec`, and how to add a stage),
``measure`` (what is measured and how: clocks, parameter counts, matmul peak, summaries, ratios), ``worker``
(the worker process, its launcher and ``--time-limit``), ``report`` (the table), ``cli`` (the command and
:func:`run_benchmark`), ``runners`` (what all runners share, and the ``matched``/``defaults`` settings), and
one module per stage with both its runners: ``sft``, ``reward_model`` (``rm``, ``rm-kwise``), ``dpo``, ``ppo``,
``gen``.

Importing this package loads the standard library only: torch, transformers, TRL and our trainers are imported
inside the runners, in the worker process (TRL is a development dependency).
"""

from alignlab.bench.cli import add_bench_arguments, cmd_bench, run_benchmark
from alignlab.bench.registry import PAIRS, BenchSpec, Pair

__all__ = ["PAIRS", "BenchSpec", "Pair", "add_bench_arguments", "cmd_bench", "run_benchmark"]
