import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { chromium as playwright, type Browser, type BrowserContext, type Page, type Request } from "playwright-core";
import { backup, bytes, createDisk, succeed, writeDisk } from "../helpers/data";
import { requireProgram } from "../helpers/external";
import { MiB, startTestService, type TestService } from "../helpers/service";

// The page's globals, for the callbacks that run in the browser (this project compiles without the DOM lib).
interface CodeMirrorElement {
  textContent: string | null;
  className: string;
  CodeMirror: { setValue(v: string): void; getValue(): string; operationName?: string };
}
declare const document: {
  querySelector(selector: string): CodeMirrorElement | null;
  getElementById(id: string): { textContent: string | null; className: string } | null;
  body: { innerText: string };
};

jest.setTimeout(120_000);

const CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"];
const QUERY_EDITOR = ".graphiql-query-editor .CodeMirror";
const RESPONSE = ".graphiql-response .CodeMirror";
const BAD_KEY = "stw_not_a_real_key_0000000000000000";
/** What a JavaScript stack looks like in a page: "at fn (file.js:1:2)" lines, or a serialised Error's stack field. */
const STACK = /\bat \S+ \(|\.js:\d+:\d+|"stack"/;

/** What the browser sent and received on graphql-ws. */
interface Frame {
  sent: boolean;
  data: Record<string, any>;
}

/** One fresh browser context (its own localStorage) on the playground, with what it requested and logged. */
class Playground {
  readonly requests: Request[] = [];
  readonly pageErrors: string[] = [];
  readonly consoleErrors: string[] = [];
  readonly frames: Frame[] = [];

  private constructor(
    readonly context: BrowserContext,
    readonly page: Page,
  ) {
    page.on("request", (r) => this.requests.push(r));
    page.on("pageerror", (e) => this.pageErrors.push(e.message));
    page.on("console", (m) => {
      if (m.type() === "error") this.consoleErrors.push(m.text());
    });
    page.on("websocket", (ws) => {
      ws.on("framesent", (f) => this.frames.push({ sent: true, data: JSON.parse(String(f.payload)) }));
      ws.on("framereceived", (f) => this.frames.push({ sent: false, data: JSON.parse(String(f.payload)) }));
    });
  }

  static async open(browser: Browser, url: string): Promise<Playground> {
    const context = await browser.newContext();
    const pg = new Playground(context, await context.newPage());
    await pg.load(url);
    return pg;
  }

  async load(url: string): Promise<void> {
    const res = await this.page.goto(url);
    expect(res?.status()).toBe(200);
    await this.page.waitForSelector(QUERY_EDITOR);
    await this.page.waitForSelector(".graphiql-execute-button");
  }

  /** Puts a document in the query editor and waits until GraphiQL has read its operation name (it does so after a debounce). */
  async setQuery(query: string, operationName: string): Promise<void> {
    await this.page.evaluate(([sel, q]) => document.querySelector(sel)!.CodeMirror.setValue(q), [QUERY_EDITOR, query] as const);
    await this.page.waitForFunction(([sel, name]) => document.querySelector(sel)?.CodeMirror.operationName === name, [QUERY_EDITOR, operationName] as const);
  }

  /** Opens GraphiQL's Headers tab and writes `json` into it. */
  async setHeaders(json: string): Promise<void> {
    await this.page.click(".graphiql-editor-tools button[data-name=headers]");
    const editor = ".graphiql-editor-tool .graphiql-editor:not(.hidden) .CodeMirror";
    await this.page.waitForSelector(editor);
    await this.page.evaluate(([sel, v]) => document.querySelector(sel)!.CodeMirror.setValue(v), [editor, json] as const);
  }

  /** Pastes into the key bar as a browser does: one input event, no change event until the bar loses focus. */
  async pasteKey(key: string): Promise<void> {
    await this.page.click("#api-key");
    await this.page.keyboard.insertText(key);
  }

  /**
   * Presses Run. While the last run is still settling the button says Stop for a moment, and a
   * click then stops instead of running: wait for Execute first, unless a subscription keeps it
   * at Stop (then the click stops it, as a user's would).
   */
  async run(): Promise<void> {
    await this.page.waitForSelector('.graphiql-execute-button[aria-label^="Execute"]', { timeout: 2_000 }).catch(() => undefined);
    await this.page.click(".graphiql-execute-button");
  }

  response(): Promise<string> {
    return this.page.evaluate((sel) => document.querySelector(sel)?.CodeMirror.getValue() ?? "", RESPONSE);
  }

  /** Waits until the response pane contains `text`; returns the pane. */
  async responseWith(text: string, timeout = 10_000): Promise<string> {
    await this.page
      .waitForFunction(([sel, t]) => document.querySelector(sel)?.CodeMirror.getValue().includes(t), [RESPONSE, text] as const, { timeout })
      .catch(async () => {
        throw new Error(`the response pane never showed ${JSON.stringify(text)} within ${timeout} ms; it shows ${JSON.stringify(await this.response())}`);
      });
    return this.response();
  }

  /** The state beside the key bar: its class (missing, refused, ok or none) and its text. */
  keyState(): Promise<{ kind: string; text: string }> {
    return this.page.evaluate(() => {
      const el = document.getElementById("key-state")!;
      return { kind: el.className, text: el.textContent ?? "" };
    });
  }

  async waitKeyState(kind: string, timeout = 10_000): Promise<{ kind: string; text: string }> {
    await this.page
      .waitForFunction((k) => document.getElementById("key-state")?.className === k, kind, { timeout })
      .catch(async () => {
        throw new Error(`the key state never became ${kind} within ${timeout} ms; it is ${JSON.stringify(await this.keyState())}`);
      });
    return this.keyState();
  }

  frame(sent: boolean, type: string): Frame | undefined {
    return this.frames.find((f) => f.sent === sent && f.data.type === type);
  }

  async waitFrame(sent: boolean, type: string, timeout = 10_000): Promise<Frame> {
    for (const deadline = Date.now() + timeout; Date.now() < deadline; await this.page.waitForTimeout(20)) {
      const f = this.frame(sent, type);
      if (f) return f;
    }
    throw new Error(`no ${sent ? "sent" : "received"} ${type} frame within ${timeout} ms; frames: ${JSON.stringify(this.frames)}`);
  }

  /** POSTs to /graphql whose body mentions `text`. */
  posts(url: string, text: string): Request[] {
    return this.requests.filter((r) => r.url() === `${url}/graphql` && r.method() === "POST" && (r.postData() ?? "").includes(text));
  }

  /** Everything a person sees on the page, the editors' text included. */
  pageText(): Promise<string> {
    return this.page.evaluate(() => document.body.innerText);
  }

  async screenshot(name: string): Promise<void> {
    const shot = path.join(os.tmpdir(), `stowage-playground-${name}-${process.pid}.png`);
    await this.page.screenshot({ path: shot });
    expect(fs.statSync(shot).size).toBeGreaterThan(10_000);
    if (!process.env.STOWAGE_KEEP_SCREENSHOT) fs.rmSync(shot);
  }

  close(): Promise<void> {
    return this.context.close();
  }
}

describe("playground at /", () => {
  let svc: TestService | undefined;
  let browser: Browser | undefined;
  let chromium: string | null | undefined;
  afterAll(async () => {
    await browser?.close();
    await svc?.stop();
  });

  /** The service and a headless Chromium, shared by the tests; false when Chromium is missing and skipping was asked for. */
  async function ready(): Promise<boolean> {
    if (chromium === undefined) chromium = requireProgram(["/usr/bin/chromium"], "chromium");
    if (!chromium) return false;
    svc ??= await startTestService();
    browser ??= await playwright.launch({ executablePath: chromium, headless: true, args: CHROMIUM_ARGS });
    return true;
  }

  /** How many listeners the service's event bus holds for a project (internals: nothing else shows that a subscription listens). */
  const listeners = (projectId: string): number => (svc!.services.progress as any).bus.local.emitter.listenerCount(projectId);

  it("loads from the service alone, runs a query with the API key in the bar, and subscribes over graphql-ws", async () => {
    if (!(await ready())) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const url = svc!.url;
    const pg = await Playground.open(browser!, `${url}/`);
    try {
      const res = await pg.requests[0].response();
      expect(res?.headers()["content-security-policy"]).toContain("default-src 'self'");
      // Without a key nothing is sent: the bar asks for one.
      expect((await pg.waitKeyState("missing")).text).toMatch(/paste .*key/i);
      await pg.screenshot("no-key");

      await pg.setQuery("query PlaygroundProbe { viewer { name } }", "PlaygroundProbe");
      await pg.page.fill("#api-key", svc!.keys.alpha);
      await pg.run();
      expect(JSON.parse(await pg.responseWith('"alpha"'))).toEqual({ data: { viewer: { name: "alpha" } } });
      expect((await pg.waitKeyState("ok")).text).toMatch(/accepted/);

      // The query went to /graphql with the key as a bearer token.
      const sent = pg.posts(url, "PlaygroundProbe");
      expect(sent).toHaveLength(1);
      expect(sent[0].headers()["authorization"]).toBe(`Bearer ${svc!.keys.alpha}`);

      // Subscriptions go over graphql-ws on the same path, with the key in connectionParams.
      await pg.setQuery("subscription PlaygroundJobs { jobUpdated { id status } }", "PlaygroundJobs");
      await pg.run();
      await pg.waitFrame(false, "connection_ack");
      expect(pg.frame(true, "connection_init")?.data.payload).toEqual({ authorization: `Bearer ${svc!.keys.alpha}` });
      expect((await pg.waitFrame(true, "subscribe")).data.payload.query).toContain("PlaygroundJobs");
      expect(pg.frames.filter((f) => !f.sent && f.data.type === "error")).toEqual([]);
      expect(pg.requests.some((r) => r.method() === "POST" && (r.postData() ?? "").includes("PlaygroundJobs"))).toBe(false);

      // With the key, GraphiQL's schema fetch succeeds too (docs and completion work).
      const introspections = pg.requests.filter((r) => r.url() === `${url}/graphql` && (r.postData() ?? "").includes("__schema") && r.headers()["authorization"]);
      expect(introspections.length).toBeGreaterThan(0);
      expect(await introspections[0].response().then((r) => r?.status())).toBe(200);

      // Nothing came from anywhere but the service (no CDN), and nothing broke on the page.
      const hosts = new Set(
        pg.requests
          .map((r) => new URL(r.url()))
          .filter((u) => u.protocol !== "data:")
          .map((u) => u.host),
      );
      expect([...hosts]).toEqual([new URL(url).host]);
      expect(pg.requests.map((r) => r.url())).toEqual(expect.arrayContaining([`${url}/playground/graphiql.min.js`, `${url}/playground/playground.js`]));
      expect(pg.pageErrors).toEqual([]);
      expect(pg.consoleErrors).toEqual([]);
      await pg.screenshot("query");
    } finally {
      await pg.close();
    }
  });

  it("takes a key on the first Run, whether pasted, typed, or in the bar from an earlier visit", async () => {
    if (!(await ready())) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const url = svc!.url;
    const ways: [string, (pg: Playground) => Promise<void>][] = [
      ["pasted", (pg) => pg.pasteKey(svc!.keys.alpha)],
      [
        "typed",
        async (pg) => {
          await pg.page.click("#api-key");
          await pg.page.keyboard.type(svc!.keys.alpha);
        },
      ],
      [
        "kept from an earlier visit",
        async (pg) => {
          await pg.pasteKey(svc!.keys.alpha);
          await pg.load(`${url}/`);
          expect(await pg.page.inputValue("#api-key")).toBe(svc!.keys.alpha);
        },
      ],
    ];
    for (const [way, enterKey] of ways) {
      const pg = await Playground.open(browser!, `${url}/`);
      try {
        await pg.setQuery("query FirstRun { viewer { name } }", "FirstRun");
        await enterKey(pg);
        // One click on Run, straight from the bar.
        await pg.run();
        const pane = await pg.responseWith('"alpha"', 5_000).catch((err: Error) => {
          throw new Error(`key ${way}: ${err.message}`);
        });
        expect(JSON.parse(pane)).toEqual({ data: { viewer: { name: "alpha" } } });
        expect(pg.posts(url, "FirstRun").map((r) => r.headers()["authorization"])).toEqual([`Bearer ${svc!.keys.alpha}`]);
        expect(pg.pageErrors).toEqual([]);
      } finally {
        await pg.close();
      }
    }
  });

  it("carries a key from the Headers tab, its name in any case, into queries and subscriptions", async () => {
    if (!(await ready())) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const url = svc!.url;
    const pg = await Playground.open(browser!, `${url}/`);
    try {
      await pg.setHeaders(JSON.stringify({ AUTHORIZATION: `Bearer ${svc!.keys.alpha}` }));
      await pg.setQuery("query FromHeaders { viewer { name } }", "FromHeaders");
      await pg.run();
      expect(JSON.parse(await pg.responseWith('"alpha"'))).toEqual({ data: { viewer: { name: "alpha" } } });
      expect(pg.posts(url, "FromHeaders").map((r) => r.headers()["authorization"])).toEqual([`Bearer ${svc!.keys.alpha}`]);
      // The schema fetch failed without a key; the key that worked brings it (docs and completion).
      const schemaFetch = () => pg.requests.find((r) => (r.postData() ?? "").includes("__schema") && r.headers()["authorization"] === `Bearer ${svc!.keys.alpha}`);
      for (const deadline = Date.now() + 5_000; !schemaFetch(); await pg.page.waitForTimeout(20)) {
        if (Date.now() > deadline) throw new Error("the schema was not fetched again with the key from the Headers tab");
      }
      expect(
        await schemaFetch()!
          .response()
          .then((r) => r?.status()),
      ).toBe(200);

      const project = svc!.projectIds.alpha;
      const before = listeners(project);
      await pg.setQuery("subscription HeaderJobs { jobUpdated { id type status } }", "HeaderJobs");
      await pg.run();
      await pg.waitFrame(false, "connection_ack");
      expect(pg.frame(true, "connection_init")?.data.payload).toEqual({ authorization: `Bearer ${svc!.keys.alpha}` });
      for (const deadline = Date.now() + 5_000; listeners(project) === before; await new Promise((r) => setTimeout(r, 20))) {
        if (Date.now() > deadline) throw new Error("the subscription never listened for jobs");
      }

      // A small backup: its job's updates reach the response pane.
      const disk = await createDisk(svc!, "playground-disk", 4 * MiB);
      await writeDisk(svc!, disk, bytes(MiB, 7));
      const { jobId } = await backup(svc!, disk);
      await succeed(svc!, jobId);
      const pane = JSON.parse(await pg.responseWith(jobId));
      expect(pane).toEqual({ data: { jobUpdated: { id: jobId, type: "BACKUP", status: expect.any(String) } } });
      expect(pg.frames.filter((f) => !f.sent && f.data.type === "error")).toEqual([]);
      await pg.run(); // stops the subscription
      expect(pg.pageErrors).toEqual([]);
    } finally {
      await pg.close();
    }
  });

  it("flags a refused key in the bar at once, for a query and for a subscription, with no stack on the page", async () => {
    if (!(await ready())) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const url = svc!.url;
    const pg = await Playground.open(browser!, `${url}/`);
    try {
      await pg.setQuery("query WrongKey { viewer { name } }", "WrongKey");
      // GraphiQL fetches the schema again for the new key and writes its failure into the response
      // pane whenever it answers: it is held until the subscription below was refused, to answer last.
      let release!: () => void;
      const held = new Promise<void>((resolve) => (release = resolve));
      const isSchemaFetch = (r: Request) => (r.postData() ?? "").includes("IntrospectionQuery") && r.headers()["authorization"] === `Bearer ${BAD_KEY}`;
      await pg.page.route(`${url}/graphql`, async (route) => {
        if (isSchemaFetch(route.request())) await held;
        await route.continue();
      });
      await pg.pasteKey(BAD_KEY);
      const [answer] = await Promise.all([pg.page.waitForResponse((r) => (r.request().postData() ?? "").includes("WrongKey")), pg.run()]);
      expect(answer.status()).toBe(401);
      expect(JSON.parse(await pg.responseWith("UNAUTHENTICATED")).errors[0].extensions.code).toBe("UNAUTHENTICATED");
      expect(pg.posts(url, "WrongKey")).toHaveLength(1);
      expect((await pg.waitKeyState("refused")).text).toMatch(/key in the bar was refused/i);
      await pg.screenshot("refused-query");

      await pg.setQuery("subscription WrongKeyJobs { jobUpdated { id } }", "WrongKeyJobs");
      const t0 = Date.now();
      await pg.run();
      const pane = await pg.responseWith("refused", 3_000);
      expect(Date.now() - t0).toBeLessThan(3_000);
      const refused = { errors: [{ message: expect.stringMatching(/API key in the bar was refused/), extensions: { code: "UNAUTHENTICATED" } }] };
      expect(JSON.parse(pane)).toEqual(refused);
      expect(pg.frame(false, "connection_ack")).toBeUndefined();
      // The schema fetch's refusal, answering now, says the same in the pane (GraphiQL tries it twice: with subscriptions, then without).
      release();
      for (const deadline = Date.now() + 5_000; pg.requests.filter(isSchemaFetch).length < 2; await pg.page.waitForTimeout(20)) {
        if (Date.now() > deadline) throw new Error("GraphiQL did not fetch the schema twice with the refused key");
      }
      await Promise.all(pg.requests.filter(isSchemaFetch).map((r) => r.response()));
      await pg.page.waitForFunction(([sel, before]) => document.querySelector(sel)?.CodeMirror.getValue() !== before, [RESPONSE, pane] as const, { timeout: 2_000 }).catch(() => undefined);
      expect(JSON.parse(await pg.response())).toEqual(refused);
      expect((await pg.keyState()).kind).toBe("refused");
      expect(await pg.pageText()).not.toMatch(STACK);
      // GraphiQL is no longer busy with it: the Run button runs again.
      await pg.page.waitForSelector(".graphiql-execute-button[aria-label='Execute query (Ctrl-Enter)']", { timeout: 1_000 });
      await pg.screenshot("refused-subscription");

      // The right key clears the flag and works at once.
      await pg.page.fill("#api-key", "");
      expect((await pg.waitKeyState("missing")).text).toMatch(/paste .*key/i);
      await pg.pasteKey(svc!.keys.alpha);
      await pg.setQuery("query RightKey { viewer { name } }", "RightKey");
      await pg.run();
      await pg.responseWith('"alpha"');
      await pg.waitKeyState("ok");
      expect(pg.pageErrors).toEqual([]);
    } finally {
      await pg.close();
    }
  });

  it("flags a refused key from the Headers tab, for a query and for a subscription", async () => {
    if (!(await ready())) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const url = svc!.url;
    const pg = await Playground.open(browser!, `${url}/`);
    try {
      // The bar's key is good (GraphiQL's schema fetch says so); the Headers tab's overrides it and is not.
      await pg.pasteKey(svc!.keys.alpha);
      await pg.waitKeyState("ok");
      await pg.setHeaders(JSON.stringify({ authorization: `Bearer ${BAD_KEY}` }));
      await pg.setQuery("query HeaderWrongKey { viewer { name } }", "HeaderWrongKey");
      const [answer] = await Promise.all([pg.page.waitForResponse((r) => (r.request().postData() ?? "").includes("HeaderWrongKey")), pg.run()]);
      expect(answer.status()).toBe(401);
      expect(answer.request().headers()["authorization"]).toBe(`Bearer ${BAD_KEY}`);
      await pg.responseWith("UNAUTHENTICATED");
      expect((await pg.waitKeyState("refused")).text).toMatch(/key in the Headers tab was refused/i);

      // Back to good, then a subscription with the bad header.
      await pg.setHeaders("{}");
      await pg.run();
      await pg.responseWith('"alpha"');
      await pg.waitKeyState("ok");
      await pg.setHeaders(JSON.stringify({ Authorization: `Bearer ${BAD_KEY}` }));
      await pg.setQuery("subscription HeaderWrongJobs { jobUpdated { id } }", "HeaderWrongJobs");
      const t0 = Date.now();
      await pg.run();
      const pane = await pg.responseWith("refused", 3_000);
      expect(Date.now() - t0).toBeLessThan(3_000);
      expect(JSON.parse(pane).errors[0].message).toMatch(/API key in the Headers tab was refused/);
      expect(pg.frame(true, "connection_init")?.data.payload).toEqual({ authorization: `Bearer ${BAD_KEY}` });
      expect((await pg.waitKeyState("refused", 1_000)).text).toMatch(/key in the Headers tab was refused/i);
      expect(await pg.pageText()).not.toMatch(STACK);
      expect(pg.pageErrors).toEqual([]);
    } finally {
      await pg.close();
    }
  });
});
