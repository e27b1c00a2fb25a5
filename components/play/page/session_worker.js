// One ONNX Runtime Web session in a Web Worker (components/play/page/web_player.js). The page runs the world model
// in one worker and the decoder in another, so that the next prediction and the last frame's decode use two cores
// at once, as the Python player's GameState.advance does with two threads.
// Messages: {id, type: "load", ortUrl, wasmPaths, threads, bytes, options} -> {id, ok}
//           {id, type: "run", feeds: {name: {type, data, dims}}} -> {id, ok, outputs: {name: {type, data, dims}}}
// A failure answers {id, ok: false, error}. Messages are handled one after the other (one session run at a time).
"use strict";

let ort = null;
let session = null;
let queue = Promise.resolve();

async function handle(message) {
  if (message.type === "load") {
    ort = await import(message.ortUrl);
    ort.env.wasm.wasmPaths = message.wasmPaths;
    ort.env.wasm.numThreads = message.threads;
    session = await ort.InferenceSession.create(message.bytes, message.options);
    return {};
  }
  const feeds = {};
  for (const [name, tensor] of Object.entries(message.feeds)) {
    feeds[name] = new ort.Tensor(tensor.type, tensor.data, tensor.dims);
  }
  const results = await session.run(feeds);
  const outputs = {};
  for (const [name, tensor] of Object.entries(results)) {
    outputs[name] = { type: tensor.type, data: tensor.data, dims: tensor.dims };
  }
  return { outputs };
}

self.onmessage = ({ data }) => {
  queue = queue.then(async () => {
    try {
      const answer = await handle(data);
      const buffers = answer.outputs ? Object.values(answer.outputs).map((t) => t.data.buffer) : [];
      self.postMessage({ id: data.id, ok: true, ...answer }, buffers);
    } catch (error) {
      self.postMessage({ id: data.id, ok: false, error: String((error && error.message) || error) });
    }
  });
};
