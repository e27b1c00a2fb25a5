// What both player pages share (index.html: the server engine; web_player.js: the browser engine): the canvas
// that shows RGB frames scaled up and pixelated, and the frames-per-second counter.
"use strict";

export class Screen {
  constructor(canvas, scaleTarget = 640) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.small = document.createElement("canvas");
    this.smallCtx = this.small.getContext("2d");
    this.scaleTarget = scaleTarget;
    this.image = null;
  }

  resize(width, height) {
    if (this.image && this.image.width === width && this.image.height === height) return;
    this.small.width = width;
    this.small.height = height;
    this.image = this.smallCtx.createImageData(width, height);
    const scale = Math.max(1, Math.floor(this.scaleTarget / width));
    this.canvas.width = width * scale;
    this.canvas.height = height * scale;
  }

  // rgb: bytes [height, width, 3].
  draw(rgb, width, height) {
    this.resize(width, height);
    const rgba = this.image.data;
    for (let i = 0, j = 0; i < rgb.length; i += 3, j += 4) {
      rgba[j] = rgb[i]; rgba[j + 1] = rgb[i + 1]; rgba[j + 2] = rgb[i + 2]; rgba[j + 3] = 255;
    }
    this.smallCtx.putImageData(this.image, 0, 0);
    this.ctx.imageSmoothingEnabled = false;
    this.ctx.drawImage(this.small, 0, 0, this.canvas.width, this.canvas.height);
  }
}

// Frames shown in the last second, written into `label` four times a second; `onUpdate(fps)` sees each value.
export class FpsCounter {
  constructor(label, onUpdate = () => {}) {
    this.arrivals = [];
    setInterval(() => {
      this.forget(performance.now());
      label.textContent = this.arrivals.length + " FPS";
      onUpdate(this.arrivals.length);
    }, 250);
  }

  forget(now) {
    while (this.arrivals.length && this.arrivals[0] < now - 1000) this.arrivals.shift();
  }

  frame() {
    const now = performance.now();
    this.arrivals.push(now);
    this.forget(now);
  }
}
