import crypto from "node:crypto";
import { getIntrospectionQuery } from "graphql";
import { auditServer } from "graphql-http";
import { createClient, type Client, type ExecutionResult } from "graphql-ws";
import WebSocket from "ws";
import { startTestService, type TestService } from "../helpers/service";

const COSTLY = "query Costly { servers(first: 100) { nodes { disks(first: 100) { nodes { id } } } } }";
const COSTLY_BY_VARIABLE = "query CostlyVar($n: Int) { servers(first: $n) { nodes { disks(first: $n) { nodes { id } } } } }";
/** A short document that asks for the whole schema many times over under aliases. */
function introspectionFlood(copies: number): string {
  const aliases = Array.from({ length: copies }, (_, i) => `s${i}: __schema { ...S }`).join(" ");
  return `query Flood { ${aliases} } fragment S on __Schema { types { name fields { name args { name type { name ofType { name } } } type { name ofType { name } } } } }`;
}

/** The same trick on API fields: cheap to send, ruinous to walk without memoising fragments. */
function fragmentBomb(levels: number): string {
  const fragments = ["fragment S0 on Server { id }"];
  for (let i = 1; i <= levels; i++) fragments.push(`fragment S${i} on Server { disks(first: 1) { nodes { server { ...S${i - 1} ...S${i - 1} ...S${i - 1} } } } }`);
  return `query FragmentBomb { servers(first: 1) { nodes { ...S${levels} } } } ${fragments.join(" ")}`;
}

const DEEP = `{ servers { nodes { disks { nodes { server { disks { nodes { server { disks { nodes { id } } } } } } } } } } }`;

async function post(url: string, body: unknown, headers: Record<string, string> = {}) {
  const res = await fetch(url, { method: "POST", headers: { "content-type": "application/json", ...headers }, body: JSON.stringify(body) });
  const text = await res.text();
  return { res, text, json: JSON.parse(text) as { data?: any; errors?: { message: string; extensions?: Record<string, unknown> }[] } };
}

function wsClient(svc: TestService, authorization: string | undefined): Client {
  return createClient({
    url: svc.url.replace(/^http/, "ws") + "/graphql",
    webSocketImpl: WebSocket,
    lazy: true,
    retryAttempts: 0,
    shouldRetry: () => false,
    connectionParams: authorization === undefined ? {} : { authorization },
  });
}

/** Runs one operation; resolves with its result, or with what the sink's error received. */
function wsRun(client: Client, query: string, variables?: Record<string, unknown>): Promise<{ result?: ExecutionResult; error?: unknown }> {
  return new Promise((resolve) => {
    let result: ExecutionResult | undefined;
    client.subscribe(
      { query, variables },
      {
        next: (r) => (result = r as ExecutionResult),
        error: (error) => resolve({ error }),
        complete: () => resolve({ result }),
      },
    );
  });
}

