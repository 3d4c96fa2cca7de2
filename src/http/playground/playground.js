/* The playground: GraphiQL with the API key sent as the Authorization header on
   HTTP requests and as connectionParams.authorization on graphql-ws. */
(function () {
  var KEY = "stowage:api-key";
  var input = document.getElementById("api-key");
  var state = document.getElementById("key-state");
  input.value = localStorage.getItem(KEY) || "";

  function authorization() {
    var key = input.value.trim();
    return key ? "Bearer " + key : undefined;
  }

  var wsClient = null;
  function connect() {
    if (wsClient) wsClient.dispose();
    var proto = location.protocol === "https:" ? "wss:" : "ws:";
    wsClient = graphqlWs.createClient({
      url: proto + "//" + location.host + "/graphql",
      lazy: true,
      connectionParams: function () {
        return { authorization: authorization() };
      },
    });
  }
  connect();

  var fetcher;
  function makeFetcher() {
    var inner = GraphiQL.createFetcher({ url: "/graphql", wsClient: wsClient });
    fetcher = function (params, opts) {
      var headers = Object.assign({}, (opts && opts.headers) || {});
      var auth = authorization();
      if (auth && !headers.Authorization && !headers.authorization) headers.Authorization = auth;
      return inner(params, Object.assign({}, opts, { headers: headers }));
    };
  }

  function refresh() {
    localStorage.setItem(KEY, input.value.trim());
    state.textContent = input.value.trim() ? "" : "enter a key to query";
    connect();
    makeFetcher();
    render();
  }
  input.addEventListener("change", refresh);

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

  var root = ReactDOM.createRoot(document.getElementById("graphiql"));
  function render() {
    root.render(
      React.createElement(GraphiQL, {
        key: input.value.trim(),
        fetcher: fetcher,
        defaultQuery: defaultQuery,
        shouldPersistHeaders: false,
      }),
    );
  }
  state.textContent = input.value.trim() ? "" : "enter a key to query";
  makeFetcher();
  render();
})();
