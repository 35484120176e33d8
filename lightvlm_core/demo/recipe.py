"""The shapes-demo training recipe: default hyperparameters, their schedules and the optimiser."""

from __future__ import annotations

import math

import torch

DEFAULTS = dict(
    vis_hidden=192, vis_layers=6, vis_heads=3, vis_mlp=768,
    txt_hidden=256, txt_layers=6, txt_heads=4, txt_kv_heads=2, txt_mlp=640,
    vision_steps=1500, vis_exit_acc=0.9, p1_global_w=1.0, p1_local_exit=0.85, vis_lr=1.5e-3, vis_warmup=30,
    batch=16, lr=1e-3, warmup=60, min_lr_frac=0.05, wd=0.05,
    aux_w0=1.0, aux_w1=0.1, aux_decay_frac=0.5,
    llm_aux_w=0.0, llm_aux_layer=3, extra_qa=0,  # LLM-side aux head: off in the shipped recipe
    pos_init="sincos", qk_init="default", qk_std=0.06,
    resize_prob=0.3, eval_every=100, ckpt_minutes=5.0, n_eval=250, eval_seed=12345,
)

# Recipe keys added after the first runs: a checkpoint without them resumes with them off.
LATER_KEYS = {"llm_aux_w": 0.0, "llm_aux_layer": DEFAULTS["llm_aux_layer"], "extra_qa": DEFAULTS["extra_qa"]}


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Set ``key=value`` pairs in ``cfg`` (in place), each value typed as its default."""
    for kv in overrides:
        k, v = kv.split("=", 1)
        cfg[k] = type(DEFAULTS[k])(v)
    return cfg


def resumed_config(saved: dict, overrides: list[str]) -> dict:
    """The recipe of a resumed run: its saved values, later keys switched off, then ``overrides``."""
    cfg = dict(saved)
    for key, off in LATER_KEYS.items():
        cfg.setdefault(key, off)
    return apply_overrides(cfg, overrides)


def lr_at(step: int, cfg: dict, steps: int, p2) -> float:
    """Phase 1 (``p2 is None``): vision-only warm-up then constant; phase 2 (started at
    step ``p2``, lasting ``steps`` steps): warm-up then cosine decay."""
    if p2 is None:
        return cfg["vis_lr"] * min(1.0, (step + 1) / cfg["vis_warmup"])
    step = step - p2
    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    t = (step - cfg["warmup"]) / max(1, steps - cfg["warmup"])
    t = min(1.0, t)
    return cfg["lr"] * (cfg["min_lr_frac"] + (1 - cfg["min_lr_frac"]) * 0.5 * (1 + math.cos(math.pi * t)))


def aux_weight(step: int, cfg: dict, steps: int, p2) -> float:
    """Weight of the image-token auxiliary loss: 1 in phase 1, then a cosine decay from
    ``aux_w0`` to ``aux_w1`` over the first ``aux_decay_frac`` of phase 2."""
    if p2 is None:
        return 1.0
    step = step - p2
    t = min(1.0, step / max(1, cfg["aux_decay_frac"] * steps))
    return cfg["aux_w1"] + (cfg["aux_w0"] - cfg["aux_w1"]) * 0.5 * (1 + math.cos(math.pi * t))


def make_optimizer(model, aux, cfg: dict) -> torch.optim.AdamW:
    """AdamW over the model and the image-token heads; no weight decay on biases, norms, embeddings."""
    decay, no_decay = [], []
    for mod in (model, aux):
        for n, p in mod.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.ndim >= 2 and "embed" not in n else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg["wd"]},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg["lr"], betas=(0.9, 0.98), eps=1e-8)


def make_llm_aux_optimizer(llm_aux, cfg: dict) -> torch.optim.AdamW:
    """AdamW for the LLM-side head (stepped only when ``llm_aux_w > 0``)."""
    return torch.optim.AdamW(llm_aux.parameters(), lr=cfg["lr"], betas=(0.9, 0.98), weight_decay=0.0)