describe("HTTP edge with default configuration", () => {
  let svc: TestService;
  beforeAll(async () => {
    svc = await startTestService();
  });
  afterAll(async () => {
    await svc?.stop();
  });

  it.each([
    ["no Authorization header", {}],
    ["an unknown key", { authorization: "Bearer stw_not_a_real_key_0000000000000000" }],
    ["a malformed header", { authorization: "Basic dXNlcjpwYXNz" }],
    ["a bare Bearer", { authorization: "Bearer" }],
  ])("refuses /graphql with %s (401 UNAUTHENTICATED)", async (_what, headers: Record<string, string>) => {
    const { res, json } = await post(`${svc.url}/graphql`, { query: "{ viewer { name } }" }, headers);
    expect(res.status).toBe(401);
    expect(res.headers.get("www-authenticate")).toMatch(/^Bearer/);
    expect(json.data).toBeUndefined();
    expect(json.errors?.[0].extensions?.code).toBe("UNAUTHENTICATED");
  });

  it("answers /healthz and /readyz", async () => {
    const health = await fetch(`${svc.url}/healthz`);
    expect(health.status).toBe(200);
    const ready = await fetch(`${svc.url}/readyz`);
    expect(ready.status).toBe(200);
    expect(await ready.json()).toEqual({ status: "ready" });
  });

  it("exports GraphQL metrics by operation type, without operation names when no METRICS_TOKEN is set", async () => {
    expect(await svc.ok("query MetricsProbe { viewer { name } }")).toEqual({ viewer: { name: "alpha" } });
    const res = await fetch(`${svc.url}/metrics`);
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toContain("text/plain");
    const text = await res.text();
    expect(text).not.toContain("MetricsProbe");
    expect(text).toMatch(/^stowage_graphql_requests_total\{operation="other",type="query",outcome="ok"\} \d+$/m);
    expect(text).toMatch(/^stowage_graphql_request_duration_seconds_count\{operation="other",type="query"\} \d+$/m);
    expect(text).toMatch(/^stowage_http_requests_total\{[^}]*route="\/graphql"[^}]*\} \d+$/m);
  });

  it("allows no cross-origin access without CORS_ORIGINS", async () => {
    const pre = await fetch(`${svc.url}/graphql`, {
      method: "OPTIONS",
      headers: { origin: "https://app.example", "access-control-request-method": "POST", "access-control-request-headers": "authorization, content-type" },
    });
    expect(pre.status).toBeGreaterThanOrEqual(400);
    expect(pre.headers.get("access-control-allow-origin")).toBeNull();
    const { res } = await post(`${svc.url}/graphql`, { query: "{ viewer { name } }" }, { origin: "https://app.example", authorization: `Bearer ${svc.keys.alpha}` });
    expect(res.status).toBe(200);
    expect(res.headers.get("access-control-allow-origin")).toBeNull();
  });

  it("keeps stack traces, SQL and file paths out of error responses", async () => {
    const auth = { authorization: `Bearer ${svc.keys.alpha}` };
    const bad: [string, unknown, string | undefined][] = [
      ["syntax error", { query: "{ viewer { name " }, "GRAPHQL_PARSE_FAILED"],
      ["unknown field", { query: "{ viewer { nope } }" }, "GRAPHQL_VALIDATION_FAILED"],
      ["wrong variable type", { query: "query Q($id: ID!) { node(id: $id) { id } }", variables: { id: { not: "an id" } } }, "BAD_USER_INPUT"],
      ["bad global ID", { query: '{ node(id: "%%% not base64 %%%") { id } }' }, undefined],
      ["bad global ID in a mutation", { query: 'mutation { deleteServer(input: { id: "%%%" }) { __typename } }' }, "BAD_USER_INPUT"],
      ["bad global ID in nodes", { query: '{ nodes(ids: ["U2VydmVyOm5vcGU", "' + "x".repeat(300) + '"]) { id } }' }, undefined],
      ["foreign ID in a mutation", { query: 'mutation { deleteServer(input: { id: "RGlzazpub3BlCg" }) { __typename } }' }, "BAD_USER_INPUT"],
      ["invalid createServer input", { query: 'mutation { createServer(input: { name: "", vcpus: -3, memoryMiB: 0 }) { server { id } } }' }, "BAD_USER_INPUT"],
      [
        "createServer with absurd sizes",
        { query: 'mutation { createServer(input: { name: "x", vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: 9007199254740991 }) { server { id } } }' },
        "BAD_USER_INPUT",
      ],
      [
        "a SafeInt literal that is not a number",
        { query: 'mutation { createServer(input: { name: "x", vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: "lots" }) { server { id } } }' },
        "GRAPHQL_VALIDATION_FAILED",
      ],
      [
        "a SafeInt variable that is not a number",
        { query: 'mutation M($s: SafeInt) { createServer(input: { name: "x", vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: $s }) { server { id } } }', variables: { s: 1.5 } },
        "BAD_USER_INPUT",
      ],
      [
        "a SafeInt variable past 2^53",
        { query: 'mutation M($s: SafeInt) { createServer(input: { name: "x", vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: $s }) { server { id } } }', variables: { s: 2 ** 60 } },
        "BAD_USER_INPUT",
      ],
      ["a non-JSON body", "{not json", "BAD_REQUEST"],
    ];
    for (const [what, body, code] of bad) {
      const res = await fetch(`${svc.url}/graphql`, {
        method: "POST",
        headers: { "content-type": "application/json", ...auth },
        body: typeof body === "string" ? body : JSON.stringify(body),
      });
      const text = await res.text();
      const context = `${what}: ${text}`;
      expect([context, text.includes("stacktrace")]).toEqual([context, false]);
      expect([context, /\/work|node_modules|SELECT|\bat [\w.<>]+ \(|\.ts:\d+/.test(text)]).toEqual([context, false]);
      const json = JSON.parse(text);
      // Every failure is a GraphQL error with a code that says what went wrong.
      expect([context, (json.errors ?? []).every((e: any) => typeof e.extensions?.code === "string" && e.extensions.code !== "INTERNAL_SERVER_ERROR")]).toEqual([context, true]);
      if (code) expect([context, json.errors?.[0]?.extensions.code]).toEqual([context, code]);
      else expect([context, json.errors]).toEqual([context, undefined]);
    }
  });

  it("serves queries over GET and refuses mutations over GET", async () => {
    const auth = { authorization: `Bearer ${svc.keys.alpha}` };
    const get = await fetch(`${svc.url}/graphql?query=${encodeURIComponent("{viewer{name}}")}`, { headers: auth });
    expect(get.status).toBe(200);
    expect(await get.json()).toEqual({ data: { viewer: { name: "alpha" } } });

    const mutation = 'mutation { createServer(input: { name: "via-get", vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: 1073741824 }) { server { id } } }';
    const refused = await fetch(`${svc.url}/graphql?query=${encodeURIComponent(mutation)}`, { headers: auth });
    expect(refused.status).toBe(405);
    const body = (await refused.json()) as { data?: unknown; errors?: unknown[] };
    expect(body.data).toBeUndefined();
    expect(body.errors?.length).toBeGreaterThan(0);
    const servers = await svc.ok("{ servers { totalCount } }");
    expect(servers.servers.totalCount).toBe(0);

    const unauth = await fetch(`${svc.url}/graphql?query=${encodeURIComponent("{viewer{name}}")}`);
    expect(unauth.status).toBe(401);
  });

  it("answers automatic persisted queries: a known hash stands for its document, over POST and GET", async () => {
    const auth = { authorization: `Bearer ${svc.keys.alpha}` };
    const query = "query Dashboard { viewer { name } servers(first: 5) { totalCount } }";
    const sha256Hash = crypto.createHash("sha256").update(query).digest("hex");
    const persisted = { persistedQuery: { version: 1, sha256Hash } };

    const unknown = await post(`${svc.url}/graphql`, { extensions: persisted }, auth);
    expect(unknown.json.errors?.[0].extensions?.code).toBe("PERSISTED_QUERY_NOT_FOUND");
    const wrong = await post(`${svc.url}/graphql`, { query: "{ viewer { id } }", extensions: persisted }, auth);
    expect(wrong.res.status).toBe(400);
    expect(wrong.json.data).toBeUndefined();

    const registered = await post(`${svc.url}/graphql`, { query, extensions: persisted }, auth);
    expect(registered.json).toEqual({ data: { viewer: { name: "alpha" }, servers: { totalCount: 0 } } });
    const byHash = await post(`${svc.url}/graphql`, { extensions: persisted }, auth);
    expect(byHash.json).toEqual(registered.json);
    const get = await fetch(`${svc.url}/graphql?extensions=${encodeURIComponent(JSON.stringify(persisted))}`, { headers: auth });
    expect(await get.json()).toEqual(registered.json);
  });

  it("passes every MUST of the GraphQL-over-HTTP audit", async () => {
    const key = svc.keys.alpha;
    const results = await auditServer({
      url: `${svc.url}/graphql`,
      fetchFn: (input: string | URL | Request, init?: RequestInit) => {
        const headers = new Headers(init?.headers);
        headers.set("authorization", `Bearer ${key}`);
        return fetch(input, { ...init, headers });
      },
    });
    expect(results.length).toBeGreaterThan(20);
    const failedMusts = results.filter((r) => r.name.startsWith("MUST") && r.status === "error").map((r) => `${r.name}: ${"reason" in r ? r.reason : ""}`);
    expect(failedMusts).toEqual([]);
    expect(results.filter((r) => r.name.startsWith("MUST") && r.status === "ok").length).toBeGreaterThan(5);
  });

  it("costs introspection like any other list, so asking for the schema many times over is refused", async () => {
    const started = Date.now();
    const r = await svc.gql(introspectionFlood(200)); // as many copies as MAX_QUERY_ALIASES lets through
    expect(r.status).toBe(400);
    expect(r.data).toBeUndefined();
    expect(r.errors?.[0].extensions?.code).toBe("QUERY_TOO_COMPLEX");
    expect(r.errors?.[0].message).toMatch(/cost \d+ exceeds the limit of 50000/);
    expect(Date.now() - started).toBeLessThan(2000);
    // The standard introspection query (every option on) stays within the default limit, as does one copy.
    const intro = await svc.gql(getIntrospectionQuery({ descriptions: true, specifiedByUrl: true, directiveIsRepeatable: true, schemaDescription: true, inputValueDeprecation: true }));
    expect(intro.errors).toBeUndefined();
    expect(intro.data.__schema.types.length).toBeGreaterThan(20);
    expect((await svc.gql(introspectionFlood(1))).errors).toBeUndefined();
  });

  it("measures fragments spread many times without walking every spread", async () => {
    const started = Date.now();
    const r = await svc.gql(fragmentBomb(15)); // walking every spread takes 3^15 steps: tens of seconds
    expect(r.status).toBe(400);
    expect(r.errors?.[0].extensions?.code).toBe("QUERY_TOO_COMPLEX");
    expect(r.errors?.[0].message).toMatch(/depth \d+ exceeds the limit of 12/);
    expect(Date.now() - started).toBeLessThan(2000);
  });

  describe("graphql-ws on /graphql", () => {
    it("runs an operation for a connection authenticated by connectionParams", async () => {
      const client = wsClient(svc, `Bearer ${svc.keys.alpha}`);
      try {
        const { result, error } = await wsRun(client, "{ viewer { name } }");
        expect(error).toBeUndefined();
        expect(result).toEqual({ data: { viewer: { name: "alpha" } } });
        const beta = wsClient(svc, `Bearer ${svc.keys.beta}`);
        try {
          expect((await wsRun(beta, "{ viewer { name } }")).result).toEqual({ data: { viewer: { name: "beta" } } });
        } finally {
          await beta.dispose();
        }
      } finally {
        await client.dispose();
      }
    });

    it.each([
      ["an unknown key", "Bearer stw_not_a_real_key_0000000000000000"],
      ["no key", undefined],
    ])("closes a connection with %s (4403)", async (_what, authorization) => {
      const client = wsClient(svc, authorization);
      try {
        const { result, error } = await wsRun(client, "{ viewer { name } }");
        expect(result).toBeUndefined();
        expect((error as { code?: number }).code).toBe(4403);
      } finally {
        await client.dispose();
      }
    });

    it("keeps internal details out of errors sent over the socket", async () => {
      const client = wsClient(svc, `Bearer ${svc.keys.alpha}`);
      try {
        const bad = await wsRun(client, 'mutation { createServer(input: { name: "", vcpus: -3, memoryMiB: 0 }) { server { id } } }');
        const text = JSON.stringify(bad);
        expect(text).not.toMatch(/stacktrace|\/work|node_modules|SELECT|\bat [\w.<>]+ \(/);
        expect(bad.result?.errors?.[0].extensions?.code).toBe("BAD_USER_INPUT");
        // A bad document is answered with an error message; the socket stays open.
        const syntax = await wsRun(client, "{ viewer { name ");
        expect((syntax.error as any)?.[0]?.extensions?.code).toBe("GRAPHQL_PARSE_FAILED");
        const unknown = await wsRun(client, "{ viewer { nope } }");
        expect((unknown.error as any)?.[0]?.extensions?.code).toBe("GRAPHQL_VALIDATION_FAILED");
        expect(JSON.stringify([syntax, unknown])).not.toMatch(/stacktrace|\/work|node_modules/);
        expect((await wsRun(client, "{ viewer { name } }")).result).toEqual({ data: { viewer: { name: "alpha" } } });
      } finally {
        await client.dispose();
      }
    });
  });
});

