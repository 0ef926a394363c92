"""Does the dictionary still fit? Downstream figures beside explained variance and L0.

Explained variance can look fine while the reconstruction breaks the model
downstream, so `sae_diff` also splices the SAE's reconstruction into the
forward pass at its hook, as SAELens's ``evals.get_recons_loss`` does, and
reports for the base and the checkpoint:

* ``ce_clean``, ``ce_spliced``, ``ce_ablated``: mean next-token cross-entropy
  with the model untouched, with the reconstruction spliced in at the hook
  (BOS and padding keep their own activations), and with the hook zero-ablated;
* ``ce_loss_recovered`` = (ce_ablated − ce_spliced) / (ce_ablated − ce_clean),
  SAELens's ``ce_loss_score``; 1 means the reconstruction costs nothing;
* ``kl_spliced`` / ``kl_ablated``: mean KL(clean ‖ spliced) and KL(clean ‖
  ablated) of the next-token distributions, and ``kl_div_score`` = 1 −
  kl_spliced / kl_ablated.

Cross-entropy counts the predictions of every real token after the first real
one (the prediction from BOS is left out, as SAELens leaves out ignored tokens);
KL counts every real, non-BOS position.

**Verdict** (the card's first chip), for each side:

* ``fail`` when ``ce_loss_recovered < 0.7`` or explained variance ``< 0``: the
  dictionary does not describe this model. Kissane et al. 2024 ("SAEs (usually)
  transfer between base and chat models") found a failed transfer on Gemma v1 2B
  at 0.25 CE recovered and explained variance −15;
* ``warn`` when ``ce_loss_recovered < 0.9`` or explained variance ``< 0.5``, or
  the checkpoint recovers 0.05 less than the base or explains 0.1 less variance;
* ``pass`` otherwise. Transfers that worked in the same paper recovered 0.976
  (Qwen-0.5B) and 0.989 (Mistral-7B).

The overall verdict is the worse side's. The downstream figures need full
forward passes (three per model), so ``fit="fast"`` (the default) computes them
on the first `FAST_PROMPTS` prompts, ``"full"`` on all, and ``"off"`` skips
them (explained variance and L0 are always computed, on every token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ._switch import centred

FIT_MODES = ("fast", "full", "off")
FAST_PROMPTS = 8
FAIL_CE_RECOVERED = 0.7
PASS_CE_RECOVERED = 0.9
FAIL_EXPLAINED_VARIANCE = 0.0
WARN_EXPLAINED_VARIANCE = 0.5
WARN_CE_RECOVERED_DROP = 0.05
WARN_EXPLAINED_VARIANCE_DROP = 0.1
VERDICTS = ("pass", "warn", "fail")


@dataclass
class DownstreamStats:
    """Streaming sums for the downstream figures of one model (float64)."""

    sums: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("ce_clean", "ce_spliced", "ce_ablated", "kl_spliced", "kl_ablated"), 0.0
        )
    )
    n_predictions: int = 0
    n_positions: int = 0

    @torch.no_grad()
    def update(self, bridge: Any, sae: Any, hook: str, tokens: Any, mask: Any) -> None:
        """Add one batch: ``mask`` marks the real, non-BOS tokens (as in the diff)."""
        device = next(bridge.original_model.parameters()).device
        real = mask.any(0).nonzero()
        if len(real):  # columns past every row's last real token are padding: cut
            width = int(real[-1]) + 1
            tokens, mask = tokens[:, :width], mask[:, :width]
        tokens, mask = tokens.to(device), mask.to(device)

        batch = len(tokens)

        def splice_and_ablate(activations: torch.Tensor, hook: Any) -> torch.Tensor:
            # One forward over three copies of the batch: clean, spliced, ablated.
            clean_part, spliced_part = activations[:batch], activations[batch : 2 * batch]
            read = centred(bridge, spliced_part)  # as the SAE's weight processing gives it
            rebuilt = sae.decode(sae.encode(read.to(sae.W_dec.dtype)))
            spliced_part = torch.where(mask[..., None], rebuilt.to(activations.dtype), spliced_part)
            ablated_part = torch.zeros_like(activations[2 * batch :])
            return torch.cat([clean_part, spliced_part, ablated_part])

        logits = bridge.run_with_hooks(tokens.repeat(3, 1), fwd_hooks=[(hook, splice_and_ablate)])
        # The prediction at i is of token i + 1: count it when i is a real non-BOS
        # token and i + 1 is real.
        predicts = mask[:, :-1] & mask[:, 1:]
        targets = tokens[:, 1:]
        # float32 per position, float64 sums: one vocabulary-sized float32 array per
        # part at a time beside the reference (float64 arrays doubled the peak)
        reference = logits[:batch].float().log_softmax(-1)
        probabilities = reference.exp()
        for index, name in enumerate(("clean", "spliced", "ablated")):
            part = logits[index * batch : (index + 1) * batch]
            log_probs = reference if name == "clean" else part.float().log_softmax(-1)
            ce = -log_probs[:, :-1].gather(-1, targets[..., None])[..., 0]
            self.sums[f"ce_{name}"] += float(ce[predicts].double().sum())
            if name != "clean":
                kl = torch.linalg.vecdot(probabilities, reference - log_probs)
                self.sums[f"kl_{name}"] += float(kl[mask].double().sum())
            del log_probs
        self.n_predictions += int(predicts.sum())
        self.n_positions += int(mask.sum())

    def merge(self, other: DownstreamStats) -> DownstreamStats:
        """Add ``other`` (the same model on other prompts) into this one; returns self."""
        for key, value in other.sums.items():
            self.sums[key] += value
        self.n_predictions += other.n_predictions
        self.n_positions += other.n_positions
        return self

    def figures(self) -> dict[str, float | None]:
        """Means and scores; ``None`` where there was nothing to measure."""
        if not self.n_predictions:
            return dict.fromkeys(
                (
                    "ce_clean",
                    "ce_spliced",
                    "ce_ablated",
                    "ce_loss_recovered",
                    "kl_spliced",
                    "kl_ablated",
                    "kl_div_score",
                )
            )
        ce = {k: v / self.n_predictions for k, v in self.sums.items() if k.startswith("ce_")}
        kl = {k: v / self.n_positions for k, v in self.sums.items() if k.startswith("kl_")}
        ce_gap = ce["ce_ablated"] - ce["ce_clean"]
        return {
            **ce,
            "ce_loss_recovered": (ce["ce_ablated"] - ce["ce_spliced"]) / ce_gap if ce_gap else None,
            **kl,
            "kl_div_score": 1 - kl["kl_spliced"] / kl["kl_ablated"] if kl["kl_ablated"] else None,
        }


def side_verdict(side: dict[str, Any]) -> tuple[str, list[str]]:
    """``pass``/``warn``/``fail`` for one model's fit, with the reasons."""
    reasons: list[str] = []
    verdict = "pass"
    ev, recovered = side["explained_variance"], side.get("ce_loss_recovered")
    if ev < FAIL_EXPLAINED_VARIANCE:
        verdict = "fail"
        reasons.append(f"explained variance {ev:.3f} < {FAIL_EXPLAINED_VARIANCE}")
    elif ev < WARN_EXPLAINED_VARIANCE:
        verdict = "warn"
        reasons.append(f"explained variance {ev:.3f} < {WARN_EXPLAINED_VARIANCE}")
    if recovered is not None and recovered < FAIL_CE_RECOVERED:
        verdict = "fail"
        reasons.append(f"CE loss recovered {recovered:.3f} < {FAIL_CE_RECOVERED}")
    elif recovered is not None and recovered < PASS_CE_RECOVERED:
        verdict = _worse(verdict, "warn")
        reasons.append(f"CE loss recovered {recovered:.3f} < {PASS_CE_RECOVERED}")
    return verdict, reasons


