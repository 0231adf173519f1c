"""``modelc serve``: an OpenAI-compatible HTTP server over the runtime, with in-flight batching.

protocol.py parses and checks requests and shapes responses; text.py turns generated ids into
streamed text with stop strings; slots.py runs the batch's forward passes over a shared KV cache;
scheduler.py admits, steps and retires requests; ranks.py replays the steps on the other ranks of
an ``mpirun`` job. The engine and HTTP run in two processes (server.py): app.py is the ASGI app,
run by frontend.py in its own process over link.py's pipe to the engine process; command.py is
the click command that starts it all.
"""