describe("CORS with CORS_ORIGINS", () => {
  let svc: TestService;
  beforeAll(async () => {
    svc = await startTestService({ CORS_ORIGINS: "https://app.example, https://other.example" });
  });
  afterAll(async () => {
    await svc?.stop();
  });

  const preflight = (origin: string) =>
    fetch(`${svc.url}/graphql`, {
      method: "OPTIONS",
      headers: { origin, "access-control-request-method": "POST", "access-control-request-headers": "authorization, content-type" },
    });

  it("answers a preflight from an allowed origin", async () => {
    const res = await preflight("https://app.example");
    expect(res.status).toBeLessThan(300);
    expect(res.headers.get("access-control-allow-origin")).toBe("https://app.example");
    expect(res.headers.get("access-control-allow-headers")?.toLowerCase()).toContain("authorization");
    expect(res.headers.get("access-control-allow-methods")).toContain("POST");
    expect(res.headers.get("access-control-allow-credentials")).toBeNull();
  });

  it("marks a POST from an allowed origin as readable", async () => {
    const { res, json } = await post(`${svc.url}/graphql`, { query: "{ viewer { name } }" }, { origin: "https://app.example", authorization: `Bearer ${svc.keys.alpha}` });
    expect(res.status).toBe(200);
    expect(res.headers.get("access-control-allow-origin")).toBe("https://app.example");
    expect(res.headers.get("vary")).toMatch(/origin/i);
    expect(json.data).toEqual({ viewer: { name: "alpha" } });
  });

  it("lets an allowed origin read the 401 too", async () => {
    const { res } = await post(`${svc.url}/graphql`, { query: "{ viewer { name } }" }, { origin: "https://other.example" });
    expect(res.status).toBe(401);
    expect(res.headers.get("access-control-allow-origin")).toBe("https://other.example");
  });

  it("gives another origin no CORS headers and refuses its preflight", async () => {
    const pre = await preflight("https://evil.example");
    expect(pre.status).toBeGreaterThanOrEqual(400);
    expect(pre.headers.get("access-control-allow-origin")).toBeNull();
    const { res } = await post(`${svc.url}/graphql`, { query: "{ viewer { name } }" }, { origin: "https://evil.example", authorization: `Bearer ${svc.keys.alpha}` });
    expect(res.headers.get("access-control-allow-origin")).toBeNull();
    expect(res.headers.get("vary")).toMatch(/origin/i);
    // Prefix and suffix tricks do not match.
    for (const origin of ["https://app.example.evil", "http://app.example", "https://app.example:8443", "null"]) {
      const r = await preflight(origin);
      expect([origin, r.headers.get("access-control-allow-origin")]).toEqual([origin, null]);
    }
  });
});

