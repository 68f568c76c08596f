"""``batchery models shadow|canary|history``: start, watch and end rollouts (producer.rollout).

``canary --watch`` is the guardrail process: it runs where the signing key is (on a signed
registry), judges the canary every few seconds from what workers wrote to Redis, promotes it
after ``--promote-after`` jobs with every guardrail holding, or rolls it back the moment one
fails. Rolling back sets the unsigned switch in Redis first (workers stop the canary within
a batch, keyless), then rewrites ``ROLLOUT`` when the key is here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from typing import Any

import redis

from producer.errors import ConfigError
from producer.registry import Registry
from producer.rollout import Decision, Rollout, history, judge, mark_start, record
from producer.settings import Settings
from producer.wire import STATS_KEY, rollout_stopped_key


def add_parsers(msub: Any) -> None:
    """The rollout actions under ``batchery models``."""
    p = msub.add_parser(
        "shadow",
        help="also run VERSION on a share of live jobs; never return "
        "its answers (batchery monitor compares it with the served version)",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("version", nargs="?", metavar="VERSION")
    p.add_argument("--percent", type=float, default=10.0, help="share of jobs (10)")
    p.add_argument("--off", action="store_true", help="stop the shadow")
    p = msub.add_parser(
        "canary",
        help="let VERSION answer a share of the jobs that name no "
        "version; promote it or roll it back on its guardrails (--watch)",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("version", nargs="?", metavar="VERSION")
    p.add_argument("--percent", type=float, default=10.0, help="share of jobs (10)")
    p.add_argument(
        "--promote-after",
        type=int,
        default=1000,
        metavar="N",
        help="candidate jobs before promotion (1000)",
    )
    p.add_argument(
        "--max-drift",
        type=float,
        metavar="D",
        help="most drift against the served version's baseline (default BATCHERY_DRIFT_THRESHOLD)",
    )
    p.add_argument(
        "--min-agreement",
        type=float,
        default=0.9,
        metavar="A",
        help="least share of answers agreeing with the served version (0.9)",
    )
    p.add_argument(
        "--min-accuracy",
        type=float,
        metavar="X",
        help="least live accuracy from feedback (off by default)",
    )
    p.add_argument(
        "--watch",
        action="store_true",
        help="stay and run the guardrails until the canary is promoted or rolled back",
    )
    p.add_argument("--every", type=float, default=2.0, help="seconds between judgements (2)")
    p.add_argument(
        "--off", action="store_true", help="roll the canary back now (keyless: a switch in Redis)"
    )
    p = msub.add_parser("history", help="a model's rollout decisions, newest first")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true")  # fmt: skip


def run(args: argparse.Namespace, settings: Settings, client: redis.Redis) -> int:
    """Run a rollout action; the exit status."""
    registry = Registry.from_settings(settings)
    name = args.name
    if args.models_command == "history":
        entries = history(client, name)
        if args.json:
            print(json.dumps(entries, indent=2))
        for e in [] if args.json else entries:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"]))
            print(f"{when}  {e['action']:<9} {name}@{e.get('version')}  {e.get('reason', '')}  "
                  f"{json.dumps(e.get('figures', {}))}")  # fmt: skip
        return 0
    current = Rollout.from_json({**(registry.rollout(name) or {}), "model": name})
    if args.models_command == "shadow":
        if args.off:
            _save(registry, replace(current, shadow=None, shadow_percent=0.0))
            print(f"{name}: shadow off")
            return 0
        _need_version(args)
        _save(registry, replace(current, shadow=args.version, shadow_percent=_share(args)))
        record(client, name, {"action": "shadow", "version": args.version,
                              "reason": f"{args.percent:g}% of jobs"})  # fmt: skip
        print(f"{name}: {args.percent:g}% of jobs also run on {name}@{args.version} (shadow)")
        return 0
    if args.off:
        if not current.canary:
            raise ConfigError(f"{name} has no canary")
        roll_back(client, registry, current, Decision("rollback", "by hand (--off)", {}))
        return 0
    if args.version is None and args.watch and current.canary:
        return watch(client, registry, settings, name, args.every)
    _need_version(args)
    served = registry.promoted(name)
    if args.version == served:
        raise ConfigError(f"{name}@{served} is already the served version")
    rollout = replace(
        current, canary=args.version, canary_percent=_share(args),
        promote_after=args.promote_after, max_drift=args.max_drift,
        min_agreement=args.min_agreement, min_accuracy=args.min_accuracy, started=time.time(),
    )  # fmt: skip
    mark_start(client, rollout)
    _save(registry, rollout)
    client.delete(rollout_stopped_key(name))  # a new canary: an old switch must not stop it
    record(client, name, {"action": "canary", "version": args.version,
                          "reason": f"{args.percent:g}% of jobs, promote after "
                          f"{args.promote_after}"})  # fmt: skip
    print(f"{name}: {args.percent:g}% of the jobs naming no version answered by "
          f"{name}@{args.version} (canary; served {name}@{served})")  # fmt: skip
    return watch(client, registry, settings, name, args.every) if args.watch else 0


def watch(client: redis.Redis, registry: Registry, settings: Settings, name: str,
          every: float) -> int:  # fmt: skip
    """Judge ``name``'s canary until it is promoted (0) or rolled back (1)."""
    last = ""
    while True:
        rollout = Rollout.from_json({**(registry.rollout(name) or {}), "model": name})
        if not rollout.canary:
            print(f"{name}: no canary any more")
            return 1
        served = registry.promoted(name)
        meta = {**registry.get(name, served).meta}
        recorded = registry.baseline(name, served)
        if recorded:
            meta["baseline"] = recorded
        decision = judge(client, rollout, served, meta, settings.drift_threshold,
                         settings.monitor_window_jobs)  # fmt: skip
        line = f"{name}@{rollout.canary}: {decision.action}: {decision.reason}"
        if line != last:
            print(line, json.dumps(decision.figures), flush=True)
            last = line
        if decision.action == "rollback":
            roll_back(client, registry, rollout, decision)
            return 1
        if decision.action == "promote":
            registry.promote(name, rollout.canary)
            _save(registry, replace(rollout, canary=None, canary_percent=0.0))
            _decided(client, name, rollout.canary, decision, "canary_promoted")
            print(f"promoted {name}@{rollout.canary}")
            return 0
        time.sleep(every)


