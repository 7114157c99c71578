"""Scoring responses: the built-in verifiable rewards, the worker pool that runs user rewards, and
the runner that combines them for one step."""