describe("query depth limit (MAX_QUERY_DEPTH=4)", () => {
  let svc: TestService;
  beforeAll(async () => {
    svc = await startTestService({ MAX_QUERY_DEPTH: "4" });
  });
  afterAll(async () => {
    await svc?.stop();
  });

  it("refuses a deeply nested query with QUERY_TOO_COMPLEX", async () => {
    const r = await svc.gql(DEEP);
    expect(r.status).toBe(400);
    expect(r.data).toBeUndefined();
    expect(r.errors).toHaveLength(1);
    expect(r.errors![0].message).toMatch(/depth 11 exceeds the limit of 4/);
    expect(r.errors![0].extensions?.code).toBe("QUERY_TOO_COMPLEX");
  });

  it("counts fields inside fragments and inline fragments", async () => {
    const r = await svc.gql(`
      query Q { ...Top }
      fragment Top on Query { servers { nodes { ... on Server { disks { nodes { server { id } } } } } } }`);
    expect(r.errors?.[0].extensions?.code).toBe("QUERY_TOO_COMPLEX");
  });

  it("lets a query at the limit through", async () => {
    expect(await svc.ok("{ servers { nodes { disks { totalCount } } } }")).toEqual({ servers: { nodes: [] } });
  });

  it("still answers the standard introspection query", async () => {
    const r = await svc.gql(getIntrospectionQuery());
    expect(r.errors).toBeUndefined();
    expect(r.status).toBe(200);
    expect(r.data.__schema.queryType.name).toBe("Query");
    expect(r.data.__schema.types.map((t: { name: string }) => t.name)).toContain("Server");
  });

  it("applies over graphql-ws too", async () => {
    const client = wsClient(svc, `Bearer ${svc.keys.alpha}`);
    try {
      const { error, result } = await wsRun(client, DEEP);
      const errors = (error ?? result?.errors) as { extensions?: Record<string, unknown> }[];
      expect(errors?.[0].extensions?.code).toBe("QUERY_TOO_COMPLEX");
    } finally {
      await client.dispose();
    }
  });
});

