// Ferry driven by @grpc/grpc-js, an independent gRPC implementation (pure JavaScript HTTP/2 on Node's http2).
// Run by tests/integration/test_interop.py: node client.js HOST:PORT TRACE_ID
// Prints one JSON object per scenario, one per line: {"scenario": NAME, ...what it saw} or {"scenario", "error"}.
// The model `slow` holds a call for its 2 s batching window, so deadlines and cancellation find it in flight.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [address, traceId] = process.argv.slice(2);
const OPTIONS = { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true };
const PROTOS = path.resolve(__dirname, '..', '..', 'protos');
const { inference } = grpc.loadPackageDefinition(
  protoLoader.loadSync('grpc_service.proto', { ...OPTIONS, includeDirs: [PROTOS] }),
);
const { health } = grpc.loadPackageDefinition(protoLoader.loadSync(path.join(__dirname, 'health.proto'), OPTIONS)).grpc;

const CALL_MS = 10000; // every call has a deadline: a hung call fails its scenario, it never hangs the test
const SLOW_MS = 200; // how long the deadline and cancellation scenarios let a call run
const WINDOW_DEADLINE_MS = 1000; // half slow's window

const credentials = grpc.credentials.createInsecure();
const client = new inference.GRPCInferenceService(address, credentials);
const healthClient = new health.v1.Health(address, credentials);
const GZIP = 2; // grpc-js's compression algorithm numbers: 0 identity, 1 deflate, 2 gzip
const gzipClient = new inference.GRPCInferenceService(address, credentials, {
  'grpc.default_compression_algorithm': GZIP,
});

function floats(buffer) {
  return Array.from({ length: buffer.length / 4 }, (_, i) => buffer.readFloatLE(4 * i));
}

// A request whose FP32 inputs (each of `names`), `rows` x `cols`, hold element i = (i % 7) * 0.1 + seed (the test
// computes the same).
function inferRequest(model, { id = '', rows = 1, cols = 16, seed = 0, names = ['input'] } = {}) {
  const values = Buffer.from(Float32Array.from({ length: rows * cols }, (_, i) => ((i % 7) * 0.1) + seed).buffer);
  return {
    model_name: model,
    id,
    inputs: names.map((name) => ({ name, datatype: 'FP32', shape: [rows, cols] })),
    raw_input_contents: names.map(() => values),
  };
}

function summary(response) {
  return {
    id: response.id,
    model_name: response.model_name,
    outputs: response.outputs.map(({ name, datatype, shape }) => ({ name, datatype, shape })),
    values: floats(response.raw_output_contents[0]),
  };
}

// A unary call as a promise of {code, details, response, elapsed_ms}; `call` receives the call object.
function unary(stub, method, request, { metadata = new grpc.Metadata(), ms = CALL_MS, call = () => {} } = {}) {
  const started = Date.now();
  return new Promise((resolve) => {
    call(
      stub[method](request, metadata, { deadline: Date.now() + ms }, (error, response) => {
        const elapsed_ms = Date.now() - started;
        resolve(error ? { code: error.code, details: error.details, elapsed_ms } : { code: 0, response, elapsed_ms });
      }),
    );
  });
}

