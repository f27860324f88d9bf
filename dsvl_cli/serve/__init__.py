"""`dsvl serve`: an OpenAI-compatible chat-completions server over `ChatSession` (see server.py)."""
