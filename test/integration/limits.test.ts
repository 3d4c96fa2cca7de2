/**
 * Request limits at the edge: WebSocket message size, sockets per address and
 * unauthenticated time; aliases, tokens and mutations per request; the per-project
 * mutation rate. Real service, real `ws` sockets and raw TCP.
 */
import net from "node:net";
import WebSocket from "ws";
import { ConfigError, loadConfig } from "../../src/config";
import { startTestService, type TestService } from "../helpers/service";

const wsUrl = (svc: TestService) => svc.url.replace(/^http/, "ws") + "/graphql";

/** A graphql-ws socket, open; `close` resolves with the code the server closed it with. */
async function openSocket(svc: TestService) {
  const ws = new WebSocket(wsUrl(svc), "graphql-transport-ws");
  const closed = new Promise<{ code: number; reason: string; at: number }>((resolve) => ws.on("close", (code, reason) => resolve({ code, reason: String(reason), at: Date.now() })));
  const messages: any[] = [];
  ws.on("message", (data) => messages.push(JSON.parse(String(data))));
  ws.on("error", () => {}); // the close event says what happened
  await new Promise<void>((resolve, reject) => {
    ws.once("open", () => resolve());
    ws.once("close", (code) => reject(new Error(`closed with ${code} before opening`)));
  });
  const close = async () => {
    ws.close();
    await closed;
  };
  return { ws, closed, messages, close };
}

async function initSocket(svc: TestService, key = svc.keys.alpha) {
  const s = await openSocket(svc);
  s.ws.send(JSON.stringify({ type: "connection_init", payload: { authorization: `Bearer ${key}` } }));
  await waitFor(() => s.messages.some((m) => m.type === "connection_ack"));
  return s;
}

