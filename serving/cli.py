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
@click.option("--drafter", default="pruned:2", show_default=True, help="Drafter: pruned:K, small:..., or a trained drafter dir.")
@click.option("--port", default=8000, show_default=True, help="Port on 127.0.0.1 (loopback only).")
@click.option("--gamma", default=4, show_default=True, help="Draft tokens proposed per target forward.")
@tree_options
@click.option("--online/--no-online", default=False, show_default=True,
              help="Distil the drafter from the served traffic in the background and hot-swap it (gated).")
@click.option("--divergence", default="fkl", show_default=True, help="Online loss (any registry spec, e.g. jsd:beta=0.5).")
@click.option("--rejected-only", is_flag=True, help="OSD: online loss only where the served drafter would be rejected.")
@click.option("--lr", default=3e-4, show_default=True, help="Online learning rate.")
@click.option("--update-every", default=16, show_default=True, help="New requests needed before each update.")
@click.option("--window", default=16, show_default=True,
              help="Requests a new draft version serves before it is kept or rolled back.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
def serve_embedded(target, drafter, port, gamma, tree_depth, tree_top_k, tree_max_nodes, online, divergence, rejected_only, lr, update_every, window, device):
    """Start the embedded server: POST /v1/completions, GET /health and /metrics, POST /control/weights."""
    from draftdistill.data import stop_token_ids
    from draftdistill.models import default_device, load_drafter, load_target, require_lm_drafter

    from .embedded import EmbeddedSpecServer
    from .http_api import make_http_server
    from .online import OnlineConfig, OnlineDistiller

    device = device or default_device()
    target_model, tokenizer = load_target(target, device=device)
    drafter_model = load_drafter(drafter, target_model, tokenizer)
    if online:
        require_lm_drafter(drafter_model, "--online")
    engine = EmbeddedSpecServer(target_model, drafter_model, tokenizer, gamma=gamma,
                                tree=tree_config(tree_depth, tree_top_k, tree_max_nodes),
                                eos_token_id=stop_token_ids(tokenizer, target_model))
    server = make_http_server(engine, port)
    stop = threading.Event()
    if online:
        distiller = OnlineDistiller(engine, drafter_model, OnlineConfig(divergence=divergence, rejected_only=rejected_only,
                                                                         lr=lr, update_every=update_every, window=window))
        distiller.run_in_background(stop)
    click.echo(f"serving on http://127.0.0.1:{server.server_address[1]} (online distillation {'on' if online else 'off'})")
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
@click.option("--log-dir", default=None, help="The server's JSON request-log folder (default: asked from /server_info).")
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