def roll_back(client: redis.Redis, registry: Registry, rollout: Rollout, decision: Decision
              ) -> None:  # fmt: skip
    """Every job back to the served version: the Redis switch first (keyless, at once), then
    ``ROLLOUT`` rewritten where the key allows."""
    name, version = rollout.model, str(rollout.canary)
    client.set(rollout_stopped_key(name), version)
    try:
        _save(registry, replace(rollout, canary=None, canary_percent=0.0))
    except ConfigError:
        print(f"{name}: ROLLOUT left as it is (no signing key here); the switch in Redis "
              "stops the canary", file=sys.stderr)  # fmt: skip
    _decided(client, name, version, decision, "canary_rolled_back")
    print(f"rolled back {name}@{version}: {decision.reason}")


def _decided(client: redis.Redis, name: str, version: str, decision: Decision, stat: str
             ) -> None:  # fmt: skip
    record(client, name, {"version": version, **asdict(decision)})
    client.hincrby(STATS_KEY, stat, 1)


def _save(registry: Registry, rollout: Rollout) -> None:
    on = rollout.shadow or rollout.canary
    registry.set_rollout(rollout.model, rollout.to_json() if on else None)


def _share(args: argparse.Namespace) -> float:
    if not 0 < args.percent <= 100:
        raise ConfigError(f"--percent {args.percent:g}: give a share between 0 and 100")
    return float(args.percent)


def _need_version(args: argparse.Namespace) -> None:
    if args.version is None:
        raise ConfigError(f"batchery models {args.models_command} {args.name} VERSION: "
                          "name the candidate version (or --off)")  # fmt: skip
