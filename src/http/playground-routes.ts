import fs from "node:fs";
import path from "node:path";
import express from "express";

/** The playground's files, served from the installed packages (no CDN). */
const PLAYGROUND_FILES: Record<string, [pkg: string, file: string]> = {
  "graphiql.min.css": ["graphiql", "graphiql.min.css"],
  "graphiql.min.js": ["graphiql", "graphiql.min.js"],
  "react.production.min.js": ["react", "umd/react.production.min.js"],
  "react-dom.production.min.js": ["react-dom", "umd/react-dom.production.min.js"],
  "graphql-ws.min.js": ["graphql-ws", "umd/graphql-ws.min.js"],
};

/** A package's root folder, found from its entry point (packages' exports hide their other files). */
function packageDir(name: string): string {
  let dir = path.dirname(require.resolve(name));
  while (!fs.existsSync(path.join(dir, "package.json")) || JSON.parse(fs.readFileSync(path.join(dir, "package.json"), "utf8")).name !== name) {
    const up = path.dirname(dir);
    if (up === dir) throw new Error(`cannot find the folder of package ${name}`);
    dir = up;
  }
  return dir;
}

/** GraphiQL at `/`, with its scripts under /playground/. */
export function playgroundRoutes(): express.Router {
  const router = express.Router();
  const playgroundDir = path.join(__dirname, "playground");
  router.get("/", (_req, res) => {
    res.setHeader("Content-Security-Policy", "default-src 'self'; connect-src 'self' ws: wss:; style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:");
    res.sendFile(path.join(playgroundDir, "index.html"));
  });
  router.get("/playground/playground.js", (_req, res) => res.sendFile(path.join(playgroundDir, "playground.js")));
  for (const [name, [pkg, rel]] of Object.entries(PLAYGROUND_FILES)) {
    const file = path.join(packageDir(pkg), rel);
    router.get(`/playground/${name}`, (_req, res) => res.sendFile(file, { maxAge: "1h" }));
  }
  return router;
}
