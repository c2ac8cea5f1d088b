"""The HTTP server (`qatserve serve`): OpenAI- and llama.cpp-compatible routes over the AsyncEngine.

Nothing is imported here, so building the CLI parser stays cheap; see launch.py for the start-up
order and app.py for the application.
"""
