"""Talking to the OpenAI API ourselves (replays, judges), configured from the environment as the SDK is."""
