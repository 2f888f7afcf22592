"""Where does a run make the host wait for the GPU? Runs a lit_dreamer command on CUDA under
torch.cuda.set_sync_debug_mode("warn") and prints each distinct synchronizing call site with how often it happened.

    PYTHONPATH=. python scripts/sync_check.py bench -c configs/cartpole.yaml logger.backend=none bench.steps=3

A site is the innermost frames that are not torch's own (where the sync was asked for: a `.item()`, a host copy,
a boolean mask) followed by the project's frames (lit_dreamer/, callbacks/) above them, innermost first, so a
sync made inside Lightning shows both the Lightning line and the project code that called into it. An explicit
`torch.cuda.synchronize()` (bench's phase timer) is not reported by torch. Without CUDA it runs the command and
says so.
"""

from __future__ import annotations

import collections
import sys
import traceback
import warnings

import torch

PROJECT = ("/lit_dreamer/", "/callbacks/")
SKIPPED = ("/torch/", "/warnings.py", "sync_check.py")


def site(stack: list[traceback.FrameSummary], inner: int = 2, outer: int = 5) -> str:
    """The call site of a stack (outermost first): its `inner` innermost frames outside torch and this script,
    then up to `outer` of the project's frames above them, innermost first, as `file:line:function`."""
    frames = [f for f in stack if not any(part in f.filename for part in SKIPPED)]
    innermost = frames[-inner:]
    project = [f for f in frames[:-inner]
               if any(part in f.filename for part in PROJECT) and "site-packages" not in f.filename][-outer:]
    return " <- ".join(f"{short(f.filename)}:{f.lineno}:{f.name}" for f in reversed(project + innermost))


def short(path: str) -> str:
    """A path from its package folder on: an installed package's below site-packages (lightning/...), the
    project's from lit_dreamer/ or callbacks/."""
    if "site-packages/" in path:
        return path[path.rindex("site-packages/") + len("site-packages/"):]
    for root in ("lit_dreamer/", "callbacks/"):
        if root in path:
            return path[path.rindex(root):]
    return path


def main(argv: list[str]) -> int:
    from lit_dreamer.__main__ import main as lit_main

    counts: collections.Counter[str] = collections.Counter()

    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            counts[site(traceback.extract_stack())] += 1
        else:  # the command's other warnings are shown as usual
            shown(message, category, filename, lineno, file, line)

    if not torch.cuda.is_available():
        print("no CUDA device: running the command without the check")
        return lit_main(argv)
    warnings.showwarning = record
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        code = lit_main(argv)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    print(f"exit {code}; distinct sync sites {len(counts)}, syncs {sum(counts.values())}")
    for where, n in counts.most_common():
        print(f"{n:6d}  {where}")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
