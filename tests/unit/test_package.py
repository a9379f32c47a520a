"""`import ventilator`: light, and every public name what it says."""

from __future__ import annotations

import subprocess
import sys

# Run in a fresh interpreter: this one has imported every module already.
PROGRAM = """
import sys, types
import ventilator
light = not any(m in sys.modules for m in ("ventilator.client", "zmq", "asyncio"))
import ventilator.cli  # imports every submodule, as a program might first
names = {name: getattr(ventilator, name) for name in ventilator.__all__}
modules = sorted(n for n, v in names.items() if isinstance(v, types.ModuleType))
print(light, modules)
"""


def test_import_is_light_and_no_public_name_is_shadowed_by_a_submodule() -> None:
    # A submodule named like a public name replaces it on the package once it
    # is imported: `ventilator.local` was the module, not the function, after
    # the CLI's import of it.
    ran = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, check=True
    )

    assert ran.stdout.split() == ["True", "[]"], ran.stderr
