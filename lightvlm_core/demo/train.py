"""Train the tiny shapes-demo LLaVA from scratch on CPU.

    python -m lightvlm_core.demo.train --out runs/demo --export models/shapes-demo \
        [--seed 0] [--threads 1] [--steps N] [--resume] [--init DIR] [--set key=value ...]

Recipe (see TRAINING.md written next to the exported model):

* ``LlavaForConditionalGeneration``: CLIP vision tower (112 px, patch 7 -> 256 image
  tokens) + Llama text model, word-level closed vocabulary, tied embeddings,
  ``vision_feature_layer=-1`` (``model.py``).
* Shared-image-prefix packing: every image carries ~8 question/answer segments
  (all five types).  A 4D boolean mask lets each segment see the image prefix and
  itself (causally); position ids restart after the prefix for each segment, so a
  segment is computed exactly as the stand-alone prompt would be (``packing.py``).
* Loss on answer tokens + ``</s>`` only, plus dense auxiliary per-patch losses on
  the projected image tokens (colour / shape / object index from the left / centre
  flag per patch, and global counts / presence targets), through training-only
  linear heads (``heads.py``).  The auxiliary weight decays over training.
* AdamW, linear warm-up then cosine decay over the step budget, grad clip 1.0 (``recipe.py``).
* Data is generated on the fly; training scene ``i`` of step ``s`` is seeded with
  ``f"train/{seed}/{s}/{i}"`` so a resumed run sees exactly the same data (``data.py``).

This module is the command line and the loop: set up (fresh, ``--resume`` or ``--init``),
step (``step.py``), log, evaluate (``evalset.py``), checkpoint and export (``record.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from .evalset import EvalSet
from .heads import AuxHeads, LLMAuxHead
from .model import build_model, warm_start
from .recipe import DEFAULTS, apply_overrides, make_llm_aux_optimizer, make_optimizer, resumed_config
from .record import export, hardware, read_record, record_commands
from .step import Run, StepOut, train_step


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--export", default="models/shapes-demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--init", default=None,
                    help="warm start: continue training an exported model directory (skips phase 1; use a new --seed)")
    ap.add_argument("--bench", type=int, default=0, help="time N steps and exit (no files written)")
    ap.add_argument("--set", nargs="*", default=[], help="override recipe values, key=value")
    return ap.parse_args(argv)


def configure_torch(threads: int) -> str:
    """Thread counts, offline hub, quiet transformers; returns the transformers version."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    transformers.logging.set_verbosity_error()
    return transformers.__version__


def build_run(cfg: dict, seed: int, steps: int, state: dict | None, init_dir: str | None) -> Run:
    """A fresh run (phase 1 first unless ``vision_steps=0``), a resumed one (``state`` from its
    checkpoint), or a warm start from an exported model (``init_dir``: phase 1 is skipped)."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    aux = AuxHeads(cfg["txt_hidden"])
    llm_aux = LLMAuxHead(cfg["txt_hidden"])
    model.train()
    run = Run(cfg=cfg, seed=seed, steps=steps, model=model, aux=aux, llm_aux=llm_aux,
              opt=make_optimizer(model, aux, cfg), opt_llm_aux=make_llm_aux_optimizer(llm_aux, cfg))
    run.p2 = None if cfg.get("vision_steps", 0) > 0 else 0
    if state is not None:
        restore(run, state)
    elif init_dir:
        warm_start(model, init_dir)
        cfg["init"] = init_dir
        cfg["init_record"] = read_record(init_dir)  # read now: the export may overwrite init_dir
        run.p2 = 0  # the exported model is past phase 1
    return run


def restore(run: Run, state: dict) -> None:
    """Continue from a checkpoint: weights, optimisers, counters, phase, RNG."""
    run.model.load_state_dict(state["model"])
    run.aux.load_state_dict(state["aux"])
    run.opt.load_state_dict(state["opt"])
    if "llm_aux" in state:
        run.llm_aux.load_state_dict(state["llm_aux"])
        run.opt_llm_aux.load_state_dict(state["opt_llm_aux"])
    run.step, run.wall = state["step"], state["wall_s"]
    run.last_eval, run.eval_step = state.get("last_eval"), state.get("eval_step")
    torch.set_rng_state(state["torch_rng"])
    if run.steps != state["steps"]:
        print(f"note: step budget changed {state['steps']} -> {run.steps}", file=sys.stderr)
    run.p2, run.ema = state.get("p2", 0), state.get("ema", {})
    run.cfg.setdefault("init", None)
    run.cfg.setdefault("init_record", "")


class RunLog:
    """JSON lines to stdout and, unless benchmarking, to ``log.jsonl``."""

    def __init__(self, path: str | None):
        self.path = path

    def __call__(self, rec: dict) -> None:
        print(json.dumps(rec), flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


def record_history(run: Run, out_dir: str, info: dict, resumed: bool) -> None:
    """Append this command to the run's ``commands.txt`` and put the full history in ``info``."""
    hist_path = os.path.join(out_dir, "commands.txt")
    if not resumed and os.path.exists(hist_path):
        os.remove(hist_path)
    if not run.trained_out():  # resuming a finished run only re-exports: it is not part of the recipe
        with open(hist_path, "a") as f:
            f.write(info["command"] + "\n")
    with open(hist_path) as f:
        info["history"] = [line.strip() for line in f if line.strip()]
    if run.cfg.get("init"):  # the warm-started model's own commands come first
        info["history"] = record_commands(run.cfg["init_record"]) + info["history"]


