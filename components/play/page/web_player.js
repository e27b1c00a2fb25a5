// The in-browser engine of the player (components/play/web_bundle.py writes the bundle this page runs in).
// ONNX Runtime Web runs the world model and the decoder here, each in its own Web Worker (session_worker.js); the
// game loop is components/play/server.py's GameState.advance: the next prediction runs while the last frame
// decodes, on two cores. The same keymap (bundle.json "keymap"), the same action matching, the same rolling
// context and the same float -> uint8 conversion, so the frames match ONNX Runtime in Python (same graphs) up to
// WASM arithmetic.
"use strict";
import { FpsCounter, Screen } from "./screen.js";

const $ = (id) => document.getElementById(id);
const query = new URLSearchParams(location.search);
// Read by the browser tests and benchmarks/browser_play_speed.py.
const stats = {
  ready: false, error: null, engine: "browser", threads: 0, isolated: self.crossOriginIsolated === true,
  precision: "", decoderSplit: null,
  frames: 0, frameIndex: -1, contextIndex: -1, action: -1, actionsSeen: [], modelMs: 0, fps: 0, sha256: "",
};
window.playerStats = stats;

function fail(message) {
  stats.error = message;
  $("status").textContent = message;
  $("status").className = "error";
}

function hex(buffer) {
  return [...new Uint8Array(buffer)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

// A bundle file, refused when it is missing or differs from bundle.json (bytes, and sha256 where the page may
// hash: crypto.subtle exists only in secure contexts, https or localhost).
async function fetchChecked(name, expected) {
  if (!expected) throw new Error(`${name} is not listed in bundle.json: rebuild the bundle (python -m components bundle)`);
  const response = await fetch(name);
  if (!response.ok) {
    throw new Error(`${name} is missing from the bundle (HTTP ${response.status}): rebuild it with python -m components bundle`);
  }
  const bytes = await response.arrayBuffer();
  if (bytes.byteLength !== expected.bytes) {
    throw new Error(`${name} is corrupt: ${bytes.byteLength} bytes where bundle.json says ${expected.bytes}; rebuild the bundle`);
  }
  if (crypto.subtle) {
    const digest = hex(await crypto.subtle.digest("SHA-256", bytes));
    if (digest !== expected.sha256) {
      throw new Error(`${name} is corrupt: sha256 ${digest.slice(0, 12)}... where bundle.json says ${expected.sha256.slice(0, 12)}...; rebuild the bundle`);
    }
    stats.sha256 = "checked";
  } else {
    stats.sha256 = "sizes only (no crypto.subtle outside a secure context)";
  }
  return bytes;
}

// components/play/server.py action_for_buttons: an action whose buttons equal the held ones wins; else the one that
// presses the most held buttons and none that are not held; else the no-op (no buttons), else id 0.
function actionForButtons(held, actions) {
  let best = null;
  let bestOverlap = 0;
  for (const action of actions) {
    const buttons = new Set(action.buttons);
    const subset = [...buttons].every((b) => held.has(b));
    if (held.size > 0 && subset && buttons.size === held.size) return action.id;
    if (buttons.size > 0 && subset && buttons.size > bestOverlap) {
      best = action.id;
      bestOverlap = buttons.size;
    }
  }
  if (best !== null) return best;
  const noop = actions.find((a) => a.buttons.length === 0);
  return noop ? noop.id : 0;
}

function actionForKeys(keys, actions, keymap) {
  return actionForButtons(new Set(keys.filter((k) => k in keymap).map((k) => keymap[k])), actions);
}

// decoder output float [1, 3, H, W] in [0, 1] -> RGB bytes [H, W, 3], as components/images.py to_uint8 does it in float32.
function toRgb(planes, height, width) {
  const size = height * width;
  const rgb = new Uint8Array(size * 3);
  for (let c = 0; c < 3; c++) {
    for (let i = 0; i < size; i++) {
      const x = Math.min(1, Math.max(0, planes[c * size + i]));
      rgb[i * 3 + c] = Math.trunc(Math.fround(Math.fround(x * 255) + 0.5));
    }
  }
  return rgb;
}

// An ONNX Runtime Web session in its own Web Worker (session_worker.js). run(feeds) takes and resolves to
// {name: {type, data, dims}}, as ort's InferenceSession.run does with tensors; runs are answered in call order.
class WorkerSession {
  constructor(label) {
    this.label = label;
    this.pending = new Map();
    this.nextId = 0;
    this.failure = null;  // set once the worker has died: every call then fails with it
    this.worker = new Worker(new URL("./session_worker.js", import.meta.url), { type: "module" });
    this.worker.onmessage = ({ data }) => {
      const call = this.pending.get(data.id);
      if (!call) return;
      this.pending.delete(data.id);
      if (data.ok) call.resolve(data);
      else call.reject(new Error(`${this.label}: ${data.error}`));
    };
    const die = (reason) => {
      this.failure = new Error(`${this.label}: its Web Worker failed (${reason}); rebuild the bundle`);
      for (const call of this.pending.values()) call.reject(this.failure);
      this.pending.clear();
    };
    this.worker.onerror = (event) => die(event.message || "session_worker.js did not load");
    this.worker.onmessageerror = () => die("it sent a message that cannot be read");
  }

  call(message, transfer = []) {
    if (this.failure) return Promise.reject(this.failure);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ ...message, id }, transfer);
    });
  }

  async load(bytes, threads, options) {
    try {
      await this.call({ type: "load", ortUrl: new URL("./ort/ort.wasm.min.mjs", location.href).href,
                        wasmPaths: new URL("./ort/", location.href).href, threads, bytes, options }, [bytes]);
    } catch (error) {
      if (this.failure) throw this.failure;
      throw new Error(`cannot start ONNX Runtime Web for ${error.message}; rebuild the bundle after make web`);
    }
    return this;
  }

  async run(feeds, transfer = []) {
    return (await this.call({ type: "run", feeds }, transfer)).outputs;
  }
}

