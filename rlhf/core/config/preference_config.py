"""The ``dpo`` section of the run config: offline preference optimisation of the policy on (chosen, rejected)
pairs (stage ``dpo``, ``distilrl dpo``). Part of the one config tree in rlhf/core/config/run_config.py."""
from __future__ import annotations

from pydantic import Field, model_validator

from rlhf.core.algorithms.preference_losses import PREFERENCE_LOSSES
from rlhf.core.config.training_config import _Section


class DPOConfig(_Section):
    """Preference optimisation on pairs: the labelling stage's teacher pairs (``labels/train`` in the run
    directory, with the teacher's margin) and/or your own (``train_file``, the layouts ``distilrl train-rm --data``
    reads), on the trainer section's DeepSpeed ranks (``trainer.num_ranks``, zero stage, threads; ``model.lora``:
    only adapters train and the reference is the model with them off, else a frozen copy). The policy goes to
    ``output_dir/dpo`` and the stages after it (eval, rl) start from it."""

    loss: str = "dpo"
    """dpo: -log sigmoid(beta * log-ratio margin) (Bradley-Terry on the implicit reward); ipo: (margin - 1 / (2
    beta))^2, which stops pushing once a pair is separated; simpo: length-normalised (per-token mean log-probs), no
    reference model, gamma the target margin. Formulas in rlhf/core/algorithms/preference_losses.py."""
    beta: float = Field(0.1, gt=0)
    """How far the policy may move from the reference: the scale of the implicit reward beta * (log pi - log ref).
    DPO and IPO use about 0.1; SimPO's per-token log-probs want a larger one (the paper's were about 2)."""
    gamma: float = Field(0.5, ge=0)
    """simpo only: the margin the chosen response's scaled mean log-prob should lead the rejected one's by."""
    margin_weight: float = Field(0.0, ge=0)
    """dpo only: each pair's required lead of the chosen implicit reward, margin_weight x the pair's margin (the
    teacher's quality difference / 9; your data's margin column): a clear preference pushes harder than a near
    tie. 0: plain DPO."""
    sft_weight: float = Field(1.0, ge=0)
    """RPO: the batch's loss plus sft_weight x the mean negative log-likelihood of its chosen responses' tokens
    (TRL's ``sft`` loss beside ``sigmoid``; ``rpo_alpha`` in older TRL). Without it, DPO on the teacher's offline
    pairs lowered the likelihood of the chosen answers with the rejected ones and the quickstart's student fell
    from 0.548 to 0.408 held-out accuracy; with 1 (and 0.3) it rose to 0.652 (benchmarks/RESULTS.md, algorithm
    arms). 0: plain DPO / IPO / SimPO."""
    teacher_pairs: bool = True
    """Train on the teacher's pairs from the labelling stage (labels/train) where the run directory has them."""
    train_file: str | None = None
    """Your own preference pairs: a .jsonl, .json, .parquet, .csv file or a save_to_disk directory in TRL's
    layouts (explicit or implicit prompt, text or messages; optional margin, score_chosen/score_rejected)."""
    eval_file: str | None = None
    """Held-out pairs for train_file (default: eval_fraction of its prompts)."""
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of train_file's prompts held out for the pair accuracy after training, when no eval_file is given."""
    epochs: int = Field(1, gt=0)
    """Passes over the training pairs."""
    batch_pairs: int = Field(8, gt=0)
    """Pairs per optimizer step (a multiple of trainer.num_ranks)."""
    micro_batch_pairs: int = Field(4, gt=0)
    """Pairs per forward on one rank (memory only: the update is the same)."""
    lr: float | None = Field(None, gt=0)
    """Learning rate of the preference updates; None: trainer.lr."""
    max_length: int = Field(512, gt=1)
    """Tokens of prompt + response per row; longer rows lose the start of the prompt."""

    @model_validator(mode="after")
    def _known_loss(self) -> "DPOConfig":
        if self.loss not in PREFERENCE_LOSSES:
            raise ValueError(PREFERENCE_LOSSES.unknown(self.loss))
        if self.margin_weight and self.loss != "dpo":
            raise ValueError(f"dpo.margin_weight applies to loss dpo only, not {self.loss}: set it to 0")
        return self
