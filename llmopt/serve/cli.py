"""``llmopt serve``: the OpenAI-compatible HTTP server (registered by ``llmopt/cli.py``).

Heavy imports (torch, fastapi, uvicorn) happen inside the function so ``llmopt --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmopt.models.registry import DEFAULT_MODEL
from llmopt.serve.config import LOOPBACK_HOSTS as _LOOPBACK


def serve_command(
    model: Annotated[str, typer.Argument(help="registry name (see `llmopt models`), Hugging Face directory or "
                                              ".gguf file")] = DEFAULT_MODEL,
    host: Annotated[str, typer.Option(help="address to bind (loopback by default; use --api-key if you "
                                           "open it up)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port", min=0, max=65535)] = 8000,
    quant: Annotated[Optional[str], typer.Option(help="quantize on load: int8, int4, ... (RTN); fp32: float (a .gguf dequantized); default: as stored (a .gguf runs on its own blocks)")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="LoRA adapter merged at load (`llmopt train`'s OUT/adapter.safetensors)")] = None,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32",
    api_key: Annotated[Optional[str], typer.Option(envvar="LLMOPT_API_KEY", help="require 'Authorization: "
                                                   "Bearer KEY' on every /v1 route (401 otherwise)")] = None,
    served_model_name: Annotated[Optional[str], typer.Option(help="the model id clients send (default: MODEL)")]
    = None,
    max_num_seqs: Annotated[int, typer.Option(help="most sequences decoded together", min=1)] = 64,
    max_num_batched_tokens: Annotated[int, typer.Option(help="token budget of one engine step: a long prompt "
                                                             "is prefilled in chunks of what running streams "
                                                             "leave of it, so smaller keeps streams flowing",
                                                        min=1)] = 512,
    max_model_len: Annotated[Optional[int], typer.Option(help="context window (default: the model's, at most "
                                                         "8192)", min=2)] = None,
    kv_cache_gb: Annotated[float, typer.Option(help="memory for the paged KV cache (GiB)", min=0.0)] = 2.0,
    num_threads: Annotated[Optional[int], typer.Option(help="torch threads (default: all cores)", min=1)] = None,
    kv_policy: Annotated[str, typer.Option(help="KV policy: full, streaming, snapkv, h2o (free blocks) or quest (sparse reads) "
                                                "(docs/long_context.md); a request may override it")] = "full",
    kv_budget: Annotated[Optional[str], typer.Option(help="KV budget with --kv-policy: a fraction of the prompt "
                                                          "(0.25) or a token count (2048)")] = None,
    kv_dtype: Annotated[Optional[str], typer.Option(help="KV cache element type: float16 (half the bytes of a float32 cache), int8 or fp8 "
                                                        "(e4m3) (default: the model's "
                                                        "dtype; docs/long_context.md)")] = None,
    difficulty_probe: Annotated[Optional[str], typer.Option(help="difficulty probe file for requests with "
                                                                 "difficulty_exit (`llmopt train probe`; default: the "
                                                                 "model's own, if it ships one)")] = None,
    kv_quest_pin: Annotated[float, typer.Option(help="quest: the fraction of each decode step's block budget pinned to the blocks the prompt's last 32 tokens attended to most (0.25 measured best; 0 = plain Quest; docs/long_context.md 2b)", min=0.0, max=1.0)] = 0.0,
    speculative: Annotated[str, typer.Option(help="speculative decoding of greedy requests: 'ngram' (drafts looked up "
                                                  "in the prompt and output, checked in the same step: the same "
                                                  "tokens, fewer steps) or 'off'")] = "off",
    num_speculative_tokens: Annotated[int, typer.Option(help="with --speculative ngram: most draft tokens per "
                                                             "sequence and step", min=1, max=16)] = 3,
    max_queue: Annotated[int, typer.Option(help="sequences that may wait beyond --max-num-seqs; more get 503 "
                                                "with Retry-After", min=0)] = 64,
    request_timeout: Annotated[float, typer.Option(help="seconds a request may take before it is aborted "
                                                        "(504)", min=0.001)] = 600.0,
    shutdown_timeout: Annotated[float, typer.Option(help="on SIGTERM, seconds to let running requests finish "
                                                         "before they are cancelled", min=0.0)] = 30.0,
    reasoning_parser: Annotated[Optional[str], typer.Option(help="'think': return <think>...</think> of chat "
                                                            "answers as reasoning_content")] = None,
    allowed_host: Annotated[Optional[list[str]], typer.Option(help="a Host header name to accept (repeat for "
                                                               "more); default on loopback: localhost, "
                                                               "127.0.0.1, ::1; elsewhere: any")] = None,
    header_timeout: Annotated[float, typer.Option(help="seconds a client has to send a request's headers "
                                                       "(slower connections are closed)", min=0.1)] = 10.0,
    body_timeout: Annotated[float, typer.Option(help="seconds a client has to send a request body (408 after)",
                                                min=0.1)] = 30.0,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
    replicas: Annotated[int, typer.Option(help="engine replicas (Ray actors) behind this endpoint, routed by "
                                               "prompt prefix; > 1 needs pip install 'llmopt\\[ray]' "
                                               "(docs/scale.md)", min=1)] = 1,
    ray: Annotated[Optional[str], typer.Option("--ray", metavar="ADDRESS",
                                               help="run the replicas on this Ray cluster: 'local' (default "
                                                    "with --replicas > 1), 'auto' or the head's HOST:PORT")]
    = None,
):
    """Serve MODEL over the OpenAI HTTP API (/v1/completions, /v1/chat/completions, /v1/models,
    /health, /metrics)."""
    import logging
    import signal
    import sys

    import uvicorn

    from llmopt.config import EngineConfig, parse_kv_budget, parse_speculative
    from llmopt.engine.engine import LLMEngine
    from llmopt.serve.app import ServeConfig, create_app
    from llmopt.serve.connections import uvicorn_config, warm_up

    use_ray = replicas > 1 or ray is not None
    if use_ray:
        from llmopt.distributed.cluster import require_ray

        require_ray()  # before anything slow: a missing extra is named at once
    if reasoning_parser not in (None, "think"):
        raise ValueError(f"--reasoning-parser must be 'think', got {reasoning_parser!r}")
    if quant:
        import importlib.util

        if importlib.util.find_spec("llmopt.quant.linear") is None:
            raise ValueError(f"--quant {quant}: quantize-on-load is not available in this build "
                             "(llmopt.quant.linear is missing); serve an already quantized GGUF instead")
    if host not in _LOOPBACK and not api_key:
        logging.getLogger(__name__).warning("binding %s without --api-key: anyone who can reach it can use it", host)
    cfg = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                       kv_cache_memory_gb=kv_cache_gb, max_model_len=max_model_len, num_threads=num_threads,
                       dtype=dtype, kv_policy=kv_policy, kv_budget=parse_kv_budget(kv_budget),
                       kv_dtype=kv_dtype, kv_quest_pin=kv_quest_pin,
                       speculative=parse_speculative(speculative), num_speculative_tokens=num_speculative_tokens,
                       difficulty_probe=difficulty_probe)
    cluster, backend = None, None
    if use_ray:
        from llmopt.distributed.cluster import connect
        from llmopt.distributed.replicas import ReplicaSet, ReplicaView

        cluster = connect(ray or "local")
        threads = num_threads or max(1, min(max(cluster.node_cpus), cluster.cpus // replicas))
        cfg.num_threads = threads
        print(f"llmopt serve: starting {replicas} replicas x {threads} threads of {model} on Ray "
              f"({cluster.address}, {cluster.nodes} node(s), {cluster.cpus} CPUs) ...", file=sys.stderr, flush=True)
        backend = ReplicaSet(model, cfg, quant, replicas, threads)
        engine = ReplicaView(model, backend)
    else:
        print(f"llmopt serve: loading {model} ...", file=sys.stderr, flush=True)
        engine = LLMEngine(model, cfg, quant=quant, adapter=str(adapter) if adapter is not None else None)
        warm_up(engine)
    names = [served_model_name or model] + ([model] if served_model_name and served_model_name != model else [])
    hosts = tuple(allowed_host) if allowed_host else (_LOOPBACK if host in _LOOPBACK else None)
    app = create_app(engine, ServeConfig(model_names=names, api_key=api_key, max_queue=max_queue,
                                         request_timeout=request_timeout, reasoning_parser=reasoning_parser,
                                         body_timeout=body_timeout, allowed_hosts=hosts), backend)
    server_state = app.state.server

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:  # SIGTERM / SIGINT: stop taking requests first
            server_state.loop.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn_config(app, host=host, port=port, header_timeout=header_timeout, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout, access_log=log_level == "debug")
    # uvicorn re-raises the signal it handled once it has shut down; with these handlers that is a no-op,
    # so a graceful SIGTERM ends the process with exit code 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    print(f"llmopt serve: {names[0]} on http://{host}:{port}/v1 (context {server_state.context_len} tokens, "
          f"{engine.block_manager.num_blocks} KV blocks)", file=sys.stderr, flush=True)
    try:
        Server(config).run()
    finally:
        if backend is not None:
            backend.stop()
        if cluster is not None:
            cluster.shutdown()
    print("llmopt serve: stopped", file=sys.stderr, flush=True)
