"""One optimisation step of the shapes-demo training run, and the state it advances."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .data import collate_labels, make_train_example, question_targets
from .heads import LLM_I_SPEC, LLM_Q_SPEC, aux_metrics
from .model import image_tokens, packed_forward
from .packing import pack
from .recipe import aux_weight, lr_at


@dataclass
class Run:
    """Everything a training run carries from step to step (and into its checkpoint).

    ``p2`` is the step at which phase 2 (the full model) started; ``None`` while in phase 1.
    ``ema`` holds smoothed phase-1 auxiliary accuracies (and ``global_on``, the step at which
    the rank / global targets were switched on).
    """

    cfg: dict
    seed: int
    steps: int  # phase-2 step budget
    model: torch.nn.Module
    aux: torch.nn.Module
    llm_aux: torch.nn.Module
    opt: torch.optim.Optimizer
    opt_llm_aux: torch.optim.Optimizer
    step: int = 0
    wall: float = 0.0
    p2: int | None = None
    ema: dict = field(default_factory=dict)
    last_eval: dict | None = None
    eval_step: int | None = None

    @property
    def phase1(self) -> bool:
        return self.p2 is None

    def trained_out(self) -> bool:
        """Phase 2 has run its whole step budget."""
        return self.p2 is not None and self.step >= self.p2 + self.steps

    def checkpoint_state(self) -> dict:
        return dict(model=self.model.state_dict(), aux=self.aux.state_dict(), opt=self.opt.state_dict(),
                    llm_aux=self.llm_aux.state_dict(), opt_llm_aux=self.opt_llm_aux.state_dict(), step=self.step,
                    steps=self.steps, wall_s=self.wall, cfg=self.cfg, seed=self.seed, p2=self.p2, ema=self.ema,
                    torch_rng=torch.get_rng_state(),
                    last_eval=self.last_eval, eval_step=self.eval_step)


@dataclass
class StepOut:
    """What one step reports: losses (floats), schedule values, gradient norm, timings, and the
    auxiliary accuracies when they were measured this step (``aux_acc``, else ``None``)."""

    loss: float
    aux_loss: float
    llm_aux_loss: float
    lr: float
    aux_w: float
    gnorm: float
    data_s: float
    seq_len: int
    aux_acc: dict | None


def train_step(run: Run) -> StepOut:
    """Build the batch of ``run.step``, take one optimiser step, advance ``run.step`` and ``run.wall``."""
    t0 = time.time()
    cfg, phase1 = run.cfg, run.phase1
    exs = [make_train_example(run.seed, run.step, i, cfg["resize_prob"], cfg.get("extra_qa", 0))
           for i in range(cfg["batch"])]
    pix = torch.from_numpy(np.stack([e[0] for e in exs]))
    labs = collate_labels([e[1] for e in exs])
    packed = pack([e[2] for e in exs])
    t_data = time.time() - t0
    lr = lr_at(run.step, cfg, run.steps, run.p2)
    for g in run.opt.param_groups + run.opt_llm_aux.param_groups:
        g["lr"] = lr
    main_loss, grad_loss, llm_aux_loss, img_tok = _text_losses(run, exs, pix, labs, packed)
    aw = aux_weight(run.step, cfg, run.steps, run.p2)
    gw = 1.0 if (not phase1 or run.ema.get("global_on")) else cfg.get("p1_global_w", 1.0)
    aux_loss = run.aux.loss(img_tok, labs, gw)
    loss = grad_loss + aw * aux_loss
    measure = run.step % 50 == 0 or (phase1 and run.step % 10 == 0)
    am = aux_metrics(run.aux, img_tok.detach(), labs) if measure else None
    if phase1 and am is not None:  # deterministic (training-batch) accuracy, measured before the update
        for k, v in am.items():
            run.ema[k] = v if k not in run.ema else 0.8 * run.ema[k] + 0.2 * v
    gn = _update(run, loss, phase1)
    run.step += 1
    run.wall += time.time() - t0
    return StepOut(loss=main_loss.item(), aux_loss=aux_loss.item(), llm_aux_loss=llm_aux_loss, lr=lr, aux_w=aw,
                   gnorm=float(gn), data_s=t_data, seq_len=packed[0].shape[1], aux_acc=am)


def _text_losses(run: Run, exs, pix, labs, packed):
    """(answer loss, loss to backpropagate before the image-token term, LLM-side head loss as a float,
    projected image tokens).  Phase 1 has no text loss: only the image tokens are computed."""
    cfg = run.cfg
    if run.phase1:
        main_loss = torch.zeros(())
        return main_loss, main_loss, 0.0, image_tokens(run.model, pix)
    ids, pos, mask, sb, sp, st, sseg, _ = packed
    use_llm_aux = cfg["llm_aux_w"] > 0
    res = packed_forward(run.model, pix, ids, pos, mask, sb, sp,
                         mid_layer=cfg["llm_aux_layer"] if use_llm_aux else None)
    logits, img_tok = res[0], res[1]
    main_loss = F.cross_entropy(logits, st)
    if not use_llm_aux:
        return main_loss, main_loss, 0.0, img_tok
    seg_q = [question_targets(q) for e in exs for q, _ in e[2]]
    qt_t = {k: torch.tensor([seg_q[j][k] for j in sseg.tolist()]) for k, _ in LLM_Q_SPEC}
    it_t = {k: labs[k][sb] for k, _ in LLM_I_SPEC}
    llm_aux_loss = run.llm_aux.loss(res[2], qt_t, it_t, labs["presence"][sb])
    return main_loss, main_loss + cfg["llm_aux_w"] * llm_aux_loss, llm_aux_loss.item(), img_tok


def _update(run: Run, loss: torch.Tensor, phase1: bool) -> torch.Tensor:
    """Backward, clip the model + image-head gradients to norm 1, step; returns the gradient norm."""
    run.opt.zero_grad(set_to_none=True)
    run.opt_llm_aux.zero_grad(set_to_none=True)
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(list(run.model.parameters()) + list(run.aux.parameters()), 1.0)
    run.opt.step()
    if not phase1 and run.cfg["llm_aux_w"] > 0:
        run.opt_llm_aux.step()
    return gn