async function waitFor(cond: () => boolean, ms = 5000) {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error("condition not met in time");
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Runs one operation over an initialised socket and resolves with the server's next/error messages for it. */
async function runOver(s: Awaited<ReturnType<typeof initSocket>>, id: string, query: string) {
  s.ws.send(JSON.stringify({ id, type: "subscribe", payload: { query } }));
  await waitFor(() => s.messages.some((m) => m.id === id && (m.type === "complete" || m.type === "error")));
  return s.messages.filter((m) => m.id === id);
}

const aliases = (n: number, field = "viewer { name }") => `{ ${Array.from({ length: n }, (_, i) => `a${i}: ${field}`).join(" ")} }`;
const createDisks = (n: number, prefix: string) =>
  `mutation { ${Array.from({ length: n }, (_, i) => `d${i}: createDisk(input: { name: "${prefix}-${i}", sizeBytes: 1048576 }) { disk { id } }`).join(" ")} }`;

describe("WebSocket limits (WS_MAX_CONNECTIONS_PER_ADDRESS=3, WS_AUTH_TIMEOUT_SECONDS=1)", () => {
  let svc: TestService;
  beforeAll(async () => {
    svc = await startTestService({ WS_MAX_CONNECTIONS_PER_ADDRESS: "3", WS_AUTH_TIMEOUT_SECONDS: "1" });
  });
  afterAll(async () => {
    await svc?.stop();
  });

  it("closes a socket sending a message past WS_MAX_PAYLOAD_BYTES (64 KiB) with 1009, and takes one just under it", async () => {
    expect(svc.config.wsMaxPayloadBytes).toBe(64 * 1024);
    const s = await initSocket(svc);
    // A comment pads the document: 60 KiB that the parser skips.
    const padded = `{ viewer { name } }\n#${"x".repeat(60 * 1024)}`;
    expect((await runOver(s, "small", padded)).find((m) => m.type === "next")?.payload).toEqual({ data: { viewer: { name: "alpha" } } });
    s.ws.send(JSON.stringify({ id: "big", type: "subscribe", payload: { query: `{ viewer { name } }\n#${"x".repeat(2 ** 20)}` } }));
    expect((await s.closed).code).toBe(1009);
    expect(s.messages.some((m) => m.id === "big")).toBe(false);
  });

  it("refuses an oversized frame from its header, without waiting for (or buffering) its bytes", async () => {
    const port = Number(new URL(svc.url).port);
    const sock = net.connect(port, "127.0.0.1");
    const received: Buffer[] = [];
    sock.on("data", (d) => received.push(d));
    await new Promise<void>((r) => sock.once("connect", () => r()));
    sock.write(
      "GET /graphql HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: graphql-transport-ws\r\n\r\n",
    );
    await waitFor(() => Buffer.concat(received).includes("\r\n\r\n"));
    expect(Buffer.concat(received).toString("latin1")).toMatch(/^HTTP\/1.1 101/);
    const afterHandshake = Buffer.concat(received).length;
    // A masked text frame announcing 32 MiB (under ws' own default of 100 MiB), followed by a few bytes of it only.
    const header = Buffer.alloc(14);
    header[0] = 0x81;
    header[1] = 0x80 | 127;
    header.writeBigUInt64BE(32n * 2n ** 20n, 2);
    sock.write(Buffer.concat([header, Buffer.from("payload")]));
    const started = Date.now();
    await waitFor(() => Buffer.concat(received).length >= afterHandshake + 4, 2000);
    const frame = Buffer.concat(received).subarray(afterHandshake);
    expect(frame[0]).toBe(0x88); // a close frame
    expect(frame.readUInt16BE(2)).toBe(1009);
    expect(Date.now() - started).toBeLessThan(1000);
    sock.destroy();
  });

  it("closes the socket past WS_MAX_CONNECTIONS_PER_ADDRESS with 1013, and takes a new one when one closes", async () => {
    const open = [await openSocket(svc), await initSocket(svc), await openSocket(svc)];
    try {
      const extra = await openSocket(svc);
      const { code, reason } = await extra.closed;
      expect(code).toBe(1013);
      expect(reason).toMatch(/too many connections/);
      await open.shift()!.close();
      await new Promise((r) => setTimeout(r, 100)); // the server sees the close
      const again = await initSocket(svc);
      expect((await runOver(again, "q", "{ viewer { name } }")).find((m) => m.type === "next")?.payload).toEqual({ data: { viewer: { name: "alpha" } } });
      await again.close();
    } finally {
      await Promise.all(open.map((s) => s.close()));
    }
  });

  it("closes a socket that has not sent connection_init within WS_AUTH_TIMEOUT_SECONDS (4408), and keeps one that did", async () => {
    const idle = await openSocket(svc);
    const opened = Date.now();
    const authed = await initSocket(svc);
    try {
      const { code, at } = await idle.closed;
      expect(code).toBe(4408);
      expect(at - opened).toBeGreaterThanOrEqual(900);
      expect(at - opened).toBeLessThan(3000);
      await new Promise((r) => setTimeout(r, 500));
      expect(authed.ws.readyState).toBe(WebSocket.OPEN);
    } finally {
      await authed.close();
    }
  });
});

describe("query limits with the default configuration", () => {
  let svc: TestService;
  beforeAll(async () => {
    svc = await startTestService();
  });
  afterAll(async () => {
    await svc?.stop();
  });

  it("refuses more than MAX_QUERY_ALIASES (200) aliased fields with QUERY_TOO_COMPLEX before running any", async () => {
    expect(Object.keys(await svc.ok(aliases(200)))).toHaveLength(200);
    const started = Date.now();
    const r = await svc.gql(aliases(1000));
    expect(Date.now() - started).toBeLessThan(2000); // about 150 ms of validation; the bound leaves room for a busy machine
    expect(r.status).toBe(400);
    expect(r.data).toBeUndefined();
    expect(r.errors?.[0].extensions?.code).toBe("QUERY_TOO_COMPLEX");
    expect(r.errors?.[0].message).toBe("1000 aliased fields exceed the limit of 200");
    // Aliases inside a fragment count wherever it is spread.
    const names = Array.from({ length: 67 }, (_, i) => `n${i}: name`).join(" ");
    const spread = await svc.gql(`{ a: viewer { ...F } b: viewer { ...F } c: viewer { ...F } } fragment F on Project { ${names} }`);
    expect(spread.errors?.[0].message).toBe("204 aliased fields exceed the limit of 200");
    expect(spread.errors?.[0].extensions?.code).toBe("QUERY_TOO_COMPLEX");
  });

  it("stops parsing a huge document at MAX_QUERY_TOKENS (10000), fast, with QUERY_TOO_COMPLEX", async () => {
    const started = Date.now();
    const r = await svc.gql(aliases(12_000));
    expect(Date.now() - started).toBeLessThan(2000); // the parser stops at the limit: about 200 ms, against 4 s to run it all
    expect(r.status).toBe(400);
    expect(r.errors?.[0].extensions?.code).toBe("QUERY_TOO_COMPLEX");
    expect(r.errors?.[0].message).toMatch(/more th(?:an|at) 10000 tokens/);
    const ws = await initSocket(svc);
    try {
      // Over the socket too (a shorter document: messages are at most 64 KiB).
      const [msg] = await runOver(ws, "huge", aliases(3000, "__typename"));
      expect(msg.type).toBe("error");
      expect(msg.payload[0].extensions.code).toBe("QUERY_TOO_COMPLEX");
    } finally {
      await ws.close();
    }
  });

  it("refuses a POST body past 1 MiB with 413, and keeps GET query strings to Node's 16 KiB header limit (431); GET documents are limited as POST ones", async () => {
    const big = await svc.http("/graphql", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ query: `{ viewer { name } }\n#${"x".repeat(2 ** 20)}` }) });
    expect(big.status).toBe(413);
    expect(((await big.json()) as any).errors[0].extensions.code).toBe("BAD_REQUEST");
    const huge = await svc.http(`/graphql?query=${encodeURIComponent(aliases(2000))}`);
    expect(huge.status).toBe(431);
    const res = await svc.http(`/graphql?query=${encodeURIComponent(aliases(300, "__typename"))}`, { headers: { "apollo-require-preflight": "1" } });
    const body = (await res.json()) as any;
    expect(res.status).toBe(400);
    expect(body.errors[0].extensions.code).toBe("QUERY_TOO_COMPLEX");
  });

  it("refuses more than MAX_MUTATIONS_PER_REQUEST (10) mutations in one request, running none of them", async () => {
    const r = await svc.gql(createDisks(11, "eleven"));
    expect(r.status).toBe(400);
    expect(r.data).toBeUndefined();
    expect(r.errors?.[0].extensions?.code).toBe("QUERY_TOO_COMPLEX");
    expect(r.errors?.[0].message).toBe("11 mutations in one request exceed the limit of 10; send them in several requests");
    // Mutations in fragments count too.
    const inFragments = await svc.gql(
      `mutation { ...A ... on Mutation { ...B } } fragment A on Mutation { ${createDisks(6, "a").slice(11, -2)} } fragment B on Mutation { ${createDisks(6, "b")
        .slice(11, -2)
        .replace(/\bd(\d)/g, "e$1")} }`,
    );
    expect(inFragments.errors?.[0].message).toMatch(/^12 mutations in one request/);
    expect((await svc.ok("{ disks { totalCount } }")).disks.totalCount).toBe(0);
    const ten = await svc.ok(createDisks(10, "ten"));
    expect(Object.keys(ten)).toHaveLength(10);
    expect((await svc.ok("{ disks { totalCount } }")).disks.totalCount).toBe(10);
  });
});

