"""`nanoseek serve`: an OpenAI-compatible API server with continuous batching and a web chat page.

    nanoseek serve --model runs/sft                                  # http://127.0.0.1:8000
    NANOSEEK_API_KEY=sk-... nanoseek serve --model runs/sft --host 0.0.0.0 \\
        --ssl-certfile cert.pem --ssl-keyfile key.pem

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-...")
    client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "2+2?"}])

api.py speaks HTTP over the inference core's scheduler (nanoseek.inference.scheduler: continuous
batching, prefix cache, MTP speculation); static/index.html is the chat page.
FastAPI and uvicorn are imported only by api.py (the command lives in nanoseek/cli/serve.py).
"""
