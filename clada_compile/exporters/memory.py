"""Peak memory of an export: a fresh process loads it with OrtCladaModel and generates.

    python -m clada_compile.exporters.memory EXPORT_DIR [--prompt_tokens 128] [--new_tokens 16] [--threads N]

prints one JSON line {"peak_rss_mib": ..., "after_load_mib": ...}. A fresh process, because the
exporting process's own peak (tracing, both graphs in memory) says nothing about deployment.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def measure_memory(path, prompt_tokens: int = 128, new_tokens: int = 16, threads: int | None = None) -> dict:
    """Peak RSS (MiB) of a fresh process that loads `path` and runs a prefill and decode steps."""
    cmd = [sys.executable, "-m", "clada_compile.exporters.memory", str(path),
           "--prompt_tokens", str(int(prompt_tokens)), "--new_tokens", str(int(new_tokens))]
    if threads:
        cmd += ["--threads", str(int(threads))]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"memory measurement of {path} failed ({' '.join(cmd)}):\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _peak_mib() -> float:
    # VmHWM: this process's own peak (ru_maxrss would include the parent's, inherited at fork)
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clada_compile.exporters.memory",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("path", help="an export directory (clada-export --onnx)")
    parser.add_argument("--prompt_tokens", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.prompt_tokens < 1 or args.new_tokens < 1:
        parser.error(f"--prompt_tokens and --new_tokens must be >= 1, got {args.prompt_tokens} and {args.new_tokens}")

    import torch

    from .ort import OrtCladaModel

    engine = OrtCladaModel.from_dir(args.path, threads=args.threads)
    after_load = _peak_mib()
    ids = torch.randint(0, int(engine.vocab_size), (1, args.prompt_tokens))
    engine.generate(ids, max_new_tokens=args.new_tokens)
    print(json.dumps({"peak_rss_mib": _peak_mib(), "after_load_mib": after_load}))


if __name__ == "__main__":
    main()
