/* The playground: GraphiQL whose requests carry the API key from the bar at the top,
   or an Authorization header from GraphiQL's Headers tab, which wins: as the
   Authorization header over HTTP and as connectionParams.authorization over graphql-ws.
   The key is read when a request goes out, so the Run that follows a paste uses it. */
(function () {
  var STORE = "stowage:api-key";
  var input = document.getElementById("api-key");
  var state = document.getElementById("key-state");
  // A value the browser filled in before this ran is kept.
  input.value = input.value || localStorage.getItem(STORE) || "";

  /** The key in force for a request: { authorization, source } or null. */
  function credentials(headers) {
    for (var name in headers || {}) {
      var value = headers[name] == null ? "" : String(headers[name]).trim();
      if (name.toLowerCase() === "authorization" && value) return { authorization: bearer(value), source: "headers" };
    }
    var key = input.value.trim();
    return key ? { authorization: bearer(key), source: "bar" } : null;
  }
  function bearer(value) {
    return /\s/.test(value) ? value : "Bearer " + value;
  }

  var WHERE = { bar: "in the bar", headers: "in the Headers tab" };
  function show(kind, text) {
    state.className = kind;
    state.textContent = text;
    input.setAttribute("aria-invalid", kind === "refused" ? "true" : "false");
  }
  function showMissing() {
    show("missing", "Paste an API key to query");
  }
  // Whether GraphiQL's last schema fetch failed for want of a good key.
  var schemaMissing = false;

  /** Shows what the service said of a key, unless the bar has changed since that request left. */
  function verdict(cred, accepted) {
    if (cred.source === "bar" && (credentials(null) || {}).authorization !== cred.authorization) return;
    // A key that works, given after the schema fetch failed (in the Headers tab, say), brings docs and completion.
    if (accepted && schemaMissing) {
      schemaMissing = false;
      render();
    }
    if (accepted) show("ok", "Key accepted" + (cred.source === "headers" ? " (from the Headers tab)" : ""));
    else show("refused", "The key " + WHERE[cred.source] + " was refused");
  }
  function refusedMessage(cred, how) {
    var fix = cred.source === "bar" ? "Paste a valid key into the bar at the top." : "Fix the Authorization header in the Headers tab, or remove it to use the key in the bar.";
    return "The API key " + WHERE[cred.source] + " was refused (" + how + "). " + fix;
  }
  /**
   * A refused key's GraphQL response, in the playground's words whichever request met it.
   * GraphiQL writes a failed schema fetch into the response pane when it answers, over what
   * a Run put there meanwhile: the schema fetch that a new key starts can answer after a Run
   * with that key was refused, and the service's own message then replaced the Run's.
   */
  function refusal(cred, how) {
    return { errors: [{ message: refusedMessage(cred, how), extensions: { code: "UNAUTHENTICATED" } }] };
  }

  /**
   * Whether the operation to run is a subscription, read from the text that is sent:
   * GraphiQL's parsed document can lag behind an edit run at once.
   */
  function isSubscription(params) {
    var text = (params.query || "").replace(/#[^\n\r]*/g, "");
    var named = params.operationName && new RegExp("\\b(query|mutation|subscription)\\s+" + params.operationName + "\\b").exec(text);
    var first = named || /^\s*(query|mutation|subscription)\b/.exec(text);
    return !!first && first[1] === "subscription";
  }

  function post(params, opts, cred) {
    var headers = { "content-type": "application/json", accept: "application/json" };
    var extra = (opts && opts.headers) || {};
    for (var name in extra) if (name.toLowerCase() !== "authorization") headers[name] = extra[name];
    headers.Authorization = cred.authorization;
    return fetch("/graphql", { method: "POST", headers: headers, body: JSON.stringify(params) }).then(
      function (res) {
        return res.json().then(
          function (body) {
            var errors = (body && body.errors) || [];
            var refused =
              res.status === 401 ||
              errors.some(function (e) {
                return e && e.extensions && e.extensions.code === "UNAUTHENTICATED";
              });
            if (params.operationName === "IntrospectionQuery") schemaMissing = !(body && body.data);
            if (refused || res.status < 500) verdict(cred, !refused);
            if (refused && !(body && body.data)) return refusal(cred, "the service answered " + (res.status === 401 ? "401 Unauthorized" : "UNAUTHENTICATED"));
            return body;
          },
          function () {
            return { errors: [{ message: "The service answered " + res.status + " " + res.statusText + " without a GraphQL response." }] };
          },
        );
      },
      function (err) {
        return { errors: [{ message: "Could not reach the service: " + err.message }] };
      },
    );
  }

  // One graphql-ws client, for the authorization it was opened with; another key opens another.
  var ws = null;
  function wsClient(cred) {
    if (ws && ws.authorization === cred.authorization) return ws.client;
    if (ws) ws.client.dispose();
    var proto = location.protocol === "https:" ? "wss:" : "ws:";
    var client = graphqlWs.createClient({
      url: proto + "//" + location.host + "/graphql",
      lazy: true,
      connectionParams: { authorization: cred.authorization },
      // The service closes a refused key's socket with 4403; the client's default retries
      // it five times over half a minute before giving up, and a retry changes nothing.
      shouldRetry: function (e) {
        return isCloseEvent(e) && e.code !== 4403;
      },
      on: {
        connected: function () {
          verdict(cred, true);
        },
        closed: function (e) {
          if (isCloseEvent(e) && e.code === 4403) verdict(cred, false);
        },
      },
    });
    ws = { authorization: cred.authorization, client: client };
    return client;
  }
  function isCloseEvent(e) {
    return !!e && typeof e === "object" && "code" in e && "reason" in e;
  }

  /** A subscription's failure as a GraphQL response, never a stack. */
  function failure(err, cred) {
    if (Array.isArray(err)) return { errors: err };
    if (isCloseEvent(err)) {
      if (err.code === 4403) return refusal(cred, "the WebSocket was closed with 4403 Forbidden");
      return { errors: [{ message: "The subscription's WebSocket closed: " + (err.code + " " + (err.reason || "")).trim() + "." }] };
    }
    if (err instanceof Error) return { errors: [{ message: err.message }] };
    return { errors: [{ message: "Could not open a WebSocket to the service." }] };
  }

  function subscribe(params, cred) {
    var client = wsClient(cred);
    return {
      subscribe: function (observer) {
        var stop = client.subscribe(params, {
          next: function (result) {
            observer.next(result);
          },
          error: function (err) {
            observer.next(failure(err, cred));
            observer.complete();
          },
          complete: function () {
            observer.complete();
          },
        });
        return { unsubscribe: stop };
      },
    };
  }

  function fetcher(params, opts) {
    var cred = credentials(opts && opts.headers);
    if (!cred) {
      if (params.operationName === "IntrospectionQuery") schemaMissing = true;
      showMissing();
      return Promise.resolve({
        errors: [{ message: "No API key: paste one into the bar at the top (npx stowage project create NAME prints one; the default project's is in .data/default-api-key)." }],
      });
    }
    return isSubscription(params) ? subscribe(params, cred) : post(params, opts, cred);
  }

  var defaultQuery = [
    "# Welcome to Stowage. Paste your API key above, then press the run button.",
    "query Overview {",
    "  viewer { name storage { backupCount imageCount logicalBytes storedBytes dedupRatio } }",
    "  servers(first: 10) {",
    "    totalCount",
    "    nodes {",
    "      id name status vcpus memoryMiB",
    "      disks { nodes { name device sizeBytes type } }",
    "      policies { nodes { name schedule nextRunAt } }",
    "    }",
    "  }",
    "}",
    "",
  ].join("\n");

  // GraphiQL fetches the schema again whenever it is given another fetcher; that is how
  // a new key brings docs and completion. It is never remounted: a remount under the
  // mouse swallowed the click on Run that followed a paste.
  var root = ReactDOM.createRoot(document.getElementById("graphiql"));
  function render() {
    root.render(
      React.createElement(GraphiQL, {
        fetcher: function (params, opts) {
          return fetcher(params, opts);
        },
        defaultQuery: defaultQuery,
        shouldPersistHeaders: false,
      }),
    );
  }

  var pending = null;
  input.addEventListener("input", function () {
    var key = input.value.trim();
    localStorage.setItem(STORE, key);
    if (key) show("", "");
    else showMissing();
    clearTimeout(pending);
    pending = setTimeout(render, 400);
  });

  if (!input.value.trim()) showMissing();
  render();
})();