def _worse(a: str, b: str) -> str:
    return a if VERDICTS.index(a) >= VERDICTS.index(b) else b


def fit_verdict(base: dict[str, Any], checkpoint: dict[str, Any]) -> tuple[str, list[str]]:
    """The worse side's verdict, also warning when the checkpoint fits clearly worse."""
    (base_verdict, base_reasons), (ckpt_verdict, ckpt_reasons) = map(
        side_verdict, (base, checkpoint)
    )
    verdict = _worse(base_verdict, ckpt_verdict)
    if base_reasons == ckpt_reasons:
        reasons = [f"base and checkpoint: {reason}" for reason in base_reasons]
    else:
        reasons = [f"base: {r}" for r in base_reasons] + [f"checkpoint: {r}" for r in ckpt_reasons]
    ev_drop = base["explained_variance"] - checkpoint["explained_variance"]
    if ev_drop > WARN_EXPLAINED_VARIANCE_DROP:
        verdict = _worse(verdict, "warn")
        reasons.append(f"the checkpoint explains {ev_drop:.0%} less variance than the base")
    base_rec, ckpt_rec = base.get("ce_loss_recovered"), checkpoint.get("ce_loss_recovered")
    if (
        base_rec is not None
        and ckpt_rec is not None
        and base_rec - ckpt_rec > WARN_CE_RECOVERED_DROP
    ):
        verdict = _worse(verdict, "warn")
        reasons.append(
            f"the checkpoint recovers {base_rec - ckpt_rec:.3f} less CE loss than the base"
        )
    return verdict, reasons
