// A minimal WebSocket server (RFC 6455: handshake, unfragmented text frames, close, ping) for
// the scripted-relay tests: it speaks the protocol extensions the relay does not serve yet
// (resume positions, `unsubscribed` with a reason, named `dropped`, in-band `refresh`, 4401 /
// 4403 closes after the upgrade), so the SDK's handling of them runs in a real browser.
// Loopback only. Each accepted connection is handed to the test as a ScriptedConn.
import { createHash } from "node:crypto";
import { createServer } from "node:http";

const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

function encodeFrame(opcode, payload) {
  const len = payload.length;
  let head;
  if (len < 126) head = Buffer.from([0x80 | opcode, len]);
  else if (len < 65536) {
    head = Buffer.alloc(4);
    head[0] = 0x80 | opcode;
    head[1] = 126;
    head.writeUInt16BE(len, 2);
  } else {
    head = Buffer.alloc(10);
    head[0] = 0x80 | opcode;
    head[1] = 127;
    head.writeBigUInt64BE(BigInt(len), 2);
  }
  return Buffer.concat([head, payload]);
}

export class ScriptedConn {
  constructor(socket, req, protocols) {
    this.socket = socket;
    this.protocols = protocols;
    this.token = protocols.find((p) => p.startsWith("bearer."))?.slice("bearer.".length);
    this.frames = [];
    this.closed = false;
    this.waiters = [];
    let buf = Buffer.alloc(0);
    socket.on("data", (d) => {
      buf = Buffer.concat([buf, d]);
      for (;;) {
        if (buf.length < 2) return;
        const opcode = buf[0] & 0x0f;
        let len = buf[1] & 0x7f;
        let off = 2;
        if (len === 126) {
          if (buf.length < 4) return;
          len = buf.readUInt16BE(2);
          off = 4;
        } else if (len === 127) {
          if (buf.length < 10) return;
          len = Number(buf.readBigUInt64BE(2));
          off = 10;
        }
        const masked = (buf[1] & 0x80) !== 0;
        const maskOff = off;
        if (masked) off += 4;
        if (buf.length < off + len) return;
        const payload = Buffer.from(buf.subarray(off, off + len));
        if (masked) for (let i = 0; i < len; i++) payload[i] ^= buf[maskOff + (i % 4)];
        buf = buf.subarray(off + len);
        if (opcode === 1) {
          this.frames.push(JSON.parse(payload.toString("utf8")));
          this.wake();
        } else if (opcode === 8) {
          if (!this.closed) this.rawClose(payload);
        } else if (opcode === 9) {
          socket.write(encodeFrame(10, payload));
        }
      }
    });
    socket.on("close", () => {
      this.closed = true;
      this.wake();
    });
    socket.on("error", () => {});
  }

  wake() {
    for (const w of this.waiters.splice(0)) w();
  }

  send(frame) {
    if (!this.closed) this.socket.write(encodeFrame(1, Buffer.from(JSON.stringify(frame))));
  }

  welcome(extra = {}) {
    this.send({ type: "welcome", protocol: "wsrelay.v1", maxMessageBytes: 65536, anonymous: false, ...extra });
  }

  rawClose(payload) {
    this.closed = true;
    this.socket.write(encodeFrame(8, payload));
    this.socket.end();
  }

  close(code, reason = "") {
    const r = Buffer.from(reason);
    const p = Buffer.alloc(2 + r.length);
    p.writeUInt16BE(code, 0);
    r.copy(p, 2);
    this.rawClose(p);
  }

  /** Waits (bounded) for the next client frame matching `pred` that was not taken before. */
  async next(pred, ms = 10_000) {
    const deadline = Date.now() + ms;
    this.taken ??= new Set();
    for (;;) {
      const i = this.frames.findIndex((f, i) => !this.taken.has(i) && pred(f));
      if (i >= 0) {
        this.taken.add(i);
        return this.frames[i];
      }
      if (this.closed) throw new Error("connection closed while waiting for a frame");
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no matching frame within ${ms} ms; got ${JSON.stringify(this.frames)}`);
      await new Promise((r) => {
        const t = setTimeout(r, left);
        this.waiters.push(() => (clearTimeout(t), r()));
      });
    }
  }

  nextOfType(type, ms) {
    return this.next((f) => f.type === type, ms);
  }
}

/** Starts the server; `accept()` resolves with the next connection (bounded). */
export async function startScriptedRelay() {
  const pending = [];
  const waiting = [];
  const sockets = new Set();
  const srv = createServer((req, res) => {
    res.writeHead(426);
    res.end();
  });
  srv.on("upgrade", (req, socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
    const key = req.headers["sec-websocket-key"];
    const protocols = String(req.headers["sec-websocket-protocol"] ?? "")
      .split(",")
      .map((s) => s.trim())
      .filter(Boolean);
    const accept = createHash("sha1").update(key + GUID).digest("base64");
    const lines = [
      "HTTP/1.1 101 Switching Protocols",
      "Upgrade: websocket",
      "Connection: Upgrade",
      `Sec-WebSocket-Accept: ${accept}`,
    ];
    if (protocols.includes("wsrelay.v1")) lines.push("Sec-WebSocket-Protocol: wsrelay.v1");
    socket.write(lines.join("\r\n") + "\r\n\r\n");
    const conn = new ScriptedConn(socket, req, protocols);
    const w = waiting.shift();
    if (w) w(conn);
    else pending.push(conn);
  });
  await new Promise((r) => srv.listen(0, "127.0.0.1", r));
  const { port } = srv.address();
  return {
    url: `ws://127.0.0.1:${port}/ws`,
    connections: () => pending.length,
    accept(ms = 10_000) {
      const c = pending.shift();
      if (c) return Promise.resolve(c);
      return new Promise((resolve, reject) => {
        const w = (conn) => (clearTimeout(t), resolve(conn));
        const t = setTimeout(() => {
          waiting.splice(waiting.indexOf(w), 1);
          reject(new Error(`no connection within ${ms} ms`));
        }, ms);
        waiting.push(w);
      });
    },
    close() {
      for (const s of sockets) s.destroy();
      srv.close();
    },
  };
}
