import "./threadpool";
import "reflect-metadata";
import fs from "node:fs";
import path from "node:path";
import { ConfigError, loadConfig } from "./config";
import { EmbeddedPostgresError } from "./db/embedded-postgres";
import { createLogger } from "./logger";
import { DomainError } from "./domain/errors";

// The heavy modules (entities, services, GraphQL schema, Apollo) load only in the
// commands that use them, so help, usage and configuration errors answer at once
// (under ts-node, transpiling them takes about two seconds).
const app = () => require("./app") as typeof import("./app");
const servicesModule = () => require("./services") as typeof import("./services");

const USAGE = `Usage: stowage <command>

Commands:
  serve [--demo]          serve the API on HOST:PORT (default 127.0.0.1:4000), run jobs
  worker                  run jobs only, beside API processes on the same database
  migrate                 apply database migrations
  project create NAME     create a project and print its API key (last line)
  demo                    fill project "default" with servers, disks and policies
  schema [--write]        print the GraphQL SDL (or write schema/schema.graphql)
  checksum FILE...        print each image file's content checksum, as Image.checksum shows it

Configuration is read from the environment; see README.md.`;

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (!command || command === "help" || command === "--help" || command === "-h") {
    process.stdout.write(USAGE + "\n");
    return command ? 0 : 1;
  }
  if (command === "checksum") return checksumFiles(rest);
  const config = loadConfig();
  const logger = createLogger(config.logLevel);

  switch (command) {
    case "serve": {
      const svc = await app().startService(config, logger, {
        onDefaultKey: (key, file) => {
          process.stdout.write(`Created project "default". Its API key (also in ${file}):\n${key}\n`);
        },
      });
      if (rest.includes("--demo")) {
        try {
          await runDemo(svc.db.ds, config, svc.services);
        } catch (err) {
          await svc.stop();
          throw err;
        }
      }
      // Which code runs: the compiled build (npm start) or the sources under ts-node.
      logger.info("Stowage is serving", { url: `${svc.url}/graphql`, playground: `${svc.url}/`, build: path.extname(__filename) === ".js" ? "compiled" : "sources" });
      process.stdout.write(`Stowage: API ${svc.url}/graphql · playground ${svc.url}/\n`);
      await untilSignalled(svc, logger);
      return 0;
    }
    case "worker": {
      const svc = await app().startService(config, logger, { api: false });
      logger.info("Stowage worker is running jobs", { worker: svc.runner.workerId });
      process.stdout.write(`Stowage worker: running jobs as ${svc.runner.workerId}\n`);
      await untilSignalled(svc, logger);
      return 0;
    }
    case "migrate": {
      const db = await app().openDatabase(config, logger);
      await db.close();
      process.stdout.write("migrations applied\n");
      return 0;
    }
    case "project": {
      if (rest[0] !== "create" || !rest[1]) {
        process.stderr.write("usage: stowage project create NAME\n");
        return 1;
      }
      const db = await app().openDatabase(config, logger);
      try {
        const { project, apiKey } = await servicesModule().createServices(db.ds).projects.create(rest[1]);
        process.stdout.write(`Created project "${project.name}". Its API key is shown only now:\n${apiKey}\n`);
      } finally {
        await db.close();
      }
      return 0;
    }
    case "demo": {
      const db = await app().openDatabase(config, logger);
      try {
        const services = servicesModule().createServices(db.ds);
        const key = await app().ensureDefaultProject(services, config.dataDir);
        if (key) process.stdout.write(`Created project "default". Its API key (also in ${path.join(config.dataDir, "default-api-key")}):\n${key}\n`);
        await runDemo(db.ds, config, services);
      } finally {
        await db.close();
      }
      return 0;
    }
    case "schema": {
      const sdl = (require("./graphql/schema") as typeof import("./graphql/schema")).printStowageSchema();
      if (rest.includes("--write")) {
        // The repository root: above src/, or above dist/src/ in a build.
        const root = [path.join(__dirname, ".."), path.join(__dirname, "..", "..")].find((d) => fs.existsSync(path.join(d, "package.json")))!;
        const file = path.join(root, "schema", "schema.graphql");
        fs.writeFileSync(file, sdl);
        process.stdout.write(`wrote ${path.relative(process.cwd(), file)}\n`);
      } else {
        process.stdout.write(sdl);
      }
      return 0;
    }
    default:
      process.stderr.write(`unknown command "${command}"\n\n${USAGE}\n`);
      return 1;
  }
}