describe("mutation rate limit (MUTATIONS_PER_MINUTE=6, MUTATION_BURST=3)", () => {
  // A token every 10 s: the steps below take far less, even on a busy machine, so no token comes back between them.
  let svc: TestService;
  beforeAll(async () => {
    svc = await startTestService({ MUTATIONS_PER_MINUTE: "6", MUTATION_BURST: "3", MAX_MUTATIONS_PER_REQUEST: "2" });
  });
  afterAll(async () => {
    await svc?.stop();
  });

  const inRange = (n: unknown, lo: number, hi: number) => {
    expect(typeof n).toBe("number");
    expect(n).toBeGreaterThanOrEqual(lo);
    expect(n).toBeLessThanOrEqual(hi);
    return n as number;
  };

  it("answers RATE_LIMITED (429, Retry-After) once a project's bucket is empty, only for that project and only for mutations, and recovers", async () => {
    expect(Object.keys(await svc.ok(createDisks(2, "first")))).toHaveLength(2);
    expect(Object.keys(await svc.ok(createDisks(1, "second")))).toHaveLength(1);
    const res = await svc.http("/graphql", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ query: createDisks(1, "third") }) });
    const body = (await res.json()) as any;
    expect(res.status).toBe(429);
    expect(body.data).toBeUndefined();
    expect(body.errors).toHaveLength(1);
    const retry = inRange(body.errors[0].extensions.retryAfterSeconds, 1, 10);
    expect(res.headers.get("retry-after")).toBe(String(retry));
    expect(body.errors[0]).toEqual({ message: `this project sent more than 6 mutations a minute (bursts of 3); retry in ${retry} s`, extensions: { code: "RATE_LIMITED", retryAfterSeconds: retry } });
    // Queries go on, another project's mutations too, and the refused mutation did nothing.
    expect((await svc.ok("{ disks { totalCount } }")).disks.totalCount).toBe(3);
    expect(Object.keys(await svc.ok(createDisks(2, "beta"), undefined, svc.keys.beta))).toHaveLength(2);
    // Over graphql-ws as well.
    const ws = await initSocket(svc);
    let wait: number;
    try {
      const [msg] = await runOver(ws, "m", createDisks(1, "ws"));
      expect(msg.type).toBe("error");
      expect(msg.payload[0].extensions.code).toBe("RATE_LIMITED");
      wait = inRange(msg.payload[0].extensions.retryAfterSeconds, 1, retry);
    } finally {
      await ws.close();
    }
    // Retry-After is enough.
    await new Promise((r) => setTimeout(r, wait * 1000 + 100));
    expect(Object.keys(await svc.ok(createDisks(1, "later")))).toHaveLength(1);
    // Two need two tokens' worth once the bucket is empty again: more than one token's 10 s.
    const two = await svc.gql(createDisks(2, "two"));
    expect(two.errors?.[0].extensions?.code).toBe("RATE_LIMITED");
    inRange(two.errors?.[0].extensions?.retryAfterSeconds, 11, 20);
    expect((await svc.ok("{ disks { totalCount } }")).disks.totalCount).toBe(4);
  });
});

