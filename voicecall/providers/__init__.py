"""Carrier adapters: REST clients, webhook verification and parsing, response bodies."""
