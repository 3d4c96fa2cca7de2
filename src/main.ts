import "reflect-metadata";
import fs from "node:fs";
import path from "node:path";
import { openDatabase, startService } from "./app";
import { ConfigError, loadConfig } from "./config";
import { seedDemo } from "./demo";
import { printStowageSchema } from "./graphql/schema";
import { createLogger } from "./logger";
import { createServices } from "./services";
import { DomainError } from "./services/errors";

const USAGE = `Usage: stowage <command>

Commands:
  serve [--demo]          serve the API on HOST:PORT (default 127.0.0.1:4000)
  migrate                 apply database migrations
  project create NAME     create a project and print its API key (last line)
  demo                    fill project "default" with servers, disks and policies
  schema [--write]        print the GraphQL SDL (or write schema/schema.graphql)

Configuration is read from the environment; see README.md.`;

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (!command || command === "help" || command === "--help" || command === "-h") {
    process.stdout.write(USAGE + "\n");
    return command ? 0 : 1;
  }
  const config = loadConfig();
  const logger = createLogger(config.logLevel);

  switch (command) {
    case "serve": {
      const svc = await startService(config, logger, {
        onDefaultKey: (key, file) => {
          process.stdout.write(`Created project "default". Its API key (also in ${file}):\n${key}\n`);
        },
      });
      if (rest.includes("--demo")) await runDemo(svc.db.ds, config, svc.services);
      logger.info("Stowage is serving", { url: `${svc.url}/graphql`, playground: `${svc.url}/` });
      process.stdout.write(`Stowage: API ${svc.url}/graphql · playground ${svc.url}/\n`);
      await new Promise<void>((resolve) => {
        let signals = 0;
        const onSignal = (sig: NodeJS.Signals) => {
          if (++signals > 1) process.exit(130); // a second signal: stop waiting
          logger.info("shutting down", { signal: sig });
          svc.stop().then(resolve, (err) => {
            logger.error("shutdown failed", { error: err });
            resolve();
          });
        };
        process.on("SIGTERM", onSignal);
        process.on("SIGINT", onSignal);
      });
      return 0;
    }
    case "migrate": {
      const db = await openDatabase(config, logger);
      await db.close();
      process.stdout.write("migrations applied\n");
      return 0;
    }
    case "project": {
      if (rest[0] !== "create" || !rest[1]) {
        process.stderr.write("usage: stowage project create NAME\n");
        return 1;
      }
      const db = await openDatabase(config, logger);
      try {
        const { project, apiKey } = await createServices(db.ds).projects.create(rest[1]);
        process.stdout.write(`Created project "${project.name}". Its API key is shown only now:\n${apiKey}\n`);
      } finally {
        await db.close();
      }
      return 0;
    }
    case "demo": {
      const db = await openDatabase(config, logger);
      try {
        const services = createServices(db.ds);
        if ((await services.projects.count()) === 0) {
          const { apiKey } = await services.projects.create("default");
          const file = path.join(config.dataDir, "default-api-key");
          fs.mkdirSync(config.dataDir, { recursive: true });
          fs.writeFileSync(file, apiKey + "\n", { mode: 0o600 });
          process.stdout.write(`Created project "default". Its API key (also in ${file}):\n${apiKey}\n`);
        }
        await runDemo(db.ds, config, services);
      } finally {
        await db.close();
      }
      return 0;
    }
    case "schema": {
      const sdl = printStowageSchema();
      if (rest.includes("--write")) {
        const file = path.join(__dirname, "..", "schema", "schema.graphql");
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
  const r = await seedDemo(ds, config, services);
  process.stdout.write(`Demo data added to project "default": ${r.servers} servers, ${r.disks} disks, ${r.policies} policies.\n`);
}

export function run(argv: string[]): void {
  main(argv).then(
    (code) => process.exit(code),
    (err) => {
      if (err instanceof ConfigError) process.stderr.write(`configuration error: ${err.message}\n`);
      else if (err instanceof DomainError) process.stderr.write(`${err.message}\n`);
      else process.stderr.write(`stowage: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`);
      process.exit(1);
    },
  );
}
