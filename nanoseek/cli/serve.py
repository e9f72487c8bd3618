"""`nanoseek serve`: an OpenAI-compatible API server with continuous batching and a web chat page.

    nanoseek serve --model runs/sft                                  # http://127.0.0.1:8000
    nanoseek serve --model runs/sft --speculative off                # no MTP drafts (auto: when the model has an MTP module)
    NANOSEEK_API_KEY=sk-... nanoseek serve --model runs/sft --host 0.0.0.0 \\
        --ssl-certfile cert.pem --ssl-keyfile key.pem

The work: nanoseek.serve.api (HTTP) over nanoseek.inference.scheduler (the model's thread).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..hf.io import parse_size
from .flags import add_inference_flags, add_speculative_flag, load_engine, speculative_mode


def run(args) -> int:
    import uvicorn

    from ..inference.scheduler import Scheduler
    from ..serve.api import check_listen, create_app
    from ..serve.middleware import with_header_timeout

    api_key = args.api_key or os.environ.get("NANOSEEK_API_KEY") or None
    check_listen(args.host, api_key)
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise ValueError("--ssl-certfile and --ssl-keyfile go together")
    engine = load_engine(args)
    name = args.served_model_name or Path(args.model).resolve().name
    budget = kv_cache_budget(args.kv_cache_memory, engine.device)
    scheduler = Scheduler(engine, max_batch=args.max_batch, queue_size=args.queue_size,
                          prefix_cache_bytes=int(args.prefix_cache_mb * 2**20), block=args.page_size,
                          context=args.context, speculative=speculative_mode(args, engine), kv_cache_bytes=budget,
                          max_batched_tokens=args.max_num_batched_tokens,
                          chunk_cost=args.prefill_chunk_cost).start()
    print(f"nanoseek serve: KV cache {budget / 2**30:.2f} GiB = {scheduler.batch.cache.capacity:,} tokens "
          f"in pages of {args.page_size}, context {scheduler.context:,}")
    import logging
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the serve log lines are JSON
    app = create_app(scheduler, name, api_key=api_key, log_requests=args.log_requests,
                     max_request_bytes=args.max_request_bytes, body_timeout=args.body_timeout,
                     ignore_unknown_fields=args.ignore_unknown_fields,
                     cors_origins=[o for o in (args.cors_origins or "").split(",") if o],
                     default_thinking_budget=args.max_thinking_tokens,
                     allow_remote_images=args.allow_remote_images)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM/SIGINT: refuse new work at once, then drain
            app.state.server.draining = True
            super().handle_exit(sig, frame)
    scheme = "https" if args.ssl_certfile else "http"
    print(f"nanoseek serve: {name} ({engine.model.num_params():,} parameters) on {scheme}://{args.host}:{args.port}"
          f" — API at /v1, chat page at /{', API key required' if api_key else ''}")
    try:
        Server(uvicorn.Config(app, host=args.host, port=args.port, ssl_certfile=args.ssl_certfile,
                              ssl_keyfile=args.ssl_keyfile, log_level="warning",
                              http=with_header_timeout(args.header_timeout),
                              timeout_graceful_shutdown=args.shutdown_timeout)).run()
    finally:
        scheduler.stop(timeout=args.shutdown_timeout)
    return 0


def kv_cache_budget(size: str | None, device) -> int:
    """--kv-cache-memory in bytes; by default 1 GiB on a CPU, 90% of what is free on a GPU once the
    weights are loaded."""
    if size is not None:
        return parse_size(size, "--kv-cache-memory")
    if device.type == "cuda":
        import torch
        return int(0.9 * torch.cuda.mem_get_info(device)[0])
    return 1 << 30


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible API server + web chat (continuous batching, prefix cache)")
    p.add_argument("--model", required=True, help="checkpoint folder (config.json, safetensors, tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything beyond loopback needs an API key")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--api-key", default=None,
                   help="required as 'Authorization: Bearer KEY' everywhere but / and /health "
                        "(default: $NANOSEEK_API_KEY)")
    p.add_argument("--ssl-certfile", default=None, help="TLS certificate (PEM); serves https with --ssl-keyfile")
    p.add_argument("--ssl-keyfile", default=None, help="TLS private key (PEM)")
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: the folder name)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    p.add_argument("--queue-size", type=int, default=64, help="requests that may wait for a slot; more get 429")
    p.add_argument("--context", type=int, default=None,
                   help="most tokens per request, prompt + completion (default: the model's max_position_embeddings)")
    p.add_argument("--kv-cache-memory", default=None,
                   help="bytes of the paged latent cache all requests share, e.g. 2GB (default: 1GB on a CPU, "
                        "90%% of free GPU memory); server memory is the weights plus this, whatever the context")
    p.add_argument("--page-size", type=int, default=16, help="tokens per cache page (and per prefix-cache block)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="tokens per step, decode rows + prefill chunks: a long prompt is prefilled in chunks "
                        "while the other requests keep streaming")
    p.add_argument("--prefill-chunk-cost", type=float, default=None,
                   help="size prefill chunks by time instead: each adds about this many decode steps to the "
                        "streaming requests' token gaps (measured; smoother streams, slower time to first token)")
    add_speculative_flag(p)
    p.add_argument("--prefix-cache-mb", type=float, default=256, help="memory for cached prompt latents (0: off)")
    add_inference_flags(p)
    p.add_argument("--log-requests", action="store_true",
                   help="log each request's prompt and completion (off: nothing of them is logged)")
    p.add_argument("--max-request-bytes", type=int, default=4 << 20,
                   help="largest request body; a bigger one is a 413 before it is read")
    p.add_argument("--body-timeout", type=float, default=30, help="seconds a request body may take to arrive (408)")
    p.add_argument("--header-timeout", type=float, default=10,
                   help="seconds a connection may take to send its request headers (slowloris)")
    p.add_argument("--shutdown-timeout", type=float, default=10,
                   help="on SIGTERM: seconds running requests may take before they are cancelled")
    p.add_argument("--ignore-unknown-fields", action="store_true",
                   help="ignore request fields the server does not implement (default: a 400 naming them)")
    p.add_argument("--cors-origins", default=None,
                   help="comma-separated origins allowed to call the API from a browser (default: none)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image_url parts (default: only data: URLs are accepted)")
    p.add_argument("--max-thinking-tokens", type=int, default=None,
                   help="default reasoning budget: after this many thinking tokens the model must close </think>")
    p.set_defaults(func=run)