describe("WebSocket upgrades elsewhere", () => {
  let svc: TestService;
  beforeAll(async () => {
    svc = await startTestService();
  });
  afterAll(async () => {
    await svc?.stop();
  });

  it("refuses an upgrade on another path, or with a URL no parser takes, with 400 and keeps serving", async () => {
    const port = Number(new URL(svc.url).port);
    for (const target of ["/other", "//x:99999/graphql", "/graphql/"]) {
      const sock = net.connect(port, "127.0.0.1");
      const received: Buffer[] = [];
      sock.on("data", (d) => received.push(d));
      const ended = new Promise<void>((r) => sock.on("close", () => r()));
      sock.write(`GET ${target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n`);
      await ended;
      expect([target, Buffer.concat(received).toString("latin1").split("\r\n")[0]]).toEqual([target, "HTTP/1.1 400 Bad Request"]);
    }
    expect(await svc.ok("{ viewer { name } }")).toEqual({ viewer: { name: "alpha" } });
  });
});

describe("limit configuration", () => {
  it("refuses a mutation burst smaller than the mutations one request may run, which could then never run", () => {
    expect(() => loadConfig({ MAX_MUTATIONS_PER_REQUEST: "20", MUTATION_BURST: "10" })).toThrow(new ConfigError("MUTATION_BURST (10) must be at least MAX_MUTATIONS_PER_REQUEST (20)"));
    expect(loadConfig({ MAX_MUTATIONS_PER_REQUEST: "20", MUTATION_BURST: "10", MUTATIONS_PER_MINUTE: "0" }).mutationsPerMinute).toBe(0);
    expect(loadConfig({ MAX_MUTATIONS_PER_REQUEST: "200" }).mutationBurst).toBe(200);
    expect(() => loadConfig({ WS_MAX_PAYLOAD_BYTES: "10" })).toThrow(/WS_MAX_PAYLOAD_BYTES must be an integer between 1024 and/);
  });
});
