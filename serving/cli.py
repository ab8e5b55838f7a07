"""``draftdistill serve ...``: the embedded speculative server, optionally learning from its traffic."""
from __future__ import annotations

import threading

import click

from draftdistill.decoding_options import tree_config, tree_options

DEFAULT_TARGET = "smollm2-135m-instruct"


@click.group()
def serve():
    """Serve a target with a drafter (lossless speculative decoding), and distil the drafter online."""


@serve.command("embedded")
@click.option("--target", default=DEFAULT_TARGET, show_default=True, help="Target model (builtin name, HF dir, .gguf).")
@click.option("--drafter", default="pruned:2", show_default=True,
              help="Drafter: pruned:K, small:..., or a trained drafter dir.")
@click.option("--port", default=8000, show_default=True, help="Port on 127.0.0.1 (loopback only).")
@click.option("--gamma", default=4, show_default=True, help="Draft tokens proposed per target forward.")
@tree_options
@click.option("--online/--no-online", default=False, show_default=True,
              help="Distil the drafter from the served traffic in the background and hot-swap it (gated).")
@click.option("--divergence", default="fkl", show_default=True,
              help="Online loss (any registry spec, e.g. jsd:beta=0.5).")
@click.option("--rejected-only", is_flag=True, help="OSD: online loss only where the served drafter would be rejected.")
@click.option("--lr", default=3e-4, show_default=True, help="Online learning rate.")
@click.option("--update-every", default=16, show_default=True, help="New requests needed before each update.")
@click.option("--window", default=16, show_default=True,
              help="Requests a new draft version serves before it is kept or rolled back.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--max-tokens-limit", default=4096, show_default=True, type=click.IntRange(min=1),
              help="Largest max_tokens a request may ask for (400 above it); prompt + max_tokens must also fit "
                   "the models' context (max_position_embeddings).")
@click.option("--max-body-bytes", default=1 << 20, show_default=True, type=click.IntRange(min=1),
              help="Largest request body accepted (413 above it, refused before it is read).")
@click.option("--read-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds a client gets to send a whole request (headers and body; a slow or short body gets "
                   "408 or a closed connection), and to take the reply.")
@click.option("--request-timeout", default=300.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Wall-clock seconds one generation may take, waiting for the engine included; past it the "
                   "generation stops between decode rounds and the client gets 503.")
@click.option("--max-pending", default=16, show_default=True, type=click.IntRange(min=1),
              help="Generations running or waiting for the engine at once; more get 503 with Retry-After.")
@click.option("--max-connections", default=256, show_default=True, type=click.IntRange(min=1),
              help="Connections served at once; more get 503 straight away.")
@click.option("--backlog", default=128, show_default=True, type=click.IntRange(min=1),
              help="Listen backlog: connections the kernel queues before the server accepts them.")
@click.option("--control-token", default=None, envvar="DRAFTDISTILL_CONTROL_TOKEN", show_envvar=True,
              help="When set, POST /control/weights also needs 'Authorization: Bearer TOKEN' (401 otherwise). "
                   "Prefer the environment variable: a command line is visible to other local users.")
def serve_embedded(target, drafter, port, gamma, tree_depth, tree_top_k, tree_max_nodes, online, divergence,
                   rejected_only, lr, update_every, window, device, max_tokens_limit, max_body_bytes, read_timeout,
                   request_timeout, max_pending, max_connections, backlog, control_token):
    """Start the embedded server: POST /v1/completions, GET /health and /metrics, POST /control/weights.

    Every request is bounded (size, read time, tokens, generation time, queue) and every refusal is
    one line in the log; /control/weights only takes JSON from a loopback Host and Origin."""
    import logging

    from draftdistill.data import stop_token_ids
    from draftdistill.models import default_device, load_drafter, load_target, require_lm_drafter

    from .embedded import EmbeddedSpecServer
    from .http_api import Limits, make_http_server
    from .online import OnlineConfig, OnlineDistiller

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    device = device or default_device()
    target_model, tokenizer = load_target(target, device=device)
    drafter_model = load_drafter(drafter, target_model, tokenizer)
    if online:
        require_lm_drafter(drafter_model, "--online")
    engine = EmbeddedSpecServer(target_model, drafter_model, tokenizer, gamma=gamma,
                                tree=tree_config(tree_depth, tree_top_k, tree_max_nodes),
                                eos_token_id=stop_token_ids(tokenizer, target_model))
    limits = Limits(max_tokens=max_tokens_limit, max_body_bytes=max_body_bytes, read_timeout=read_timeout,
                    request_timeout=request_timeout, max_pending=max_pending, max_connections=max_connections,
                    backlog=backlog, control_token=control_token or None)
    server = make_http_server(engine, port, limits=limits)
    stop = threading.Event()
    if online:
        distiller = OnlineDistiller(engine, drafter_model,
                                    OnlineConfig(divergence=divergence, rejected_only=rejected_only,
                                                 lr=lr, update_every=update_every, window=window))
        distiller.run_in_background(stop)
    click.echo(f"serving on http://127.0.0.1:{server.server_address[1]} "
               f"(online distillation {'on' if online else 'off'})")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        server.server_close()


@serve.command("attach")
@click.option("--server", required=True, help="URL of a live SGLang server, e.g. http://127.0.0.1:30000.")
@click.option("--drafter", required=True,
              help="The draft model the server runs (an HF dir; the same one as --speculative-draft-model-path).")
@click.option("--target", default=DEFAULT_TARGET, show_default=True,
              help="The server's target, loaded here only for its tokenizer check and shared tensors.")
@click.option("--log-dir", default=None,
              help="The server's JSON request-log folder (default: asked from /server_info).")
@click.option("--divergence", default="topk_tail:k=20,base=fkl", show_default=True,
              help="Online loss; the server returns top-k teacher log-probs, so a top-k divergence fits.")
@click.option("--top-k", default=20, show_default=True, help="Teacher top-k log-probs requested per position.")
@click.option("--lr", default=3e-4, show_default=True, help="Online learning rate.")
@click.option("--update-every", default=16, show_default=True, help="New requests needed before each update.")
@click.option("--window", default=16, show_default=True,
              help="Requests a new draft version serves before it is kept or rolled back.")
@click.option("--interval", default=1.0, show_default=True, help="Seconds between distiller steps.")
def serve_attach(server, drafter, target, log_dir, divergence, top_k, lr, update_every, window, interval):
    """Attach the online distiller to a live SGLang server: learn the drafter from its request log,
    push gated draft versions with selector "draft". Server errors are retried and counted, never fatal."""
    import time

    from draftdistill.models import load_drafter, load_target, require_lm_drafter

    from .online import OnlineConfig, OnlineDistiller
    from .sglang_backend import SGLangBackend
    from .sglang_client import SGLangClient

    target_model, tokenizer = load_target(target, device="cpu")
    drafter_model = load_drafter(drafter, target_model, tokenizer)  # refuses a different tokenizer first
    require_lm_drafter(drafter_model, "serve attach")
    backend = SGLangBackend(SGLangClient(server), log_dir, top_k=top_k, shared_with_target=target_model.state_dict())
    distiller = OnlineDistiller(backend, drafter_model, OnlineConfig(divergence=divergence, lr=lr,
                                                                     update_every=update_every, window=window))
    click.echo(f"attached to {server}; press Ctrl-C to stop")
    try:
        while True:
            metrics = distiller.step()
            if metrics:
                click.echo(f"{time.strftime('%H:%M:%S')} {metrics} counters={distiller.counters}")
            time.sleep(interval)
    except KeyboardInterrupt:
        click.echo(f"stopped; history: {distiller.history[-5:]}")
