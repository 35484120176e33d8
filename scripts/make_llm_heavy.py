"""Build an LLM-heavy LLaVA with random weights for serving benchmarks against a peer.

The bundled demo model's tokenizer, processor and architecture (CLIP tower + Llama LM at width 256,
GQA 2:1), with the LM deepened to 32 layers and 196-px images (patch 7: 784 image tokens), so that
the LLM's prefill dominates a request, as in a real 7B deployment. Outputs are meaningless (random
weights); the serving benchmark fixes the output length (`ignore_eos`).

    python scripts/make_llm_heavy.py OUT_DIR [--layers 32] [--image-size 196]

Then: `lightvlm bench serve --model OUT_DIR ...`, and `MODEL_SRC=OUT_DIR scripts/peer-vllm-cpu.sh start`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

DEMO = Path(__file__).resolve().parent.parent / "models" / "shapes-demo"


def build(out: Path, layers: int, image_size: int, seed: int = 0) -> None:
    config = AutoConfig.from_pretrained(DEMO)
    config.text_config.num_hidden_layers = layers
    config.text_config.max_position_embeddings = 2048  # 784 image tokens no longer fit in the demo's 512
    config.vision_config.image_size = image_size
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    processor = AutoProcessor.from_pretrained(DEMO)
    processor.image_processor.size = {"height": image_size, "width": image_size}
    processor.image_processor.crop_size = {"height": image_size, "width": image_size}
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    for name in ("chat_template.jinja", "generation_config.json"):
        if (DEMO / name).exists():
            shutil.copy(DEMO / name, out / name)
    patches = (image_size // config.vision_config.patch_size) ** 2
    params = sum(p.numel() for p in model.parameters())
    print(f"{out}: {layers} LM layers, {patches} image tokens, {params / 1e6:.1f}M parameters")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=196)
    args = parser.parse_args()
    build(args.out, args.layers, args.image_size)


if __name__ == "__main__":
    main()