class Trainer:
    """The loop: step, log, switch phases, evaluate, checkpoint + export."""

    def __init__(self, run: Run, args: argparse.Namespace, info: dict, log: RunLog):
        self.run, self.args, self.info, self.log = run, args, info, log
        self.bench = args.bench
        self.evalset = EvalSet(run.cfg["n_eval"], run.cfg["eval_seed"]) if not self.bench else None
        self.ckpt_path = os.path.join(args.out, "checkpoint.pt")
        self.meter: LossMeter | None = None

    def train(self) -> int:
        """Train until the step budget is spent (or ``--bench`` steps); returns the steps taken."""
        run, n_done = self.run, 0
        last_ckpt = time.time()
        self.meter = LossMeter()
        while not self.finished(n_done):
            n_done += 1
            phase1 = run.phase1  # the phase this step ran in
            out = train_step(run)
            self.meter.add(out)
            if self.bench or run.step % 10 == 0:
                self.log(self.meter.record(run, out))
            self.after_step(out, phase1)
            if self.bench:
                continue
            done = run.trained_out()
            if (run.step % run.cfg["eval_every"] == 0 and not phase1) or done:
                self.evaluate()
            if time.time() - last_ckpt > run.cfg["ckpt_minutes"] * 60 or done:
                tc = time.time()
                self.save()
                last_ckpt = time.time()
                self.log(dict(event="checkpoint", step=run.step, ckpt_s=round(time.time() - tc, 1)))
                self.meter.t_log += time.time() - tc
        return n_done

    def finished(self, n_done: int) -> bool:
        """``--bench N``: after N steps; otherwise once phase 2 has run its step budget."""
        return n_done >= self.bench if self.bench else self.run.trained_out()

    def after_step(self, out: StepOut, phase1: bool) -> None:
        """Log measured auxiliary accuracies; in phase 1, switch on the global targets and move to phase 2."""
        run, am, ema, cfg = self.run, out.aux_acc, self.run.ema, self.run.cfg
        if am is None:
            return
        if (run.step - 1) % 50 == 0:
            self.log(dict(event="aux_acc", step=run.step - 1, **am,
                          **({"ema_shape": round(ema["a_shape"], 3)} if ema else {})))
        if not phase1:
            return
        if not ema.get("global_on") and (
                cfg.get("p1_global_w", 1.0) >= 1.0 or (run.step >= 100 and ema["a_shape"] >= cfg["p1_local_exit"])):
            ema["global_on"] = run.step  # local targets learned: switch on rank / global targets
            self.log(dict(event="global_on", step=run.step))
        if run.step >= cfg["vision_steps"] or (
                run.step >= 100 and ema.get("global_on") and
                min(ema["a_shape"], ema["a_rank"], ema["a_n_total"]) >= cfg["vis_exit_acc"]):
            run.p2 = run.step
            self.log(dict(event="phase2", step=run.step, wall_s=round(run.wall, 1),
                          **{k: round(v, 3) for k, v in ema.items()}))

    def evaluate(self) -> None:
        te = time.time()
        run = self.run
        run.last_eval = self.evalset.run(run.model)
        run.eval_step = run.step
        self.log(dict(event="eval", step=run.step, wall_s=round(run.wall, 1), eval_s=round(time.time() - te, 1),
                      **run.last_eval))
        self.meter.t_log += time.time() - te

    def save(self) -> None:
        """Checkpoint (atomically replaced) and export the model with its training record."""
        run = self.run
        tmp = self.ckpt_path + ".tmp"
        torch.save(run.checkpoint_state(), tmp)
        os.replace(tmp, self.ckpt_path)
        export(run.model, self.args.export, dict(
            self.info, step=run.step, steps=run.steps, p2=run.p2, wall_s=run.wall, last_eval=run.last_eval,
            eval_step=run.eval_step, init=run.cfg.get("init"), init_record=run.cfg.get("init_record")))