class Contexts {
  constructor(buffer, layout, sizes) {
    const { K, C, h, w, H, W } = sizes;
    this.count = layout.count;
    this.latents = new Float32Array(buffer, layout.latents.offset, this.count * K * C * h * w);
    this.actions = new Int32Array(buffer, layout.actions.offset, this.count * K);
    this.frames = new Uint8Array(buffer, layout.frames.offset, this.count * H * W * 3);
    this.sizes = sizes;
  }
}

// One player's rolling context: the last K latents and the K-1 actions before the current one. As GameState in
// components/play/server.py: step(action) predicts then decodes; advance(action) predicts while the previous
// prediction decodes (the two sessions are in two workers), and both give the same frames. onFrame(game), if set,
// is called as soon as a frame is decoded (the page draws it then, as the server sends it). With the decoder split
// (bundle.json "decoder_split"), the world model's graph also runs the decoder's head and outputs `decoderInput`,
// which the decoder's worker (the tail) takes instead of the latent.
class Game {
  constructor(world, decoder, contexts, onFrame = null, decoderInput = "latents") {
    Object.assign(this, { world, decoder, contexts, onFrame, decoderInput });
    this.decoding = null;  // the decode started by the last advance(): resolves to its frame
    this.sizes = contexts.sizes;
    this.latentSize = this.sizes.C * this.sizes.h * this.sizes.w;
  }

  reset(index) {
    const { K, H, W } = this.sizes;
    const i = ((index % this.contexts.count) + this.contexts.count) % this.contexts.count;
    const n = this.latentSize;
    this.contextIndex = i;
    this.latents = [];
    for (let k = 0; k < K; k++) {
      this.latents.push(this.contexts.latents.slice((i * K + k) * n, (i * K + k + 1) * n));
    }
    const recorded = Array.from(this.contexts.actions.subarray(i * K, (i + 1) * K));
    this.actions = recorded.slice(0, K - 1);
    this.frame = this.contexts.frames.slice(i * H * W * 3, (i + 1) * H * W * 3);
    this.frameAction = K > 1 ? recorded[K - 2] : 0;
    this.frameIndex = 0;
    this.modelMs = 0;
  }

  // The latent that `action` leads to, pushed (with the action) into the context.
  async predict(action) {
    const { K, C, h, w } = this.sizes;
    const started = performance.now();
    const context = new Float32Array(K * this.latentSize);
    this.latents.forEach((latent, k) => context.set(latent, k * this.latentSize));
    const actions = BigInt64Array.from([...this.actions, action].map((a) => BigInt(a)));
    const predicted = await this.world.run({
      context_latents: { type: "float32", data: context, dims: [1, K, C, h, w] },
      context_actions: { type: "int64", data: actions, dims: [1, K] },
    }, [context.buffer, actions.buffer]);
    const latent = new Float32Array(predicted.next_latent.data);
    const hidden = this.decoderInput === "latents"
      ? { type: "float32", data: latent, dims: [1, C, h, w] } : predicted[this.decoderInput];
    this.latents.push(latent);
    this.latents.shift();
    if (K > 1) {
      this.actions.push(action);
      this.actions.shift();
    }
    return { hidden, action, started, predictedAt: performance.now() };
  }

