"""The HTTP surface: the webhook resource, its request limits and public-URL reconstruction."""
