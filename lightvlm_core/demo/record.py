"""The exported model and its training record (``TRAINING.md``): writing an export, and reading
back the record a warm start continues."""

from __future__ import annotations

import copy
import os
import platform
import shutil

import torch

from .processor import build_processor

RECIPE_TEXT = [
    "Recipe: phase 1 trains only the vision tower + projector on dense per-patch auxiliary targets; phase 2 trains",
    "everything with shared-image-prefix packing of ~8 questions per image (4D mask), loss on answer tokens",
    "+ `</s>` plus the decaying auxiliary loss. CLIP position embeddings start as a 2D sin/cos code.",
    "The auxiliary heads are training-only (not exported).",
    "AdamW with warm-up + cosine decay over the phase-2 step budget, grad clip 1.0.",
    "See `lightvlm_core/demo/train.py`.",
]


def export(model, out_dir: str, info: dict) -> None:
    """Write the model (fp16 safetensors), processor and ``TRAINING.md`` to ``out_dir``, replacing
    it only once the new export is complete."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    _save_fp16(model, tmp)
    build_processor().save_pretrained(tmp)
    with open(os.path.join(tmp, "TRAINING.md"), "w") as f:
        f.write(training_md(info))
    for name in os.listdir(tmp):  # safetensors writes 0600 files
        os.chmod(os.path.join(tmp, name), 0o644)
    if os.path.isdir(out_dir):
        old = out_dir.rstrip("/") + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
        os.rename(tmp, out_dir)


def _save_fp16(model, path: str) -> None:
    m16 = copy.deepcopy(model).to(torch.float16)  # the training model stays fp32
    m16.config.dtype = "float16"
    m16.save_pretrained(path)


def training_md(info: dict) -> str:
    """The training record of an export: commands, run facts, last held-out accuracy, recipe, and
    (for a warm start) the record of the model it continued, one heading level down."""
    lines = ["# shapes-demo: training record", "", *_run_lines(info), *_accuracy_table(info), *RECIPE_TEXT, ""]
    if info.get("init_record"):  # nested records keep their own nesting one level down
        lines += ["## The warm-started model's own record", "",
                  *[("#" + ln if ln.startswith("#") else ln) for ln in info["init_record"].splitlines()], ""]
    return "\n".join(lines)


def _run_lines(info: dict) -> list[str]:
    step = info.get("step", 0)
    p1_steps = info["p2"] if info.get("p2") is not None else step  # phase 2 starts at step p2
    return [
        "Tiny LLaVA (CLIP vision 112 px / patch 7 -> 256 image tokens, Llama text) trained from scratch on",
        "synthetic shapes scenes (`lightvlm_core/demo/scenes.py`).",
        "",
        "- command(s), in order (the run was resumed from its checkpoint after each):",
        *[f"  - `{c}`" for c in (info.get("history") or [info.get("command")])],
        f"- seed: {info.get('seed')}, threads: {info.get('threads')}",
        *([f"- warm start: the `--init` command continued the model the commands before it exported ({info['init']})"]
          if info.get("init") else []),
        f"- phase 1 (vision tower + auxiliary heads only): {p1_steps} steps",
        f"- full-model steps: {max(0, step - p1_steps)} / {info.get('steps')}"
        f" (batch {info.get('batch')} images, ~8 QA segments each, +4 per `extra_qa` round)",
        f"- wall time: {info.get('wall_s', 0) / 60:.1f} min of training",
        f"- hardware: {info.get('hardware')}",
        f"- torch {torch.__version__}, transformers {info.get('transformers')}",
        f"- parameters: {info.get('params')}",
    ]


def _accuracy_table(info: dict) -> list[str]:
    acc = info.get("last_eval") or {}
    return [
        f"- last held-out teacher-forced exact match (== greedy exact match), {info.get('n_eval')} questions, "
        f"heldout seed {info.get('eval_seed')}, at step {info.get('eval_step')}:",
        "",
        "| " + " | ".join(list(acc)) + " |",
        "|" + "---|" * len(acc),
        "| " + " | ".join(f"{v:.3f}" for v in acc.values()) + " |",
        "",
    ]


def hardware() -> str:
    """CPU model name and logical CPU count, for the record."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, CPU only"


def read_record(init_dir: str) -> str:
    """``init_dir/TRAINING.md`` without its title: the record of the run a warm start continues."""
    path = os.path.join(init_dir, "TRAINING.md")
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        lines = f.read().strip().splitlines()
    return "\n".join(lines[1:] if lines and lines[0].startswith("# ") else lines).strip()


def record_commands(record: str) -> list[str]:
    """The training commands listed in a record, in order."""
    cmds = []
    for line in record.splitlines():
        if line.startswith("## "):  # a nested record: its commands are already in the list above
            break
        if line.strip().startswith("- `python -m lightvlm_core.demo.train"):
            cmds.append(line.strip()[3:-1])
    return cmds