describe("query cost limit (MAX_QUERY_COST=1000)", () => {
  let svc: TestService;
  beforeAll(async () => {
    svc = await startTestService({ MAX_QUERY_COST: "1000" });
  });
  afterAll(async () => {
    await svc?.stop();
  });

  it("refuses 100 servers × 100 disks with QUERY_TOO_COMPLEX and HTTP 400", async () => {
    const r = await svc.gql(COSTLY);
    expect(r.status).toBe(400);
    expect(r.data).toBeUndefined();
    expect(r.errors?.[0].message).toMatch(/cost \d+ exceeds the limit of 1000/);
    expect(r.errors?.[0].extensions?.code).toBe("QUERY_TOO_COMPLEX");
    expect(r.errors?.[0].extensions?.http).toBeUndefined();
  });

  it("lets small pages through", async () => {
    expect(await svc.ok("{ servers(first: 5) { nodes { disks(first: 5) { nodes { id } } } } }")).toEqual({ servers: { nodes: [] } });
    expect(await svc.ok(COSTLY_BY_VARIABLE, { n: 5 })).toEqual({ servers: { nodes: [] } });
  });

  it("counts page sizes passed as variables", async () => {
    const r = await svc.gql(COSTLY_BY_VARIABLE, { n: 100 });
    expect(r.status).toBe(400);
    expect(r.errors?.[0].extensions?.code).toBe("QUERY_TOO_COMPLEX");
  });

  it("counts page sizes taken from a variable's default value", async () => {
    const r = await svc.gql("query D($n: Int = 100) { servers(first: $n) { nodes { disks(first: $n) { nodes { id } } } } }");
    expect(r.status).toBe(400);
    expect(r.errors?.[0].extensions?.code).toBe("QUERY_TOO_COMPLEX");
  });

  it("counts repeated fields under aliases", async () => {
    const many = Array.from({ length: 40 }, (_, i) => `a${i}: servers(first: 10) { nodes { id name } }`).join(" ");
    const r = await svc.gql(`{ ${many} }`);
    expect(r.errors?.[0].extensions?.code).toBe("QUERY_TOO_COMPLEX");
  });

  it("refuses a too-costly document sent with its persisted-query hash, and does not keep it", async () => {
    const persisted = { persistedQuery: { version: 1, sha256Hash: crypto.createHash("sha256").update(COSTLY).digest("hex") } };
    const auth = { authorization: `Bearer ${svc.keys.alpha}` };
    const refused = await post(`${svc.url}/graphql`, { query: COSTLY, extensions: persisted }, auth);
    expect(refused.res.status).toBe(400);
    expect(refused.json.errors?.[0].extensions?.code).toBe("QUERY_TOO_COMPLEX");
    const byHash = await post(`${svc.url}/graphql`, { extensions: persisted }, auth);
    expect(byHash.json.errors?.[0].extensions?.code).toBe("PERSISTED_QUERY_NOT_FOUND");
    expect(byHash.json.data).toBeUndefined();
  });

  it("refuses a too-costly operation over graphql-ws", async () => {
    const client = wsClient(svc, `Bearer ${svc.keys.alpha}`);
    try {
      const costly = await wsRun(client, COSTLY);
      const errors = (costly.error ?? costly.result?.errors) as { message: string; extensions?: Record<string, unknown> }[];
      expect(Array.isArray(errors)).toBe(true);
      expect(errors[0].message).toMatch(/cost \d+ exceeds the limit of 1000/);
      expect(errors[0].extensions?.code).toBe("QUERY_TOO_COMPLEX");
      const byVariable = await wsRun(client, COSTLY_BY_VARIABLE, { n: 100 });
      expect(((byVariable.error ?? byVariable.result?.errors) as any)?.[0].extensions?.code).toBe("QUERY_TOO_COMPLEX");
      // The connection stays usable.
      expect((await wsRun(client, "{ viewer { name } }")).result).toEqual({ data: { viewer: { name: "alpha" } } });
    } finally {
      await client.dispose();
    }
  });
});