  // Decode a prediction: it becomes the current frame (uint8 RGB), which is returned and handed to onFrame.
  async show(prediction) {
    const { H, W } = this.sizes;
    const split = this.decoderInput !== "latents";  // the head's output is used once; the latent stays in the context
    const decoded = await this.decoder.run({ [this.decoderInput]: prediction.hidden },
                                           split ? [prediction.hidden.data.buffer] : []);
    const frame = toRgb(decoded.frames.data, H, W);
    this.frame = frame;
    this.frameAction = prediction.action;
    this.frameIndex += 1;
    this.modelMs = performance.now() - prediction.started;
    this.worldModelMs = prediction.predictedAt - prediction.started;
    if (this.onFrame) this.onFrame(this);
    return frame;
  }

  async step(action) {
    await this.finish();
    return this.show(await this.predict(action));
  }

  // Predict from `action` while the previous prediction decodes, then queue this prediction's decode in the
  // decoder's worker, behind the previous one (so the decoder never waits for a round trip through this thread);
  // resolves to the previous frame (null on the first call after a reset) once it is decoded. A player is never
  // more than one prediction ahead of its frames, and the frames are those of step() in the same order.
  async advance(action) {
    const previous = this.decoding || Promise.resolve(null);
    this.decoding = null;
    let prediction;
    try {
      prediction = await this.predict(action);
    } catch (error) {
      previous.catch(() => {});  // nobody waits for it any more
      throw error;
    }
    this.decoding = this.show(prediction);
    return previous;
  }

  // Wait for the decode that the last advance() started, if any; resolves to its frame (else null).
  async finish() {
    const decoding = this.decoding;
    this.decoding = null;
    return decoding ? decoding : null;
  }
}

