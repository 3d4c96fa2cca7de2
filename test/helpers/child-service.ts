import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import path from "node:path";

/**
 * `stowage serve` as a real child process: for tests where the service must have
 * its own event loop, its own process to signal, or its own life and death.
 */

export const ROOT = path.join(__dirname, "..", "..");
export const BIN = path.join(ROOT, "bin", "stowage.js");

export interface ChildService {
  child: ChildProcess;
  /** http://host:port */
  url: string;
  /** Everything it wrote so far, stdout and stderr. */
  output(): string;
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** The API key of the project it made on first start (`default`). */
  defaultKey(): string;
  /** SIGKILL, and waits for the exit. */
  kill(): Promise<void>;
}

/** Variables of the test's environment a child must not inherit. */
const UNINHERITED = ["NODE_ENV", "STOWAGE_TEST_ADMIN_URL", "STOWAGE_DIST", "S3_BUCKET", "VOLUME_BACKEND", "VAULT_BACKEND", "LOG_LEVEL"];

export async function serveChild(env: Record<string, string> & { STOWAGE_DATA_DIR: string }, readyMs = 60_000): Promise<ChildService> {
  const full: NodeJS.ProcessEnv = { ...process.env, HOST: "127.0.0.1", PORT: "0", NBD_PORT: "0", ...env };
  for (const name of UNINHERITED) if (!(name in env)) delete full[name];
  const child = spawn(process.execPath, [BIN, "serve"], { cwd: ROOT, env: full, stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  child.stdout!.setEncoding("utf8").on("data", (d: string) => (out += d));
  child.stderr!.setEncoding("utf8").on("data", (d: string) => (out += d));
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
  const url = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`serve was not ready within ${readyMs} ms:\n${out}`)), readyMs);
    const check = () => {
      const m = /^Stowage: API (http:\/\/\S+)\/graphql/m.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    };
    child.stdout!.on("data", check);
    void exit.then((e) => {
      clearTimeout(timer);
      reject(new Error(`serve exited (${e.code ?? e.signal}) before it was ready:\n${out}`));
    });
  });
  return {
    child,
    url,
    output: () => out,
    exit,
    defaultKey: () => fs.readFileSync(path.join(env.STOWAGE_DATA_DIR, "default-api-key"), "utf8").trim(),
    async kill() {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
      await exit;
    },
  };
}

/** POSTs a GraphQL request; returns the parsed body. */
export async function gqlAt(
  url: string,
  key: string,
  query: string,
  variables?: Record<string, unknown>,
): Promise<{ data?: any; errors?: { message: string; extensions?: Record<string, unknown> }[] }> {
  const res = await fetch(`${url}/graphql`, { method: "POST", headers: { "content-type": "application/json", authorization: `Bearer ${key}` }, body: JSON.stringify({ query, variables }) });
  return (await res.json()) as { data?: any; errors?: { message: string; extensions?: Record<string, unknown> }[] };
}
