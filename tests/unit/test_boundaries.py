"""The lines that hold the design together, checked."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_producer_never_imports_tensorflow() -> None:
    code = (
        "import sys, producer, batchery.cli, producer.client, batchery.demo, batchery.local, "
        "producer.registry, producer.images, producer.wire\n"
        "from batchery.cli import main\n"
        "try:\n    main(['submit', '--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = ('tensorflow', 'keras', 'celery_batches', 'worker')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_producer_sources_do_not_import_the_worker_except_lazily_in_the_cli() -> None:
    for path in (ROOT / "producer").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only: the CLI imports the worker inside functions
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert not name.startswith(("worker", "tensorflow", "keras")), (path, name)


def test_only_settings_reads_the_environment() -> None:
    for folder in ("producer", "worker"):
        for path in (ROOT / folder).glob("*.py"):
            if path.name in ("settings.py", "local.py"):
                continue
            source = path.read_text()
            assert "os.environ[" not in source and "os.getenv" not in source, path
            assert "environ.get(" not in source, path


def test_redis_key_and_task_names_live_in_wire_only() -> None:
    for folder in ("producer", "worker"):
        for path in (ROOT / folder).glob("*.py"):
            if path.name == "wire.py":
                continue
            source = path.read_text()
            assert "celery-task-meta" not in source, path
            assert '"batchery.classify"' not in source, path
            assert not re.search(r"[\"']batchery:[a-z_]", source), path
