// `make demo`'s client: the TypeScript SDK (@wsrelay/client, built into clients/js/dist by
// `make sdk`) used from Node as an application would. It gets a JWT from getToken (signed here
// with the gateway's HS256 key, standing in for the app's token endpoint), connects through the
// gateway's Service, subscribes to a channel, publishes a few messages on the NATS subject
// behind it and prints each one as it arrives, with its NATS-to-client time; then publishes
// from the client on a `Both` channel and prints the relay's ack. Every wait is bounded.
//
//   node e2e/demo-client.mjs --url ws://10.96.x.y:80/ws --hmac-key KEY --nats nats://127.0.0.1:14222 \
//     --issuer https://auth.example.com --audience chat --user alice \
//     --channel notifications --subject users.alice.notify --count 5 [--publish-channel rooms.lobby]
//
// Node 22 has a global WebSocket; Node 20 needs `--experimental-websocket` (demo.sh passes it).
// An application imports the package by name: import { Client } from "@wsrelay/client".
import { createHmac } from "node:crypto";
import { connect } from "node:net";
import { parseArgs } from "node:util";
import { Client } from "../clients/js/dist/esm/index.js";

const { values: a } = parseArgs({
  options: {
    url: { type: "string" },
    "hmac-key": { type: "string" },
    nats: { type: "string", default: "nats://127.0.0.1:14222" },
    issuer: { type: "string" },
    audience: { type: "string" },
    user: { type: "string", default: "alice" },
    channel: { type: "string", default: "notifications" },
    subject: { type: "string" },
    count: { type: "string", default: "5" },
    "publish-channel": { type: "string" },
  },
});
for (const k of ["url", "hmac-key", "subject"]) if (!a[k]) throw new Error(`--${k} is required`);
if (typeof WebSocket !== "function") throw new Error("no global WebSocket: run node 22, or node 20 with --experimental-websocket");
const count = Number(a.count);

const fail = (msg) => {
  console.error(`demo client: ${msg}`);
  process.exit(1);
};
const deadline = setTimeout(() => fail("did not finish within 60 s"), 60_000);

// ---- the app's token endpoint, in miniature ----
const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
function signToken() {
  const now = Math.floor(Date.now() / 1000);
  const claims = { sub: a.user, iat: now, exp: now + 600, ...(a.issuer && { iss: a.issuer }), ...(a.audience && { aud: a.audience }) };
  const unsigned = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${unsigned}.${createHmac("sha256", a["hmac-key"]).update(unsigned).digest("base64url")}`;
}

// ---- a backend publishing on NATS (the protocol is text: CONNECT, PUB, PING/PONG) ----
async function natsPublisher(url) {
  const u = new URL(url);
  const sock = connect(Number(u.port || 4222), u.hostname);
  // Nagle's algorithm would hold a write back until the server ACKs the one before (a delayed
  // ACK: ~40 ms), and the demo would print that as the relay's latency. Real NATS clients
  // disable it too.
  sock.setNoDelay(true);
  await new Promise((ok, err) => (sock.once("connect", ok), sock.once("error", err)));
  const pongs = [];
  let buf = "";
  sock.setEncoding("utf8");
  sock.on("data", (d) => {
    buf += d;
    let i;
    while ((i = buf.indexOf("\r\n")) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 2);
      if (line === "PING") sock.write("PONG\r\n");
      else if (line === "PONG") pongs.shift()?.();
      else if (line.startsWith("-ERR")) fail(`NATS: ${line}`);
    }
  });
  sock.write('CONNECT {"verbose":false,"pedantic":false,"name":"wsrelay-demo"}\r\n');
  return {
    publish(subject, obj) {
      const body = Buffer.from(JSON.stringify(obj));
      // One write: PUB, its payload and the PING that confirms it leave in one segment.
      const frame = Buffer.concat([Buffer.from(`PUB ${subject} ${body.length}\r\n`), body, Buffer.from("\r\nPING\r\n")]);
      return new Promise((ok) => (pongs.push(ok), sock.write(frame)));
    },
    close: () => sock.destroy(),
  };
}

// ---- the SDK ----
const client = new Client({ url: a.url, getToken: async () => signToken() });
client.on("connecting", (e) => console.log(`connecting (${e.reason}, attempt ${e.attempt})`));
client.on("connected", (e) => console.log(`connected to ${a.url} over ${e.transport}, protocol ${e.protocol}, max message ${e.maxMessageBytes} bytes`));
client.on("disconnected", (e) => console.log(`disconnected: ${e.code} ${e.reason}${e.willReconnect ? " (reconnecting)" : ""}`));
client.on("error", (e) => console.log(`error (${e.kind}): ${e.error?.message ?? e.message ?? ""}`));

let received = 0;
let done;
const allReceived = new Promise((r) => (done = r));
const sub = client.subscribe(a.channel, {
  onMessage: (m) => {
    received += 1;
    const took = typeof m.data?.sentAtMs === "number" ? `, NATS -> relay pod -> client in ${Date.now() - m.data.sentAtMs} ms` : "";
    console.log(`< message ${received} on ${m.channel}: ${JSON.stringify(m.data)}${took}`);
    if (received >= count) done();
  },
});
const subscribed = new Promise((r) => sub.once("subscribed", r));
sub.on("unsubscribed", (e) => fail(`the relay ended the subscription: ${JSON.stringify(e)}`));
client.connect();

await subscribed;
console.log(`subscribed to ${a.channel} (channel -> NATS subject ${a.subject} for ${a.user})`);
const nats = await natsPublisher(a.nats);
console.log(`publishing ${count} messages on NATS subject ${a.subject}, one every 500 ms`);
for (let n = 1; n <= count; n++) {
  await nats.publish(a.subject, { n, sentAtMs: Date.now() });
  await new Promise((r) => setTimeout(r, 500));
}
await allReceived;
console.log(`received all ${count} messages`);

if (a["publish-channel"]) {
  const result = await client.publish(a["publish-channel"], { from: a.user, text: "hello from the SDK" });
  console.log(`published on ${a["publish-channel"]} from the client: the relay acknowledged it (${JSON.stringify(result ?? {})})`);
}
nats.close();
client.disconnect();
clearTimeout(deadline);
