"""What every benchmark records beside its figures: the machine, the date, the versions."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    import numpy
    import torch

    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as fh:
            info["ram_gib"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def anon_rss_mib() -> float:
    """Current anonymous RSS (MiB): memory that is not file-backed pages such as an mmapped store."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def write_results(name: str, results: dict[str, Any], markdown: str) -> Path:
    """Write ``results/NAME.json`` (figures + machine) and ``results/NAME.md`` (a readable table)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), **results}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    m = payload["machine"]
    header = (f"# {name}\n\nMachine: {m['cpu']}, {m['cores']} cores, {m.get('ram_gib', '?')} GiB RAM, "
              f"GPU: {m['cuda'] or 'none'}; torch {m['torch']}; {m['date_utc']} UTC.\n\n")
    (RESULTS / f"{name}.md").write_text(header + markdown.rstrip() + "\n")
    return RESULTS / f"{name}.json"
