/**
 * GET /metrics: the event-loop delay it reports, and what it shows with and without
 * METRICS_TOKEN. The service runs in this process, so blocking this thread blocks it.
 */
import { loadConfig, ConfigError } from "../../src/config";
import { startTestService, type TestService } from "../helpers/service";

const TOKEN = "s3cret-metrics-token-0123456789";

/** The value of one sample line, e.g. stowage_event_loop_delay_seconds{stat="max"}. */
function sample(text: string, name: string, labels: string): number {
  const line = text.split("\n").find((l) => l.startsWith(`${name}{${labels}}`));
  if (!line) throw new Error(`no ${name}{${labels}} in /metrics:\n${text.slice(0, 2000)}`);
  return Number(line.slice(line.lastIndexOf(" ") + 1));
}

function block(ms: number) {
  const end = Date.now() + ms;
  while (Date.now() < end);
}

describe("without METRICS_TOKEN", () => {
  let svc: TestService;
  beforeAll(async () => {
    svc = await startTestService();
  });
  afterAll(async () => svc?.stop());

  it("answers without a key and shows no operation names, only operation types", async () => {
    await svc.ok(`query TenantSecretInventory { viewer { id } }`, {}, svc.keys.beta);
    await svc.ok(`mutation AlphaSecretPolicy($i: CreatePolicyInput!) { createPolicy(input: $i) { policy { id } } }`, { i: { name: "p", schedule: ["FREQ=DAILY;BYHOUR=2"], timezone: "UTC" } });
    const res = await fetch(`${svc.url}/metrics`);
    expect(res.status).toBe(200);
    const text = await res.text();
    expect(text).not.toContain("TenantSecretInventory");
    expect(text).not.toContain("AlphaSecretPolicy");
    expect(sample(text, "stowage_graphql_requests_total", 'operation="other",type="query",outcome="ok"')).toBeGreaterThanOrEqual(1);
    expect(sample(text, "stowage_graphql_requests_total", 'operation="other",type="mutation",outcome="ok"')).toBeGreaterThanOrEqual(1);
  });

  it("reports event-loop delay, and its max shows a 200 ms block of the loop", async () => {
    const before = sample(await (await fetch(`${svc.url}/metrics`)).text(), "stowage_event_loop_delay_seconds", 'stat="max"');
    expect(before).toBeGreaterThan(0);
    // Longer than anything before it (starting the service may have held the loop too), so the max must move.
    const ms = Math.max(200, Math.ceil(before * 1000) + 100);
    block(ms);
    // The monitor samples every 10 ms; give it a tick after the block to record it.
    await new Promise((resolve) => setTimeout(resolve, 50));
    const text = await (await fetch(`${svc.url}/metrics`)).text();
    const after = sample(text, "stowage_event_loop_delay_seconds", 'stat="max"');
    expect(after).toBeGreaterThanOrEqual((ms - 10) / 1000);
    expect(after).toBeGreaterThan(before);
    expect(sample(text, "stowage_event_loop_delay_seconds", 'stat="p99"')).toBeGreaterThan(0);
    expect(text).toContain("# TYPE stowage_event_loop_delay_seconds gauge");
  });
});

describe("with METRICS_TOKEN", () => {
  let svc: TestService;
  beforeAll(async () => {
    svc = await startTestService({ METRICS_TOKEN: TOKEN });
  });
  afterAll(async () => svc?.stop());

  it("answers 401 without the token, with another one, or with an API key", async () => {
    for (const authorization of [undefined, `Bearer ${TOKEN}x`, `Bearer ${TOKEN.slice(0, -1)}`, "Bearer ", TOKEN, `Basic ${TOKEN}`, `Bearer ${svc.keys.alpha}`]) {
      const res = await fetch(`${svc.url}/metrics`, { headers: authorization === undefined ? {} : { authorization } });
      expect([authorization, res.status]).toEqual([authorization, 401]);
      expect(res.headers.get("www-authenticate")).toMatch(/^Bearer/);
      expect(await res.text()).not.toContain("stowage_");
    }
  });

  it("answers 200 with the token and shows operation names", async () => {
    await svc.ok(`query NamedForTheOperator { viewer { id } }`);
    const res = await fetch(`${svc.url}/metrics`, { headers: { authorization: `Bearer ${TOKEN}` } });
    expect(res.status).toBe(200);
    const text = await res.text();
    expect(sample(text, "stowage_graphql_requests_total", 'operation="NamedForTheOperator",type="query",outcome="ok"')).toBe(1);
    expect(text).toContain('stowage_event_loop_delay_seconds{stat="max"}');
  });
});

it("refuses a METRICS_TOKEN no header can carry", () => {
  expect(() => loadConfig({ METRICS_TOKEN: "with space" })).toThrow(ConfigError);
  expect(loadConfig({ METRICS_TOKEN: TOKEN }).metricsToken).toBe(TOKEN);
  expect(loadConfig({}).metricsToken).toBeUndefined();
});
