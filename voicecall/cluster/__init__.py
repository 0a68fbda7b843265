"""Many nodes on one shared store: node registry, heartbeats, forwarding to a call's owner, adoption."""