class LossMeter:
    """Loss averages between two log lines, and the time since the last one (minus eval/checkpoint time)."""

    def __init__(self):
        self.t_log = time.time()
        self._reset()

    def _reset(self) -> None:
        self.loss, self.aux, self.llm_aux, self.n = 0.0, 0.0, 0.0, 0

    def add(self, out: StepOut) -> None:
        self.loss += out.loss
        self.aux += out.aux_loss
        self.llm_aux += out.llm_aux_loss
        self.n += 1

    def record(self, run: Run, out: StepOut) -> dict:
        """The step's log line, averaged since the last one; starts a new average."""
        n = self.n
        rec = dict(step=run.step, loss=round(self.loss / n, 4), aux=round(self.aux / n, 4), aux_w=round(out.aux_w, 3),
                   llm_aux=round(self.llm_aux / n, 4),
                   lr=round(out.lr, 6), gnorm=round(out.gnorm, 3), s_per_step=round((time.time() - self.t_log) / n, 3),
                   data_s=round(out.data_s, 3), seq_len=out.seq_len, wall_s=round(run.wall, 1))
        self._reset()
        self.t_log = time.time()
        return rec


def main(argv=None):
    args = parse_args(argv)
    cfg = apply_overrides(dict(DEFAULTS), args.set)  # an unknown key fails before anything is loaded
    transformers_version = configure_torch(args.threads)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    state = None
    if args.resume and os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # our own checkpoint
        cfg = resumed_config(state["cfg"], args.set)
    seed = state["seed"] if state is not None else args.seed
    run = build_run(cfg, seed, args.steps, state, args.init)
    n_params = sum(p.numel() for p in run.model.parameters())
    if not args.bench:
        os.makedirs(args.out, exist_ok=True)
    log = RunLog(None if args.bench else os.path.join(args.out, "log.jsonl"))
    info = dict(
        command="python -m lightvlm_core.demo.train " + " ".join(sys.argv[1:] if argv is None else argv),
        seed=seed, threads=args.threads, steps=args.steps, batch=cfg["batch"], hardware=hardware(),
        transformers=transformers_version, params=n_params, n_eval=cfg["n_eval"], eval_seed=cfg["eval_seed"],
    )
    trainer = Trainer(run, args, info, log)
    if not args.bench:
        record_history(run, args.out, info, resumed=state is not None)
        if state is None:
            log(dict(event="start", cfg=cfg, params=n_params, **{k: info[k] for k in ("seed", "threads", "steps")}))
        else:
            log(dict(event="resume", step=run.step, command=info["command"], cfg=cfg))
    n_done = trainer.train()
    if not args.bench:
        if n_done == 0:  # nothing left to train (e.g. --resume of a finished run): refresh the export
            trainer.save()
        log(dict(event="done", step=run.step, wall_s=round(run.wall, 1), last_eval=run.last_eval))


if __name__ == "__main__":
    main()
