// Log lines in the seed's format: "[UCMNFSSTORE] [I] <message>".
export type LogLevel = "debug" | "info" | "warn" | "error";
export const LOG_LEVELS: readonly LogLevel[] = ["debug", "info", "warn", "error"];
const LETTER: Record<LogLevel, string> = { debug: "D", info: "I", warn: "W", error: "E" };

export type LogSink = (line: string, level: LogLevel) => void;

const defaultSink: LogSink = (line) => {
  process.stdout.write(line + "\n");
};

export class Logger {
  private threshold: number;
  constructor(
    level: LogLevel = "info",
    private readonly sink: LogSink = defaultSink,
  ) {
    this.threshold = LOG_LEVELS.indexOf(level);
  }
  setLevel(level: LogLevel): void {
    this.threshold = LOG_LEVELS.indexOf(level);
  }
  enabled(level: LogLevel): boolean {
    return LOG_LEVELS.indexOf(level) >= this.threshold;
  }
  log(level: LogLevel, message: string): void {
    if (this.enabled(level)) this.sink(`[UCMNFSSTORE] [${LETTER[level]}] ${message}`, level);
  }
  debug(message: string): void {
    this.log("debug", message);
  }
  info(message: string): void {
    this.log("info", message);
  }
  warn(message: string): void {
    this.log("warn", message);
  }
  error(message: string): void {
    this.log("error", message);
  }
}

/** The seed's per-task line. `size` is bytes, `elapsed` seconds. */
export function taskLine(taskId: number, direction: "D2S" | "S2D", count: number, size: number, elapsed: number): string {
  return `Task(${taskId},${direction},${count},${size}) finished, elapsed ${elapsed.toFixed(6)}s`;
}
