"""UCM NFS Store: the Python side (store API and vLLM connector).

Python translates; the engine process (core/, TypeScript) decides; its native
addon (native/, C++) moves the bytes. No KV bytes pass through this package.
"""

__version__ = "0.1.0"