async function main() {
  const bundleResponse = await fetch("bundle.json");
  if (!bundleResponse.ok) {
    fail(`bundle.json is missing (HTTP ${bundleResponse.status}): serve a folder written by python -m components bundle`);
    return;
  }
  const bundle = await bundleResponse.json();
  // Two workers (world model, decoder) share the cores; WASM threads within each need cross-origin isolation.
  const requested = Number(query.get("threads") || 0);
  const cores = navigator.hardwareConcurrency || 1;
  const threads = stats.isolated ? (requested || Math.max(1, Math.min(2, Math.floor(cores / 2)))) : 1;
  stats.threads = threads;
  stats.onnxruntimeWeb = bundle.onnxruntime_web;
  stats.precision = bundle.precision ? bundle.precision.precision : "float32";
  stats.decoderSplit = (bundle.decoder_split && bundle.decoder_split.cut) || null;
  // What the decoder worker is fed: the world model's latents, or, when the decoder is split, the head's tensor.
  const decoderInput = stats.decoderSplit || "latents";
  $("engine").textContent = `engine: browser (ONNX Runtime Web ${bundle.onnxruntime_web}, WASM, ${stats.precision}, ` +
    `2 workers x ${threads} thread${threads > 1 ? "s" : ""}${stats.decoderSplit ? ", decoder split" : ""}` +
    (stats.isolated ? ")" : "; not cross-origin isolated, so one thread: see README \"Play in the browser\")");

  let game;
  try {
    const [worldBytes, decoderBytes, contextBytes] = await Promise.all([
      fetchChecked(bundle.graphs.world_model, bundle.files[bundle.graphs.world_model]),
      fetchChecked(bundle.graphs.decoder, bundle.files[bundle.graphs.decoder]),
      fetchChecked("contexts.bin", bundle.files["contexts.bin"]),
    ]);
    // The batch axis is dynamic in the export; the page plays at batch 1, and saying so lets ORT plan for it.
    const options = { executionProviders: ["wasm"], graphOptimizationLevel: "all", freeDimensionOverrides: { B: 1 } };
    const [world, decoder] = await Promise.all([
      new WorkerSession(bundle.graphs.world_model).load(worldBytes, threads, options),
      new WorkerSession(bundle.graphs.decoder).load(decoderBytes, threads, options),
    ]);
    game = new Game(world, decoder, new Contexts(contextBytes, bundle.contexts, bundle.sizes), shown,
                    decoderInput);
  } catch (error) {
    fail(String(error.message || error));
    return;
  }

  const canvas = $("screen");
  const screen = new Screen(canvas);
  const { H, W } = bundle.sizes;
  screen.resize(W, H);
  const draw = (rgb) => screen.draw(rgb, W, H);

  const held = new Set();
  const keys = new Set(Object.keys(bundle.keymap));
  const fpsCap = query.has("fps") ? Number(query.get("fps")) : bundle.fps;
  let nextContext = 0;
  let resetWanted = true;
  let paused = false;
  let pauseWaiter = null;  // pause()'s promise: settled once the loop has stopped between two steps, or failed
  let resumeLoop = null;
  const fps = new FpsCounter($("fps"), (value) => { stats.fps = value; });

  // A frame of the main game, drawn as soon as it is decoded.
  function shown(played) {
    draw(played.frame);
    fps.frame();
    const action = played.frameAction;
    stats.frames += 1;
    stats.frameIndex = played.frameIndex;
    stats.contextIndex = played.contextIndex;
    stats.action = action;
    stats.modelMs = played.modelMs;
    if (!stats.actionsSeen.includes(action)) stats.actionsSeen.push(action);
    $("action").textContent = "action: " + (bundle.actions[action] ? bundle.actions[action].name : action);
    $("model").textContent = "model: " + played.modelMs.toFixed(1) + " ms";
  }

  function stopped(error = null) {
    if (pauseWaiter) error ? pauseWaiter.reject(error) : pauseWaiter.resolve();
    pauseWaiter = null;
  }

  function failed(error) {
    game.finish().catch(() => {});  // its decode may fail too: nobody waits for it any more
    fail(`the model failed: ${error.message || error}`);
    stopped(new Error(stats.error));
  }

  async function loop() {
    for (;;) {
      if (paused) {
        try {
          await game.finish();  // the last frame is decoded and drawn before the loop stops
        } catch (error) {
          failed(error);
          return;
        }
        stopped();
        await new Promise((resume) => { resumeLoop = resume; });
        continue;
      }
      const started = performance.now();
      const action = actionForKeys([...held], bundle.actions, bundle.keymap);
      try {
        if (resetWanted) {
          resetWanted = false;
          await game.finish();
          game.reset(nextContext++);
          draw(game.frame);
        }
        await game.advance(action);  // the next prediction runs while the last frame decodes (and is drawn)
      } catch (error) {
        failed(error);
        return;
      }
      const wait = fpsCap > 0 ? Math.max(0, 1000 / fpsCap - (performance.now() - started)) : 0;
      await new Promise((resolve) => setTimeout(resolve, wait));
    }
  }

  window.addEventListener("keydown", (event) => {
    if (!keys.has(event.code)) return;
    event.preventDefault();
    held.add(event.code);
  });
  window.addEventListener("keyup", (event) => {
    if (!keys.has(event.code)) return;
    event.preventDefault();
    held.delete(event.code);
  });
  window.addEventListener("blur", () => held.clear());
  $("reset").addEventListener("click", () => { resetWanted = true; canvas.focus(); });
  $("reset").disabled = false;

  // For the tests and the benchmark, and only with `?hooks` in the address: stop the loop between two steps,
  // then play a fixed sequence on a second game that shares the sessions.
  if (query.has("hooks")) window.player = {
    actionForKeys: (keysHeld) => actionForKeys(keysHeld, bundle.actions, bundle.keymap),
    pause: () => stats.error ? Promise.reject(new Error(stats.error))
      : new Promise((resolve, reject) => { paused = true; pauseWaiter = { resolve, reject }; }),
    resume: () => {
      paused = false;
      if (resumeLoop) resumeLoop();
      resumeLoop = null;
    },
    // Frames (arrays of RGB bytes) of `actions` played from shipped context `contextIndex`.
    // With `pipelined`, the frames come from advance() (as the loop plays), else from step().
    rollout: async (contextIndex, actions, pipelined = false) => {
      const replay = new Game(game.world, game.decoder, game.contexts, null, game.decoderInput);
      replay.reset(contextIndex);
      const frames = [];
      for (const action of actions) {
        if (!pipelined) {
          frames.push(Array.from(await replay.step(action)));
        } else {
          const frame = await replay.advance(action);
          if (frame) frames.push(Array.from(frame));
        }
      }
      const last = await replay.finish();
      if (last) frames.push(Array.from(last));
      return frames;
    },
    // ms per frame over `count` steps: one after the other (step: world model + decoder), and pipelined as the
    // loop plays (advance: the slower of the two, on two cores).
    benchmark: async (count) => {
      const replay = new Game(game.world, game.decoder, game.contexts, null, game.decoderInput);
      replay.reset(0);
      for (let i = 0; i < 3; i++) await replay.step(0);  // warm-up
      let worldModelMs = 0;
      let started = performance.now();
      for (let i = 0; i < count; i++) {
        await replay.step(i % bundle.actions.length);
        worldModelMs += replay.worldModelMs;
      }
      const ms = (performance.now() - started) / count;
      started = performance.now();
      for (let i = 0; i < count; i++) await replay.advance(i % bundle.actions.length);
      await replay.finish();
      const pipelinedMs = (performance.now() - started) / count;
      return { frames: count, ms_per_frame: pipelinedMs, fps: 1000 / pipelinedMs, sequential_ms_per_frame: ms,
               sequential_fps: 1000 / ms, world_model_ms: worldModelMs / count, decoder_ms: ms - worldModelMs / count,
               threads_per_worker: threads, precision: stats.precision };
    },
  };
  stats.ready = true;
  $("status").textContent = `playing; model files ${stats.sha256}`;
  canvas.focus();
  loop();
}

main().catch((error) => fail(`the page failed: ${error.message || error}`));