async function runDemo(ds: import("typeorm").DataSource, config: import("./config").Config, services: import("./services").Services) {
  const { seedDemo } = require("./demo") as typeof import("./demo");
  const r = await seedDemo(ds, config, services);
  if (r) process.stdout.write(`Demo data added to project "default": ${r.servers} servers, ${r.disks} disks, ${r.policies} policies.\n`);
  else process.stdout.write(`Project "default" already has servers; no demo data added.\n`);
}

/** One line for the operator; a stack only for what looks like a bug. */
function describeError(err: unknown): string {
  if (err instanceof ConfigError) return `configuration error: ${err.message}`;
  if (err instanceof DomainError || err instanceof EmbeddedPostgresError) return err.message;
  const code = (err as { code?: unknown } | null)?.code;
  if (err instanceof Error && typeof code === "string") {
    // System errors (EADDRINUSE, EACCES, ECONNREFUSED…) and Postgres errors (28P01…).
    if (code === "EADDRINUSE" || code === "EADDRNOTAVAIL" || (code === "EACCES" && (err as { syscall?: string }).syscall === "listen")) {
      return `cannot listen on ${(err as { address?: string }).address ?? "HOST"}:${(err as { port?: number }).port ?? "PORT"}: ${err.message} (set ${(err as { settings?: string }).settings ?? "HOST or PORT"})`;
    }
    return `stowage: ${err.message || code}`;
  }
  return `stowage: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`;
}

/** Exits once stdout and stderr are flushed (they are asynchronous when piped on some platforms). */
function exitAfterFlush(code: number): void {
  let pending = 2;
  const done = () => {
    if (--pending === 0) process.exit(code);
  };
  process.stdout.write("", done);
  process.stderr.write("", done);
}

export function run(argv: string[]): void {
  main(argv).then(exitAfterFlush, (err) => {
    process.stderr.write(describeError(err) + "\n");
    exitAfterFlush(1);
  });
}

/** Waits for SIGTERM, SIGINT or SIGHUP, then stops the service in order. */
function untilSignalled(svc: { stop(): Promise<void> }, logger: import("./logger").Logger): Promise<void> {
  return new Promise<void>((resolve) => {
    let first = 0;
    const onSignal = (sig: NodeJS.Signals) => {
      if (first) {
        // `npm start` forwards the terminal's Ctrl-C, so one keypress can arrive
        // twice at once; only a later signal means "stop waiting".
        if (Date.now() - first < 500) return;
        logger.warn("second signal: exiting without waiting for shutdown", { signal: sig });
        process.exit(130);
      }
      first = Date.now();
      logger.info("shutting down", { signal: sig });
      svc.stop().then(resolve, (err) => {
        logger.error("shutdown failed", { error: err });
        resolve();
      });
    };
    process.on("SIGTERM", onSignal);
    process.on("SIGINT", onSignal);
    process.on("SIGHUP", onSignal);
  });
}

/** `stowage checksum FILE...`: the content checksum of raw, qcow2, vmdk or vhd files, to check a download against its image. */
async function checksumFiles(files: string[]): Promise<number> {
  if (!files.length) {
    process.stderr.write("usage: stowage checksum FILE...\n");
    return 1;
  }
  const formats = require("./formats") as typeof import("./formats");
  const { checksumOf } = require("./formats/checksum") as typeof import("./formats/checksum");
  let failed = 0;
  for (const file of files) {
    let fd: fs.promises.FileHandle | undefined;
    try {
      fd = await fs.promises.open(file, "r");
      const handle = fd;
      const size = (await handle.stat()).size;
      const src = {
        size,
        async read(offset: number, length: number) {
          const buf = Buffer.alloc(length);
          await handle.read(buf, 0, length, offset);
          return buf;
        },
      };
      const reader = await formats.openImage(await formats.detectFormat(src), src, { ...formats.DEFAULT_LIMITS, maxVirtualSize: Number.MAX_SAFE_INTEGER });
      process.stdout.write(`${await checksumOf(reader)}  ${file}\n`);
    } catch (err) {
      failed++;
      process.stderr.write(`stowage checksum: ${file}: ${err instanceof Error ? err.message : String(err)}\n`);
    } finally {
      await fd?.close();
    }
  }
  return failed ? 1 : 0;
}