const scenarios = {
  async unary() {
    const { code, details, response } = await unary(client, 'ModelInfer', inferRequest('tiny', { id: 'unary-1' }));
    return code === 0 ? summary(response) : { code, details };
  },

  // 512 KiB each way (two tensors of 256 KiB), eight times HTTP/2's initial flow-control window: both sides must
  // wait for, and send, WINDOW_UPDATEs. Reported as each output's byte length and the sum of its values.
  async large() {
    const request = inferRequest('add', { cols: 1 << 16, names: ['a', 'b'] });
    const { code, details, response } = await unary(client, 'ModelInfer', request);
    if (code !== 0) return { code, details };
    const raw = response.raw_output_contents;
    return {
      outputs: response.outputs.map(({ name, datatype, shape }) => ({ name, datatype, shape })),
      bytes: raw.map((buffer) => buffer.length),
      sums: raw.map((buffer) => floats(buffer).reduce((sum, value) => sum + value, 0)),
    };
  },

  // Many calls at once on one channel: one HTTP/2 stream each, multiplexed on one connection (and batched).
  async concurrent() {
    const calls = Array.from({ length: 32 }, (_, seed) =>
      unary(client, 'ModelInfer', inferRequest('tiny', { id: `concurrent-${seed}`, seed })),
    );
    const results = await Promise.all(calls);
    return { responses: results.map(({ code, details, response }) => (code ? { code, details } : summary(response))) };
  },

  // The request message gzip-compressed (grpc-encoding: gzip, compressed flag set).
  async gzip() {
    const request = inferRequest('tiny', { id: 'gzip-1' });
    const { code, details, response } = await unary(gzipClient, 'ModelInfer', request);
    return code === 0 ? summary(response) : { code, details };
  },

  // traceparent (read by the server's tracing) and a binary header, which gRPC carries base64-encoded.
  async metadata() {
    const metadata = new grpc.Metadata();
    metadata.set('traceparent', `00-${traceId}-b7ad6b7169203331-01`);
    metadata.set('x-interop-bin', Buffer.from([0, 1, 0xfe, 0xff]));
    const { code, details } = await unary(client, 'ModelInfer', inferRequest('tiny'), { metadata });
    return { code, details };
  },

  // Several requests on one bidi stream, one of them for a model that does not exist: the stream goes on.
  stream() {
    return new Promise((resolve) => {
      const responses = [];
      const call = client.ModelStreamInfer(new grpc.Metadata(), { deadline: Date.now() + CALL_MS });
      call.on('data', ({ error_message, infer_response }) =>
        responses.push(error_message ? { error_message } : summary(infer_response)),
      );
      call.on('error', () => {}); // the status event below reports it
      call.on('status', ({ code, details }) => resolve({ code, details, responses }));
      for (let seed = 0; seed < 8; seed++) {
        call.write(inferRequest('tiny', { id: `stream-${seed}`, seed }));
      }
      call.write(inferRequest('no-such-model', { id: 'stream-unknown' }));
      call.end();
    });
  },

  // A stream the client leaves open cannot finish: its deadline ends it, whichever side's timer fires first.
  async deadline() {
    const started = Date.now();
    const expired = await new Promise((resolve) => {
      const ids = [];
      const call = client.ModelStreamInfer(new grpc.Metadata(), { deadline: Date.now() + SLOW_MS });
      call.on('data', ({ infer_response }) => ids.push(infer_response.id));
      call.on('error', () => {});
      call.on('status', ({ code, details }) => resolve({ code, details, ids, elapsed_ms: Date.now() - started }));
      call.write(inferRequest('tiny', { id: 'before-deadline' }));
    });
    const after = await unary(client, 'ModelInfer', inferRequest('tiny'));
    return { ...expired, after: after.code };
  },

  // grpc-js's grpc-timeout reaches the batcher, which closes slow's 2 s window early to answer within the deadline
  // (the test reads the server's span of this call, found by its parent span id).
  async deadline_window() {
    const metadata = new grpc.Metadata();
    metadata.set('traceparent', `00-${traceId}-00f067aa0ba902b7-01`);
    const options = { metadata, ms: WINDOW_DEADLINE_MS };
    const { code, details, elapsed_ms } = await unary(client, 'ModelInfer', inferRequest('slow'), options);
    return { code, details, elapsed_ms };
  },

  // The server should let go of the call at once, not hold it for slow's window (the test reads its span).
  async cancel() {
    const metadata = new grpc.Metadata();
    metadata.set('traceparent', `00-${traceId}-53995c3f42cd8ad8-01`);
    const cancelled = await unary(client, 'ModelInfer', inferRequest('slow'), {
      metadata,
      call: (call) => setTimeout(() => call.cancel(), SLOW_MS),
    });
    const after = await unary(client, 'ModelInfer', inferRequest('tiny')); // the same channel
    return { code: cancelled.code, elapsed_ms: cancelled.elapsed_ms, after: after.code };
  },

  async error() {
    const { code, details } = await unary(client, 'ModelInfer', inferRequest('no-such-model'));
    return { code, details };
  },

  async health() {
    const status = async (service) => {
      const { code, response } = await unary(healthClient, 'Check', { service });
      return code === 0 ? response.status : code;
    };
    return { server: await status(''), tiny: await status('tiny'), unknown: await status('no-such-model') };
  },
};

async function main() {
  for (const [scenario, run] of Object.entries(scenarios)) {
    let result;
    try {
      result = await run();
    } catch (error) {
      result = { error: String(error && error.stack ? error.stack : error) };
    }
    process.stdout.write(`${JSON.stringify({ scenario, ...result })}\n`);
  }
  client.close();
  gzipClient.close();
  healthClient.close();
}

main().then(
  () => process.exit(0),
  (error) => {
    process.stderr.write(`${error.stack}\n`);
    process.exit(1);
  },
);
