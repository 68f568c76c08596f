"""The ``batchery`` command. Worker and training subcommands import the worker lazily; what
talks to Redis loads after ``main`` has set its Ctrl-C handler (see ``producer.stopping``)."""

from __future__ import annotations

import signal
import threading

# A Ctrl-C while this module's imports load is noted, not raised: raised inside an import,
# CPython may drop it or turn it into another error (a TypeError out of ssl's, seen in CI).
# main() then exits 130 at once. The previous handler is back once the imports are done.
_interrupted_loading = threading.Event()
_before = (
    signal.signal(signal.SIGINT, lambda signum, frame: _interrupted_loading.set())
    if threading.current_thread() is threading.main_thread()
    else None
)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

from producer.errors import BatcheryError, ConfigError  # noqa: E402
from producer.registry import PROMOTED_FILE, ModelInfo, Registry  # noqa: E402
from producer.settings import Settings  # noqa: E402
from producer.wire import PRIORITIES  # noqa: E402

if _before is not None:
    signal.signal(signal.SIGINT, _before)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchery",
        description="Serve an image classifier as a batched job queue on Redis and Celery. "
        "Redis comes from BATCHERY_REDIS_URL (default redis://localhost:6379/0).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("worker", help="run a worker: load the model, answer jobs in batches")
    p.add_argument("--concurrency", type=int, help="worker processes (default: the cores)")
    p.add_argument("--batch-size", type=int, help="most images in one forward pass (64)")
    p.add_argument(
        "--batch-budget-ms", type=float,
        help="cut batches to about this much work, in ms, learned per model version (25; 0: off)",
    )  # fmt: skip
    p.add_argument(
        "--batch-wait-ms", type=float, help="longest wait for a batch to fill, in ms (5)"
    )
    p.add_argument(
        "--model",
        type=Path,
        metavar="PATH",
        help="serve this model version folder (with model.json) as the default",
    )
    p.add_argument(
        "--metrics-port", type=int, help="serve Prometheus metrics on this port (off by default)"
    )
    p.add_argument("--log-format", choices=["text", "json"], help="log lines as text or JSON")
    p.add_argument(
        "--kind", choices=["auto", "full", "lite"],
        help="full: TensorFlow, every format; lite: LiteRT versions only, no TensorFlow; auto "
        "(default, BATCHERY_WORKER_KIND): full where TensorFlow is installed",
    )  # fmt: skip
    p.add_argument("--loglevel", default="INFO")

    p = sub.add_parser("submit", help="enqueue images; print one job id per line")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--model", help="model name (default: the workers' default model)")
    p.add_argument("--version", help="model version (default: the promoted one)")
    _job_control(p, "normal")
    p.add_argument(
        "--explain", action="store_true",
        help="results also carry an attribution map for the predicted class (a PNG)",
    )  # fmt: skip

    p = sub.add_parser(
        "explain", help="classify images through the queue and draw why: a PNG per image"
    )
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT_DIR")
    p.add_argument("--model", metavar="NAME[@VERSION]")
    p.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                   help="longest wait for the answers (60)")  # fmt: skip

    p = sub.add_parser(
        "cancel", help="withdraw jobs not yet computed; exit 1 if any was already answered"
    )
    p.add_argument("job_ids", nargs="+", metavar="JOB_ID")

    p = sub.add_parser(
        "feedback",
        help="give an answered job's true label: live accuracy and confusion in batchery monitor",
    )
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("label", metavar="LABEL", help="the true class, as the model names it")

    p = sub.add_parser(
        "result",
        help="print results as JSON lines; exit 1 unless every one is SUCCESS "
        "(FAILURE, CANCELLED, EXPIRED, still PENDING)",
    )
    p.add_argument("job_ids", nargs="+", metavar="JOB_ID")
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to this long for the results (default: don't wait)",
    )

    p = sub.add_parser(
        "classify",
        help="classify files, folders, globs or @lists into a .jsonl or .csv file, resumable",
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="a file, a directory (recursive), a glob, or @list.txt",
    )
    p.add_argument(
        "-o", "--output", required=True, type=Path, metavar="OUT",
        help="rows go here: .jsonl or .csv (path, job_id, status, label, score, error)",
    )  # fmt: skip
    p.add_argument("--model", metavar="NAME[@VERSION]")
    p.add_argument("--resume", action="store_true", help="skip paths already in OUT")
    p.add_argument(
        "--unordered", action="store_true",
        help="write rows as they complete instead of in input order",
    )  # fmt: skip
    p.add_argument("--window", type=int, default=4096, help="most jobs in flight (4096)")
    p.add_argument(
        "--window-mb", type=int, default=64, metavar="MB",
        help="most Redis memory the jobs in flight hold, in MiB (64)",
    )  # fmt: skip
    sending = p.add_mutually_exclusive_group()
    sending.add_argument(
        "--shrink", action="store_true",
        help="decode and resize here to the model's input size, send that as a lossless PNG "
        "(big photos: a 4 MB JPEG travels as ~100 KB)",
    )  # fmt: skip
    sending.add_argument(
        "--shared-fs", action="store_true",
        help="send each file's path, not its bytes: workers read it (they need "
        "BATCHERY_SHARED_ROOTS to cover it)",
    )  # fmt: skip
    p.add_argument(
        "--keep-results", action="store_true",
        help="leave each result in Redis too (default: deleted once written to OUT)",
    )  # fmt: skip
    _job_control(p, "low")
    p.add_argument(
        "--explain-dir", type=Path, metavar="DIR",
        help="write each answer's heatmap here (a PNG a row, its path in the row)",
    )  # fmt: skip

    p = sub.add_parser(
        "train",
        help="train the reference CNN on DATA_DIR/<label>/*.png and publish it as a new version",
    )
    p.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    p.add_argument("--name", required=True)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-dir", type=Path, help="labeled folder to measure test accuracy on")

    models = sub.add_parser(
        "models", help="the model registry: list, publish, promote, optimize, sign, evaluate"
    )
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    p = msub.add_parser("list", help="every version of every model")
    p.add_argument("--json", action="store_true", help="a JSON array, one object per version")
    p = msub.add_parser("publish", help="add a model file as the next version of NAME")
    p.add_argument("file", type=Path, metavar="FILE", help=".keras, a SavedModel folder, or .h5")
    p.add_argument("--name", required=True)
    p.add_argument("--labels", required=True, help="a comma list, or a file with one a line")
    p.add_argument(
        "--trust",
        action="store_true",
        help="allow .h5 and models with custom code (Keras safe_mode can't check them)",
    )
    p.add_argument("--color-mode", choices=["L", "RGB"], help="default: from the input channels")
    p.add_argument("--scale", type=float, default=1 / 255.0, help="pixel scale (1/255)")
    p.add_argument("--offset", type=float, default=0.0, help="added after scaling (0)")
    p.add_argument(
        "--batch-budget-ms", type=float, metavar="MS",
        help="this version's batches cut to MS of work, not the workers' budget (for a model "
        "whose one job costs more than the budget: a few jobs' worth)",
    )  # fmt: skip
    p.add_argument(
        "--baseline-dir", type=Path, metavar="DIR",
        help="images the version is expected to see: their answers and input statistics "
        "are kept as its monitoring baseline (batchery monitor)",
    )  # fmt: skip
    p = msub.add_parser("promote", help="serve VERSION of NAME to jobs that name no version")
    p.add_argument("name", metavar="NAME")
    p.add_argument("version", metavar="VERSION")
    p.add_argument(
        "--force", action="store_true",
        help="promote an optimised version even if it scored over 1 point below its source",
    )  # fmt: skip
    p = msub.add_parser(
        "optimize", help="convert a Keras version to LiteRT; publish it as the next version"
    )
    p.add_argument("model", metavar="NAME[@VERSION]")
    p.add_argument("--to", required=True, choices=["float16", "dynamic-int8", "int8"])
    p.add_argument(
        "--calibration-dir", type=Path, metavar="DIR",
        help="images in <label>/ folders for int8's representative dataset",
    )  # fmt: skip
    p.add_argument(
        "--test-dir", type=Path, metavar="DIR",
        help="labeled folder: record both versions' accuracy and their agreement",
    )  # fmt: skip
    p = msub.add_parser(
        "sign", help="sign NAME's manifests with BATCHERY_SIGNING_KEY (you vouch for them)"
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("version", nargs="?", metavar="VERSION", help="one version (default: all)")
    from batchery import rollouts

    rollouts.add_parsers(msub)
    p = msub.add_parser("evaluate", help="accuracy and confusion matrix on DATA_DIR/<label>/*")
    p.add_argument("model", metavar="NAME[@VERSION]")
    p.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--record-baseline", action="store_true",
        help="also keep what the version answered on DATA_DIR as its monitoring baseline",
    )  # fmt: skip

    p = sub.add_parser(
        "monitor", help="model quality in production: each version's live window, drift from "
        "its baseline, low confidence, live accuracy from feedback",
    )  # fmt: skip
    p.add_argument("name", nargs="?", metavar="NAME", help="one model (default: all)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("status", help="queue depth, in flight, workers alive, done, failed")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=1.0,
        metavar="SECONDS",
        help="refresh every SECONDS (1) with rates, until Ctrl-C",
    )
    p.add_argument(
        "--here",
        action="store_true",
        help="exit 1 unless a worker process on this host is alive (a container healthcheck)",
    )

    p = sub.add_parser(
        "serve", help="the HTTP gateway: the API at /v1, its docs at /docs, a web page at /"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (8000)")
    p.add_argument(
        "--no-webhooks", action="store_true",
        help="deliver no webhooks from this process (others may)",
    )  # fmt: skip
    p.add_argument(
        "--allow-unauthenticated", action="store_true",
        help="bind a non-loopback address without BATCHERY_API_KEYS (something in front "
        "authenticates, or a container port published on loopback)",
    )  # fmt: skip
    p.add_argument(
        "--new-key", metavar="NAME",
        help="print a new API key for NAME and its line for the BATCHERY_API_KEYS file; exit",
    )  # fmt: skip
    p.add_argument("--loglevel", default="info")

    p = sub.add_parser("bench", help="measure Batchery against the usual ways (a table, a chart)")
    p.add_argument("--model", choices=["reference", "mobilenet"], default="reference")
    p.add_argument("--images", type=int, help="files to classify (20000; mobilenet 500)")
    p.add_argument("--workers", type=int, help="worker processes (default: the cores)")
    p.add_argument(
        "--optimized", choices=["float16", "dynamic-int8", "int8"],
        help="also the model optimised to LiteRT by this method, in bulk and in-process",
    )  # fmt: skip
    p.add_argument(
        "--photos", type=int, metavar="N",
        help="instead: bulk on N camera-sized JPEGs (4000x3000) with MobileNetV2, every way",
    )  # fmt: skip
    p.add_argument(
        "--capacity", action="store_true",
        help="instead: jobs/s per worker core, Redis commands, bytes and CPU per job, and the "
        "cost of replica acks (the README's capacity table)",
    )  # fmt: skip
    p.add_argument(
        "--chart",
        type=Path,
        default=Path("bench-results.png"),
        help="where the PNG chart goes (needs matplotlib)",
    )

    p = sub.add_parser("demo", help="classify examples/digits end to end and print the accuracy")
    p.add_argument("--digits", type=Path, help="folder of <label>_<n>.png images")
    p.add_argument(
        "--no-worker",
        action="store_true",
        help="use the workers already serving BATCHERY_REDIS_URL",
    )
    p.add_argument(
        "--serve", type=int, nargs="?", const=8000, metavar="PORT",
        help="then serve the web page and the API on 127.0.0.1:PORT (8000) until Ctrl-C",
    )  # fmt: skip
    return parser


def _job_control(p: argparse.ArgumentParser, priority: str) -> None:
    p.add_argument(
        "--priority", choices=list(PRIORITIES), default=priority,
        help=f"workers take higher work first ({priority})",
    )  # fmt: skip
    p.add_argument(
        "--deadline", type=float, metavar="SECONDS", dest="deadline_s",
        help="answer EXPIRED, uncomputed, if not started within SECONDS "
        "(default: BATCHERY_DEFAULT_DEADLINE_S, or none)",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run ``batchery``; return the exit status."""
    from producer.stopping import interrupts_noted

    with interrupts_noted() as interrupted:
        if _interrupted_loading.is_set():  # a Ctrl-C while this module loaded
            return 130
        try:
            args = _parser().parse_args(argv)
            settings = Settings.from_env()
            if interrupted.is_set():  # a Ctrl-C while loading, which Python dropped
                return 130
            return _COMMANDS[args.command](args, settings)
        except BatcheryError as exc:
            print(f"batchery: error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    overrides = {
        "concurrency": args.concurrency,
        "batch_size": args.batch_size,
        "batch_wait_ms": args.batch_wait_ms,
        "batch_budget_ms": args.batch_budget_ms,
        "model_path": args.model,
        "metrics_port": args.metrics_port,
        "log_format": args.log_format,
        "worker_kind": args.kind,
    }
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    from worker.app import run_worker

    run_worker(settings, loglevel=args.loglevel)
    return 0


def _submit(args: argparse.Namespace, settings: Settings) -> int:
    from producer.client import Client

    with Client(settings=settings) as client:
        ids = client.submit_many(args.images, model=args.model, version=args.version,
                                 priority=args.priority, deadline_s=args.deadline_s,
                                 explain=args.explain)  # fmt: skip
    print("\n".join(ids))
    return 0


def _explain(args: argparse.Namespace, settings: Settings) -> int:
    from batchery.overlays import write_overlays
    from producer.client import Client
    from producer.images import image_bytes

    name, _, version = (args.model or "").partition("@")
    limits = settings.max_image_bytes, settings.max_image_pixels
    images = [image_bytes(path, *limits) for path in args.images]
    with Client(settings=settings) as client:
        ids = client.submit_many(images, model=name or None, version=version or None,
                                 priority="high", explain=True)  # fmt: skip
        results = client.results(ids, timeout=args.wait)
    for path, result in zip(write_overlays(args.images, images, results, args.output), results,
                            strict=True):  # fmt: skip
        print(f"{path}: {result['status']} {result.get('label') or result.get('error') or ''}")
    return 0 if all(r["status"] == "SUCCESS" for r in results) else 1


def _cancel(args: argparse.Namespace, settings: Settings) -> int:
    from producer.client import Client

    with Client(settings=settings) as client:
        flags = client.cancel_many(args.job_ids)
        kept = [jid for jid, flag in zip(args.job_ids, flags, strict=True) if not flag]
        answered = {jid: r["status"] for jid, r in zip(kept, client.results(kept), strict=True)}
    for job_id, flag in zip(args.job_ids, flags, strict=True):
        print(f"{job_id}: " + ("cancelled" if flag else
                               f"already answered ({answered[job_id]}), kept"))  # fmt: skip
    return 0 if all(flags) else 1


def _feedback(args: argparse.Namespace, settings: Settings) -> int:
    from producer.client import Client

    with Client(settings=settings) as client:
        got = client.feedback(args.job_id, args.label)
    verdict = "right" if got["correct"] else f"wrong: it answered {got['predicted']}"
    print(f"{got['job_id']}: label {got['label']} recorded for {got['model']}@{got['version']} "
          f"({verdict})")  # fmt: skip
    return 0


def _result(args: argparse.Namespace, settings: Settings) -> int:
    from producer.client import Client
    from producer.wire import SUCCESS

    with Client(settings=settings) as client:
        results = client.results(args.job_ids, timeout=args.wait)
    for result in results:
        print(json.dumps(result))
    return 0 if all(r["status"] == SUCCESS for r in results) else 1


def _classify(args: argparse.Namespace, settings: Settings) -> int:
    from producer.bulk import classify
    from producer.client import Client

    name, _, version = (args.model or "").partition("@")
    shrink_to = None
    if args.shrink:
        from producer.registry import Registry

        registry = Registry(settings.model_dir)
        if not registry.names():
            raise ConfigError(
                f"--shrink needs the model's input size from its manifest, and there is no "
                f"registry at {settings.model_dir} (BATCHERY_MODEL_DIR) on this host"
            )
        info = registry.get(name or settings.default_model, version or None)
        height, width, _ = info.input_shape
        shrink_to = ((width, height), info.color_mode)
    with Client(settings=settings) as client:
        summary = classify(client, args.paths, args.output, model=name or None,
                           version=version or None, resume=args.resume,
                           ordered=not args.unordered, window=args.window,
                           keep_results=args.keep_results, priority=args.priority,
                           deadline_s=args.deadline_s, explain_dir=args.explain_dir,
                           window_bytes=args.window_mb * 1024 * 1024, shrink_to=shrink_to,
                           shared_fs=args.shared_fs)  # fmt: skip
    print(summary.line(), file=sys.stderr)
    if summary.interrupted:
        return 130
    return 1 if summary.counts.get("FAILURE") else 0


def _train(args: argparse.Namespace, settings: Settings) -> int:
    from producer.registry import Registry
    from worker.train import train

    info = train(
        args.data_dir,
        args.name,
        Registry.from_settings(settings),
        epochs=args.epochs,
        seed=args.seed,
        test_dir=args.test_dir,
    )
    print(
        json.dumps(
            {
                "name": info.name,
                "version": info.version,
                "path": str(info.path),
                "metrics": info.meta.get("metrics", {}),
            }
        )
    )
    return 0


def _models(args: argparse.Namespace, settings: Settings) -> int:
    from producer.registry import Registry

    action = args.models_command
    if action in ("shadow", "canary", "history"):
        from batchery import rollouts
        from producer.client import Client

        with Client(settings=settings) as client:
            return rollouts.run(args, settings, client.redis)
    # Signs what it writes (and checks what it reads) when message signing is set up;
    # listing shows what is there, signed or not.
    registry = (
        Registry(settings.model_dir) if action == "list" else Registry.from_settings(settings)
    )
    if action == "list":
        rows = registry.rows()
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for row in rows:
                optimized = row.get("optimized") or {}
                accuracy = row.get("metrics", {}).get("test_accuracy", optimized.get("accuracy"))
                what = (f"  {optimized.get('method')} LiteRT of {optimized.get('source_version')}"
                        if optimized else "")  # fmt: skip
                print(
                    f"{row['name']:<20} {row['version']:>4} {'*' if row['promoted'] else ' '} "
                    f"{row['sha256'][:12]}  {row['created']:<25} "
                    f"{'' if accuracy is None else f'test accuracy {accuracy * 100:.1f}%'}{what}"
                )
        return 0
    if action == "promote":
        registry.promote(args.name, args.version, force=args.force)
        print(f"promoted {args.name}@{args.version}")
        return 0
    if action == "sign":
        signer = Registry(settings.model_dir, key=registry.key)  # vouches: reads unchecked
        signed = signer.sign(args.name, args.version)
        print(f"signed {args.name} versions {', '.join(signed)} and its {PROMOTED_FILE}")
        return 0
    if action == "optimize":
        from worker.optimize import optimize

        name, _, version = args.model.partition("@")
        info = optimize(registry, registry.get(name, version or None), args.to,
                        args.calibration_dir, args.test_dir)  # fmt: skip
        print(json.dumps({"published": info.key, **info.meta["optimized"]}))
        return 0
    from worker.publish import evaluate, publish_model, read_labels

    if action == "publish":
        info = publish_model(registry, args.file, args.name, read_labels(args.labels),
                             trust=args.trust, color_mode=args.color_mode, scale=args.scale,
                             offset=args.offset, batch_budget_ms=args.batch_budget_ms)  # fmt: skip
        promoted = registry.promoted(info.name) == info.version
        print(f"published {info.key}{' (promoted)' if promoted else ''}")
        if args.baseline_dir is not None:
            _record_baseline(registry, info, args.baseline_dir)
        return 0
    name, _, version = args.model.partition("@")
    info = registry.get(name, version or None)
    result = evaluate(info, args.data_dir)
    print(json.dumps(result.to_dict()) if args.json else result.table())
    if args.record_baseline:
        _record_baseline(registry, info, args.data_dir, quiet=args.json)
    return 0


def _record_baseline(registry: Registry, info: ModelInfo, data_dir: Path, quiet: bool = False
                     ) -> None:  # fmt: skip
    from worker.publish import measure_baseline

    baseline = measure_baseline(info, data_dir)
    registry.record_baseline(info.name, info.version, baseline)
    if not quiet:
        print(f"baseline of {info.key}: {baseline['jobs']} images from {data_dir}",
              file=sys.stderr)  # fmt: skip


def _monitor(args: argparse.Namespace, settings: Settings) -> int:
    from batchery.monitor import collect, render
    from producer.client import Client

    with Client(settings=settings) as client:
        rows = collect(client.redis, Registry.from_settings(settings), settings, args.name)
    print(json.dumps(rows, indent=2) if args.json else render(rows))
    return 0


def _status(args: argparse.Namespace, settings: Settings) -> int:
    from batchery.status import collect, render
    from producer.client import Client

    with Client(settings=settings) as client:
        if args.watch is not None:
            from batchery.status import watch

            watch(client, max(0.1, args.watch), as_json=args.json)
            return 0
        status = client.retrying(lambda: collect(client))
    print(json.dumps(status) if args.json else render(status))
    if args.here:
        import socket

        here = f"{socket.gethostname()}:"
        return 0 if any(w.startswith(here) for w in status["workers"]) else 1
    return 0


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    if args.new_key:
        from gateway.apikeys import new_key

        key, line = new_key(args.new_key)
        print(f"key (give it to {args.new_key}; it is not stored anywhere): {key}")
        print(f"line for the BATCHERY_API_KEYS file: {line}")
        return 0
    import signal

    from producer.stopping import stop_on_signals

    # Ctrl-C is how it ends: from here on, wherever it lands, the gateway shuts down and
    # exits 0 (SIGTERM: uvicorn's, as a container stop expects).
    with stop_on_signals(signal.SIGINT) as stop:
        try:
            from gateway.app import serve

            serve(settings, args.host, args.port, webhooks=not args.no_webhooks,
                  allow_unauthenticated=args.allow_unauthenticated,
                  log_level=args.loglevel.lower(), stop=stop)  # fmt: skip
        except KeyboardInterrupt:
            pass
    return 0


def _bench(args: argparse.Namespace, settings: Settings) -> int:
    import os

    from bench.suite import run_bench

    workers = args.workers or os.cpu_count() or 1
    if args.capacity:
        from bench.capacity import run_capacity

        run_capacity(args.images or 20000)
        return 0
    if args.photos:
        from bench.suite import run_photo_bench

        run_photo_bench(args.photos, workers)
        return 0
    images = args.images or (20000 if args.model == "reference" else 500)
    run_bench(args.model, images, workers, args.chart, optimized=args.optimized)
    return 0


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from batchery.demo import DEFAULT_DIGITS, run_demo

    run_demo(settings, args.digits or DEFAULT_DIGITS, sys.stdout, start_worker=not args.no_worker,
             serve_port=args.serve)  # fmt: skip
    return 0


_COMMANDS = {
    "worker": _worker,
    "submit": _submit,
    "cancel": _cancel,
    "feedback": _feedback,
    "explain": _explain,
    "result": _result,
    "classify": _classify,
    "train": _train,
    "models": _models,
    "monitor": _monitor,
    "status": _status,
    "serve": _serve,
    "bench": _bench,
    "demo": _demo,
}

if __name__ == "__main__":
    sys.exit(main())
