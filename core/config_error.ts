// The error a bad config stops the engine with (exit code 2), and how a value
// is written in its message. Shared by config.ts (our keys) and ucm_keys.ts
// (UCM's), so that every message names the key path and the value alike.

export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ConfigError";
  }
}

/** A config value as a message shows it: JSON (python_shim/ucm/ucm_keys.py show writes the same). */
export function show(v: unknown): string {
  if (typeof v === "string") return JSON.stringify(v);
  try {
    return JSON.stringify(v) ?? String(v);
  } catch {
    return String(v);
  }
}
