// The TypeScript MCP SDK's client against todo-api's /mcp: connects with the bearer header (MCP_TOKEN), lists the
// tools, adds a task, and prints one JSON line for tests/test_mcp.py to check.
//   MCP_TOKEN=... node client.mjs http://127.0.0.1:8000/mcp
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const url = process.argv[2];
const token = process.env.MCP_TOKEN;
if (!url || !token) {
  console.error("usage: MCP_TOKEN=<jwt> node client.mjs <url of /mcp>");
  process.exit(2);
}

const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: { Authorization: `Bearer ${token}` } },
});
const client = new Client({ name: "todo-api-ts-test", version: "1.0.0" });
await client.connect(transport);
const { tools } = await client.listTools();
const added = await client.callTool({ name: "add_task", arguments: { title: "Added from TypeScript", tags: ["ts"] } });
const failed = await client.callTool({ name: "get_task", arguments: { task_id: "not-a-uuid" } });
await client.close();
console.log(JSON.stringify({
  protocolVersion: transport.protocolVersion,
  server: client.getServerVersion(),
  tools: tools.map((tool) => tool.name),
  added,
  failed,
}));
