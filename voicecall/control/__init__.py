"""
The control surfaces: the JSON-RPC server (rpc), the admin CLI (cli, doctor), the agent
tool schema (tool), tunnel helpers (expose) and the Prometheus endpoint (metrics).
"""
