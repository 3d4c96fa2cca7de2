import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { chromium as playwright, type Browser, type Request } from "playwright-core";
import { requireProgram } from "../helpers/external";
import { startTestService, type TestService } from "../helpers/service";

// The page's globals, for the callbacks that run in the browser (this project compiles without the DOM lib).
interface CodeMirrorElement {
  textContent: string | null;
  CodeMirror: { setValue(v: string): void; getValue(): string; operationName?: string };
}
declare const document: { querySelector(selector: string): CodeMirrorElement | null; getElementById(id: string): { textContent: string | null } | null };

const CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"];

describe("playground at /", () => {
  let svc: TestService | undefined;
  let browser: Browser | undefined;
  afterAll(async () => {
    await browser?.close();
    await svc?.stop();
  });

  it("loads from the service alone, runs a query with the API key typed in, and subscribes over graphql-ws", async () => {
    const chromium = requireProgram(["/usr/bin/chromium"], "chromium");
    if (!chromium) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");

    svc = await startTestService();
    const service = new URL(svc.url);
    browser = await playwright.launch({ executablePath: chromium, headless: true, args: CHROMIUM_ARGS });
    const page = await browser.newPage();

    const requests: Request[] = [];
    const pageErrors: string[] = [];
    const consoleErrors: string[] = [];
    page.on("request", (r) => requests.push(r));
    page.on("pageerror", (e) => pageErrors.push(e.message));
    page.on("console", (m) => {
      if (m.type() === "error") consoleErrors.push(m.text());
    });

    const res = await page.goto(`${svc.url}/`);
    expect(res?.status()).toBe(200);
    expect(res?.headers()["content-security-policy"]).toContain("default-src 'self'");
    await page.waitForSelector(".graphiql-query-editor .CodeMirror");
    await page.waitForSelector(".graphiql-execute-button");

    await page.fill("#api-key", svc.keys.alpha);
    await page.dispatchEvent("#api-key", "change");
    // GraphiQL remounts with the key; wait for the new editor, then set the query.
    await page.waitForFunction(() => (document.getElementById("key-state")?.textContent ?? "x") === "");
    await page.waitForSelector(".graphiql-query-editor .CodeMirror");
    await page.evaluate(() => {
      document.querySelector(".graphiql-query-editor .CodeMirror")!.CodeMirror.setValue("query PlaygroundProbe { viewer { name } }");
    });
    // GraphiQL reads the operation name from the editor after a short debounce.
    await page.waitForFunction(() => {
      return document.querySelector(".graphiql-query-editor .CodeMirror")?.CodeMirror.operationName === "PlaygroundProbe";
    });
    await page.click(".graphiql-execute-button");
    await page.waitForFunction(() => document.querySelector(".graphiql-response")?.textContent?.includes('"alpha"'), undefined, { timeout: 15_000 });
    const response = await page.evaluate(() => document.querySelector(".graphiql-response .CodeMirror")!.CodeMirror.getValue());
    expect(JSON.parse(response)).toEqual({ data: { viewer: { name: "alpha" } } });

    // The query went to /graphql with the key as a bearer token.
    const sent = requests.filter((r) => r.url() === `${svc!.url}/graphql` && r.method() === "POST" && (r.postData() ?? "").includes("PlaygroundProbe"));
    expect(sent).toHaveLength(1);
    expect(sent[0].headers()["authorization"]).toBe(`Bearer ${svc.keys.alpha}`);

    // Subscriptions go over graphql-ws on the same path, with the key in connectionParams.
    const frames: { sent: boolean; data: Record<string, any> }[] = [];
    page.on("websocket", (ws) => {
      ws.on("framesent", (f) => frames.push({ sent: true, data: JSON.parse(String(f.payload)) }));
      ws.on("framereceived", (f) => frames.push({ sent: false, data: JSON.parse(String(f.payload)) }));
    });
    await page.evaluate(() => document.querySelector(".graphiql-query-editor .CodeMirror")!.CodeMirror.setValue("subscription PlaygroundJobs { jobUpdated { id status } }"));
    await page.waitForFunction(() => document.querySelector(".graphiql-query-editor .CodeMirror")?.CodeMirror.operationName === "PlaygroundJobs");
    await page.click(".graphiql-execute-button");
    const frame = (sent: boolean, type: string) => frames.find((f) => f.sent === sent && f.data.type === type);
    for (const deadline = Date.now() + 10_000; !(frame(false, "connection_ack") && frame(true, "subscribe")) && Date.now() < deadline; ) await page.waitForTimeout(50);
    expect(frame(false, "connection_ack")).toBeDefined();
    expect(frame(true, "connection_init")?.data.payload).toEqual({ authorization: `Bearer ${svc.keys.alpha}` });
    expect(frame(true, "subscribe")?.data.payload.query).toContain("PlaygroundJobs");
    expect(frames.filter((f) => !f.sent && f.data.type === "error")).toEqual([]);
    expect(requests.some((r) => r.method() === "POST" && (r.postData() ?? "").includes("PlaygroundJobs"))).toBe(false);

    // With the key, GraphiQL's schema fetch succeeds too (docs and completion work).
    const introspections = requests.filter((r) => r.url() === `${svc!.url}/graphql` && (r.postData() ?? "").includes("__schema") && r.headers()["authorization"]);
    expect(introspections.length).toBeGreaterThan(0);
    expect(await introspections[0].response().then((r) => r?.status())).toBe(200);

    // Nothing came from anywhere but the service (no CDN), and nothing broke on the page.
    const hosts = new Set(requests.map((r) => new URL(r.url())).filter((u) => u.protocol !== "data:").map((u) => u.host));
    expect([...hosts]).toEqual([service.host]);
    expect(requests.map((r) => r.url())).toEqual(expect.arrayContaining([`${svc.url}/playground/graphiql.min.js`, `${svc.url}/playground/playground.js`]));
    expect(pageErrors).toEqual([]);
    // The only errors allowed are the 401s of GraphiQL's schema fetch before the key was entered.
    expect(consoleErrors.filter((t) => !/status of 401/.test(t))).toEqual([]);

    const shot = path.join(os.tmpdir(), `stowage-playground-${process.pid}.png`);
    await page.screenshot({ path: shot });
    expect(fs.statSync(shot).size).toBeGreaterThan(10_000);
    if (!process.env.STOWAGE_KEEP_SCREENSHOT) fs.rmSync(shot);
  });
});
