// Kept-token overlay: draws on an image which cells of its token grid survived each reduction
// stage. Input: the `kept_patches` list of a /generate `done` event, one entry per (image, stage):
// {image, stage, layer, grid: [rows, cols], indices: [kept cells, row-major]}.
"use strict";

const KeptOverlay = (() => {
  const DROPPED = "rgba(20, 24, 33, 0.62)";
  const KEPT_EDGE = "rgba(47, 91, 211, 0.55)";

  /** The stages reported for image 0, in order. */
  function stagesOf(keptPatches) {
    return (keptPatches || []).filter((p) => p.image === 0).sort((a, b) => a.stage - b.stage);
  }

  /** Shade every dropped cell of `stage`'s grid on `canvas`, outline the kept ones. */
  function draw(canvas, stage) {
    const size = canvas.getBoundingClientRect();
    canvas.width = Math.round(size.width) || 224;
    canvas.height = Math.round(size.height) || 224;
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const [rows, cols] = stage.grid;
    const kept = new Set(stage.indices);
    const w = canvas.width / cols;
    const h = canvas.height / rows;
    for (let cell = 0; cell < rows * cols; cell++) {
      const x = (cell % cols) * w;
      const y = Math.floor(cell / cols) * h;
      if (kept.has(cell)) {
        ctx.strokeStyle = KEPT_EDGE;
        ctx.strokeRect(x + 0.5, y + 0.5, w - 1, h - 1);
      } else {
        ctx.fillStyle = DROPPED;
        ctx.fillRect(x, y, w, h);
      }
    }
    canvas.dataset.kept = String(kept.size);
    canvas.dataset.cells = String(rows * cols);
  }

  function label(stage) {
    const [rows, cols] = stage.grid;
    const where = stage.stage === 0 ? "before the LLM" : `from LLM layer ${stage.layer}`;
    return `stage ${stage.stage} (${where}): ${stage.indices.length} of ${rows * cols} kept`;
  }

  /** Fill a result card's overlay box: the image, the canvas and a stage slider. */
  function show(box, imageUrl, keptPatches) {
    const stages = stagesOf(keptPatches);
    if (!imageUrl || stages.length === 0) {
      box.hidden = true;
      return;
    }
    box.hidden = false;
    const img = box.querySelector("img");
    const canvas = box.querySelector("canvas");
    const slider = box.querySelector(".stage");
    const text = box.querySelector(".stage-label");
    slider.max = String(stages.length - 1);
    slider.value = String(stages.length - 1);
    const render = () => {
      const stage = stages[Number(slider.value)];
      draw(canvas, stage);
      text.textContent = label(stage);
    };
    slider.oninput = render;
    img.onload = render;
    img.src = imageUrl;
    if (img.complete) render();
  }

  return { show, stagesOf };
})();
